"""PoSE, positional skip-wise training (Zhu et al., arXiv 2309.10400): train at a short window while the
position ids cover a long target length.

A training window of L_c tokens is split into N chunks (two by default, as in the paper's experiments)
of lengths l_0..l_{N-1} summing to L_c. Chunk i keeps its tokens contiguous and gets the positions

    st_i + u_i, ..., st_i + u_i + l_i - 1,    st_i = l_0 + ... + l_{i-1},

with skip biases u_0 = 0 and u_i drawn uniformly from {u_{i-1}, ..., L_t - L_c}, so positions rise strictly
within the window and the last one, L_c - 1 + u_{N-1}, stays below the target length L_t. Chunk
lengths: for two chunks l_0 is uniform on {1, ..., ceil(L_c / 2)} (dwzhu-pku/PoSE src/train_pose.py,
`rt1 = random.randint(1, (len_chunk+1)//2)`, with `lt = 0` for the first chunk's bias); for more
chunks the N - 1 cut points are distinct and uniform on 1..L_c - 1. The released code also skips text
between chunks of a document longer than the window; here the text stays contiguous (the paper's
positional skipping alone), so packing and its resume are unchanged.

In a packed row every piece (a run of one nonzero segment id, positions 0..l-1 from `packing`) is one
PoSE window with L_c = l. Padding keeps its positions. `PoseSkip` is a grain random map: each row draws
from its own Generator, which grain derives from the loader's seed and the row's index, so rows are
reproducible and a restored loader continues with the same positions.
"""

from __future__ import annotations

import numpy as np


def chunk_lengths(length: int, chunks: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths (int64, all >= 1, summing to `length`) of min(chunks, length) chunks."""
    n = min(chunks, length)
    if n == 1:
        return np.asarray([length], np.int64)
    if n == 2:
        first = int(rng.integers(1, (length + 1) // 2 + 1))
        return np.asarray([first, length - first], np.int64)
    cuts = np.sort(rng.choice(np.arange(1, length), size=n - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [length]])).astype(np.int64)


def skip_biases(count: int, room: int, rng: np.random.Generator) -> np.ndarray:
    """u_0 = 0, then u_i uniform on {u_{i-1}, ..., room} (int64, non-decreasing)."""
    u = np.zeros(count, np.int64)
    for i in range(1, count):
        u[i] = rng.integers(u[i - 1], room + 1)
    return u


def pose_positions(length: int, target_length: int, rng: np.random.Generator, chunks: int = 2) -> np.ndarray:
    """PoSE position ids (int32 [length]) of one window of `length` tokens covering `target_length`."""
    if length < 1 or target_length < length:
        raise ValueError(f"PoSE: expected 1 <= window length {length} <= target length {target_length}")
    lengths = chunk_lengths(length, chunks, rng)
    u = skip_biases(len(lengths), target_length - length, rng)
    return (np.arange(length) + np.repeat(u, lengths)).astype(np.int32)


def pieces(segment_ids_L) -> list[tuple[int, int]]:
    """(start, stop) of every run of one nonzero segment id."""
    seg = np.asarray(segment_ids_L)
    edges = np.flatnonzero(np.diff(seg)) + 1
    starts, stops = np.concatenate([[0], edges]), np.concatenate([edges, [len(seg)]])
    return [(int(a), int(b)) for a, b in zip(starts, stops) if seg[a] != 0]


class PoseSkip:
    """Row -> the same row with PoSE positions in every piece (a grain random map)."""

    def __init__(self, target_length: int, chunks: int = 2):
        if isinstance(target_length, bool) or not isinstance(target_length, int) or target_length < 1:
            raise ValueError(f"pose_target_length={target_length!r}: expected a positive integer")
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"pose_chunks={chunks!r}: expected a positive integer")
        self.target_length, self.chunks = target_length, chunks

    def __call__(self, row: dict, rng: np.random.Generator) -> dict:
        positions = np.array(row["positions"], np.int32)
        for start, stop in pieces(row["segment_ids"]):
            positions[start:stop] = pose_positions(stop - start, self.target_length, rng, self.chunks)
        return {**row, "positions": positions}
