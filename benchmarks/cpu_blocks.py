"""CPU attention against torch SDPA on the same shapes: the C++ kernel (`flash_attention`, what the
model runs on one CPU device) and XLA blockwise attention at each block size (the sweep behind
`attention.cpu_blocks`, the fallback where the kernel cannot run).

For each shape (batch, length, heads, kv heads, head_dim) it times one causal attention layer,
forward or forward + backward (d(sum(o^2))/d(q, k, v)): the kernel (`kernel`), blockwise with square
blocks of 64 to 512 tokens, and torch's `scaled_dot_product_attention` (causal, GQA) on the same
tensors, in one process. The sides
alternate round by round and each reports its median, so load from other processes falls on all alike.
Each line printed is one JSON object; `chosen` is what `cpu_blocks` picks for that shape.

    python benchmarks/cpu_blocks.py [--shapes 16x256x4x2x32,2x1024x8x4x64] [--mode grad] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import longrope_jax  # noqa: F401  first: keeps jax from probing for a TPU on a CPU host with libtpu
import jax
import jax.numpy as jnp
import numpy as np
import torch

from longrope_jax import attention as attn

SHAPES = "16x256x4x2x32,2x1024x8x4x64,1x4096x9x3x64"
BLOCKS = (64, 128, 256, 512)


def _median_ms(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def sweep(b: int, length: int, heads: int, kv_heads: int, head_dim: int, mode: str, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((b, length, heads, head_dim), (b, length, kv_heads, head_dim), (b, length, kv_heads, head_dim)))
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    seg = jnp.ones((b, length), jnp.int32)

    def program(block: int | None):
        def attend(q, k, v):
            if block is None:
                return attn.flash_attention(q, k, v, pos, pos, seg, seg)
            return attn.blockwise_attention(q, k, v, pos, pos, seg, seg, chunk=block, q_chunk=block)
        if mode == "grad":
            return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))
        return jax.jit(attend)

    runs = {}
    if attn.cpu_kernel.supports(q, k):
        fn = program(None)
        jax.block_until_ready(fn(q, k, v))
        runs["kernel"] = lambda fn=fn: jax.block_until_ready(fn(q, k, v))
    for block in BLOCKS:
        if block <= length and not length % block:
            fn = program(block)
            jax.block_until_ready(fn(q, k, v))  # compile
            runs[str(block)] = lambda fn=fn: jax.block_until_ready(fn(q, k, v))
    tq, tk, tv = (torch.tensor(np.asarray(x)).transpose(1, 2).requires_grad_(mode == "grad") for x in (q, k, v))

    def torch_run():
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
        if mode == "grad":
            (o ** 2).sum().backward()

    runs["torch"] = torch_run
    torch_run()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(_median_ms(fn))
    return {"bench": "cpu_blocks", "shape": f"{b}x{length}x{heads}x{kv_heads}x{head_dim}", "mode": mode,
            "ms": {name: round(float(np.median(t)), 1) for name, t in times.items()},
            "chosen": attn.cpu_blocks(length, b * heads)[1], "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated BxLxHxKxD")
    ap.add_argument("--mode", choices=("fwd", "grad"), default="grad")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for shape in args.shapes.split(","):
        print(json.dumps(sweep(*(int(x) for x in shape.split("x")), args.mode, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
