"""The models' fp32 matmuls alone: XLA:CPU (jax.jit) against torch on the same arrays, one process.

Which side is faster depends on the CPU (XLA:CPU's own kernels against torch's oneDNN), and the train
step and forward ratios in README follow it. Shapes: SmolLM2-135M at 8192 tokens (projections, MLP,
the tied LM head) and the ~58M train step's MLP and head. Sides alternate in blocks (train_step.py).

    python benchmarks/matmul.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import longrope_jax  # noqa: E402, F401  first: keeps jax from probing for a TPU on a CPU host with libtpu
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from train_step import alternate  # noqa: E402

SHAPES = {  # name: (M, K, N) of [M, K] x [K, N]
    "smollm2 q/o proj": (8192, 576, 576),
    "smollm2 k/v proj": (8192, 576, 192),
    "smollm2 gate/up": (8192, 576, 1536),
    "smollm2 down": (8192, 1536, 576),
    "smollm2 lm head": (8192, 576, 49152),
    "58m gate/up": (2048, 512, 1536),
    "58m lm head": (2048, 512, 32000),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    matmul = jax.jit(jnp.matmul)
    rng = np.random.default_rng(0)
    for name, (m, k, n) in SHAPES.items():
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        ours, theirs = alternate(lambda: matmul(ja, jb).block_until_ready(), lambda: ta @ tb, args.steps, block=2)
        jax_s, torch_s = float(np.median(ours)), float(np.median(theirs))
        print(json.dumps({"bench": "matmul", "shape": name, "mkn": [m, k, n], "jax_ms": round(jax_s * 1e3, 2),
                          "torch_ms": round(torch_s * 1e3, 2), "jax_gflops": round(2 * m * k * n / jax_s / 1e9, 1),
                          "torch_gflops": round(2 * m * k * n / torch_s / 1e9, 1),
                          "speedup_vs_torch": round(torch_s / jax_s, 2)}), flush=True)


if __name__ == "__main__":
    main()
