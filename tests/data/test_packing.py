"""Packing documents into rows (concat, fit, document) against an independent vectorized re-packing."""

import numpy as np
import pytest

from longrope_jax.data.loader import make_loader
from tests.data.corpus import RAW, SEQ, VERSES, doc_tokens, rows_of


def repack(docs: list[np.ndarray], seq_len: int, pad: int) -> dict[str, np.ndarray]:
    """Independent concat packing: cut the token stream into rows, number each row's documents 1..k."""
    stream = np.concatenate(docs)
    doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    n = -(-len(stream) // seq_len) * seq_len
    tokens = np.full(n, pad)
    tokens[: len(stream)] = stream
    doc_of = np.concatenate([doc_of, np.full(n - len(stream), -1)]).reshape(-1, seq_len)
    segments = np.zeros_like(doc_of)
    positions = np.zeros_like(doc_of)
    for r, row in enumerate(doc_of):
        real = row >= 0
        ids, firsts = np.unique(row[real], return_index=True)  # documents increase along the stream
        rank = np.searchsorted(ids, row[real])
        segments[r, real] = rank + 1
        positions[r, real] = np.arange(seq_len)[real] - firsts[rank]
    return {"tokens": tokens.reshape(-1, seq_len), "positions": positions, "segment_ids": segments}


def test_concat_packing_equals_an_independent_repacking(byte, val_docs):
    docs = VERSES[:40] + val_docs[:2]  # rows holding many short documents, and documents spanning many rows
    got = rows_of(make_loader(docs, byte, seq_len=SEQ, batch_size=4, seed=0, train=False,
                                   shard_index=0, shard_count=1))
    want = repack(doc_tokens(docs, byte), SEQ, byte.pad_id)
    n = len(want["tokens"])
    assert len(got["tokens"]) == -(-n // 4) * 4  # the last batch is padded to full size ...
    assert (got["segment_ids"][n:] == 0).all() and (got["tokens"][n:] == byte.pad_id).all()  # ... with empty rows
    for k in want:
        np.testing.assert_array_equal(got[k][:n], want[k], err_msg=k)
    assert {k: v.dtype for k, v in got.items()} == {k: np.int32 for k in got}
    # A document continued from the previous row restarts at position 0 (see packing.py for why).
    assert (got["positions"][:, 0] == 0).all() and (got["tokens"][1:n, 0] != byte.bos_id).any()


def test_document_packing_keeps_each_document_start_and_skips_short_ones(byte, val_docs):
    seq = 8192
    loader = make_loader(val_docs, byte, seq_len=seq, batch_size=1, seed=0, train=False, pack="document",
                              min_doc_tokens=10_000, shard_index=0, shard_count=1)
    rows = rows_of(loader)
    kept = [d for d in val_docs if len(d.encode()) >= 10_000]
    assert [d.split("\n")[0] for d in kept] == ["Ruth", "Ecclesiastes", "Mark", "Hebrews"]
    for row, tokens, positions, segs in zip(range(9), rows["tokens"], rows["positions"], rows["segment_ids"]):
        np.testing.assert_array_equal(tokens, doc_tokens([kept[row]], byte)[0][:seq])
        np.testing.assert_array_equal(positions, np.arange(seq))
        assert (segs == 1).all()
    assert len(rows["tokens"]) == 4
    short = rows_of(make_loader(VERSES[:3], byte, seq_len=seq, batch_size=3, seed=0, train=False,
                                     pack="document", shard_index=0, shard_count=1))
    n = len(VERSES[1].encode()) + 2
    assert (short["segment_ids"][1, :n] == 1).all() and (short["segment_ids"][1, n:] == 0).all()
    assert (short["tokens"][1, n:] == byte.pad_id).all()


def test_too_high_min_doc_tokens_fails_instead_of_spinning(byte):
    loader = make_loader(VERSES[:5], byte, seq_len=SEQ, batch_size=1, seed=0, min_doc_tokens=10_000,
                              shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="min_doc_tokens=10000"):
        next(loader)


def test_fit_packing_never_cuts_a_document_that_fits_in_a_row(byte):
    docs = VERSES[:60] + [RAW["Jonah"][0][0] * 4]  # verses (short) and one document longer than a row
    rows = rows_of(make_loader(docs, byte, seq_len=SEQ, batch_size=4, seed=0, train=False, pack="fit"))
    whole = {len(byte.encode(d)) + 2 for d in docs if len(byte.encode(d)) + 2 <= SEQ}
    starts = ends = 0
    for tokens, seg in zip(rows["tokens"], rows["segment_ids"]):
        for s in range(1, seg.max() + 1):
            piece = tokens[seg == s]
            if piece[0] == byte.bos_id and piece[-1] == byte.eos_id:
                assert len(piece) in whole
            starts += piece[0] == byte.bos_id
            ends += piece[-1] == byte.eos_id
    assert starts == ends == len(docs)  # every document appears once, the long one cut, no other
    concat = rows_of(make_loader(docs, byte, seq_len=SEQ, batch_size=4, seed=0, train=False, pack="concat"))
    assert (concat["segment_ids"] == 0).sum() < (rows["segment_ids"] == 0).sum()  # fit pays with padding
