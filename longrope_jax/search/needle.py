"""LongRoPE2's needle-driven perplexity (arXiv 2502.20082 §3.2): windows of long documents with needles
inserted at several depths and, at the end, a question per needle followed by its answer; only the
answer tokens are scored.

A window is, token-exact at `length`:

    BOS, document tokens with K needle sentences inserted at depths evenly spaced over 0-100%,
    then for each needle (in depth order) QUESTION(key) followed by the answer tokens of its value.

The needle follows RULER's template ("One of the special magic numbers for {key} is: {value}.",
NVIDIA/RULER scripts/data/synthetic/niah.py) with an adjective-noun word key and a 7-digit value. The
paper's exact needle template, count and depths are not published (PG19-Needle); these are this
project's choice. Everything is drawn from `numpy.random.default_rng((seed, window index))`, so the
windows do not depend on how many are asked for. The score mask marks the scored *tokens* (the answer
digits): the evaluator turns it into "position t predicts token t+1" itself.
"""

from __future__ import annotations

import numpy as np

NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = (" What is the special magic number for {key} mentioned in the provided text?"
            " The special magic number for {key} mentioned in the provided text is: ")
ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly", "lucky",
              "misty", "noble", "quiet", "rapid", "silent", "tidy", "vivid", "wild", "young")
NOUNS = ("anchor", "badger", "candle", "desert", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel")


def needle_depths(count: int) -> np.ndarray:
    """Depths evenly spaced over 0..1 (one needle: the middle)."""
    return np.array([0.5]) if count == 1 else np.linspace(0.0, 1.0, count)


def _needles(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """`count` (key, value) pairs with distinct keys."""
    pairs = rng.choice(len(ADJECTIVES) * len(NOUNS), size=count, replace=False)
    keys = [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in pairs]
    return [(k, str(int(rng.integers(1_000_000, 10_000_000)))) for k in keys]


def needle_window(doc_ids, tokenizer, length: int, needles: int, rng: np.random.Generator):
    """(tokens [length], scored-token mask [length]) for one document, or None when it is too short."""
    pairs = _needles(rng, needles)
    needle_ids = [tokenizer.encode(" " + NEEDLE.format(key=k, value=v) + " ") for k, v in pairs]
    tail, mask_tail = [], []
    for k, v in pairs:
        q, a = tokenizer.encode(QUESTION.format(key=k)), tokenizer.encode(v)
        tail += q + a
        mask_tail += [False] * len(q) + [True] * len(a)
    haystack = length - 1 - sum(map(len, needle_ids)) - len(tail)
    if haystack < 1 or len(doc_ids) < haystack:
        return None
    cuts = np.rint(needle_depths(needles) * haystack).astype(int)
    body, prev = [], 0
    for cut, ids in zip(cuts, needle_ids):
        body += list(doc_ids[prev:cut]) + ids
        prev = cut
    body += list(doc_ids[prev:haystack])
    tokens = [tokenizer.bos_id] + body + tail
    mask = [False] * (1 + len(body)) + mask_tail
    return np.asarray(tokens, np.int32), np.asarray(mask, bool)


def needle_windows(documents, tokenizer, length: int, count: int, *, needles: int = 4, seed: int = 0):
    """(tokens int32 [count, length], scored-token mask bool [count, length]) from the first `count`
    documents (in source order) long enough for a window; window i draws its needles from (seed, i)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"docs: expected a positive integer, got {count!r}")
    if isinstance(needles, bool) or not isinstance(needles, int) or needles < 1:
        raise ValueError(f"needles: expected a positive integer, got {needles!r}")
    rows, masks = [], []
    for doc in documents:
        out = needle_window(tokenizer.encode(doc), tokenizer, length, needles,
                            np.random.default_rng((seed, len(rows))))
        if out is not None:
            rows.append(out[0])
            masks.append(out[1])
            if len(rows) == count:
                return np.stack(rows), np.stack(masks)
    raise ValueError(f"needle perplexity: needs {count} documents long enough for {length}-token windows with "
                     f"{needles} needles, found {len(rows)} (ask for fewer documents or needles, or shorter windows)")
