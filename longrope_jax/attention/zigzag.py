"""The load-balanced (zig-zag) ring layout, and the causal work it balances."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def zigzag_indices(length: int, shards: int) -> np.ndarray:
    """Token order that gives every ring device equal causal work.

    The sequence is cut into 2*shards chunks; device i holds chunks i and 2*shards-1-i (one early,
    one late), e.g. shards=2: [0,1,2,3] -> [0,3 | 1,2]. `x[:, idx]` reorders; `unzigzag` undoes it.
    """
    if length % (2 * shards):
        raise ValueError(f"zig-zag layout: length {length} is not a multiple of 2 x seq shards ({2 * shards})")
    c = length // (2 * shards)
    order = [j for i in range(shards) for j in (i, 2 * shards - 1 - i)]
    return np.concatenate([np.arange(j * c, (j + 1) * c) for j in order])


def zigzag(x, shards: int, axis: int = 1):
    return jnp.take(x, jnp.asarray(zigzag_indices(x.shape[axis], shards)), axis=axis)


def unzigzag(x, shards: int, axis: int = 1):
    inverse = np.argsort(zigzag_indices(x.shape[axis], shards))
    return jnp.take(x, jnp.asarray(inverse), axis=axis)


def causal_work(length: int, shards: int, balanced: bool, chunk: int | None = None) -> np.ndarray:
    """[ring step, device]: (query chunk, key chunk) pairs each device computes for one causal sequence.

    Mirrors the kernel's skip rule: a pair is computed unless every key lies after every query.
    """
    chunk = chunk or length // (2 * shards)
    positions = zigzag_indices(length, shards) if balanced else np.arange(length)
    local = positions.reshape(shards, -1)
    q_last = local.reshape(shards, -1, chunk).max(-1)  # [device, q chunk]
    k_first = local.reshape(shards, -1, chunk).min(-1)  # [device, k chunk]
    work = np.zeros((shards, shards), int)
    for step in range(shards):
        for dev in range(shards):
            src = (dev - step) % shards  # the K/V block that visits `dev` at this step
            work[step, dev] = int((k_first[src][None, :] <= q_last[dev][:, None]).sum())
    return work


def causal_blocks_per_device(length: int, shards: int, balanced: bool, chunk: int | None = None) -> np.ndarray:
    """Total chunk pairs per ring device for one causal sequence."""
    return causal_work(length, shards, balanced, chunk).sum(0)


def causal_critical_path(length: int, shards: int, balanced: bool, chunk: int | None = None) -> int:
    """Chunk pairs on the slowest device summed over ring steps: what truly parallel devices wait for,
    since they hand K/V on together at every step."""
    return int(causal_work(length, shards, balanced, chunk).max(1).sum())
