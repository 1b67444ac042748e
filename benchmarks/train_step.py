"""Train-step throughput (forward + backward + AdamW) against transformers + torch.optim.AdamW.

Same config, same batch, same optimizer settings, one process, this CPU. FLOPs are counted the MaxText
way: 6 * N * T for the matmuls (embedding gather excluded) plus causal attention
3 * layers * 4 * B * S^2 * H * D / 2. Peak is this machine's measured float32 matmul rate (the best
of jax and torch on a 4096^3 matmul), so "fraction of peak" is an MFU analogue for this CPU. The two
sides alternate in blocks of steps and each reports its median step, so load from other processes on a
shared CPU falls on both alike.

    python benchmarks/train_step.py [--sizes tiny,50m] [--steps 5]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import longrope_jax  # noqa: E402, F401  first: keeps jax from probing for a TPU on a CPU host with libtpu
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from longrope_jax.model import Llama, LlamaConfig, init_params  # noqa: E402
from longrope_jax.train.steps import TrainState, train_step

SIZES = {
    # the tiny_cpu demo model (byte vocabulary), context 256
    "tiny": dict(vocab_size=264, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, seq=256, batch=16),
    # ~50M parameters at sequence 1024
    "50m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64, seq=1024, batch=2),
}


def matmul_peak(n: int = 4096) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(3):
        f(a).block_until_ready()
    jax_rate = 3 * 2 * n**3 / (time.perf_counter() - start)
    t = torch.ones(n, n)
    t @ t
    start = time.perf_counter()
    for _ in range(3):
        t @ t
    torch_rate = 3 * 2 * n**3 / (time.perf_counter() - start)
    return max(jax_rate, torch_rate)


def alternate(a, b, steps: int, block: int = 4) -> tuple[list[float], list[float]]:
    """Times of `steps` calls of each, in alternating blocks of `block` + 1 calls whose first is not timed.
    Alternating spreads load from other processes on a shared CPU over both sides; whole blocks, because
    the first step after a switch ran slower (jax's ~58M step by ~25%, measured): the other side's
    threads and caches were still busy."""
    times: tuple[list[float], list[float]] = ([], [])
    while len(times[1]) < steps:
        for f, out in zip((a, b), times):
            f()
            for _ in range(min(block, steps - len(out))):
                start = time.perf_counter()
                f()
                out.append(time.perf_counter() - start)
    return times


def flops_per_step(cfg: dict, n_params: int, embed_params: int) -> float:
    tokens = cfg["batch"] * cfg["seq"]
    attention = 3 * cfg["num_hidden_layers"] * 4 * cfg["batch"] * cfg["seq"] ** 2 * (
        cfg["num_attention_heads"] * cfg["head_dim"]) / 2
    return 6 * (n_params - embed_params) * tokens + attention


def bench(name: str, steps: int, peak: float) -> dict:
    spec = dict(SIZES[name])
    seq, batch = spec.pop("seq"), spec.pop("batch")
    hf_cfg = transformers.LlamaConfig(**spec, max_position_embeddings=seq, tie_word_embeddings=False,
                                      rms_norm_eps=1e-5, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    config = LlamaConfig(**spec, max_position_embeddings=seq, rms_norm_eps=1e-5)
    params = init_params(config, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, spec["vocab_size"], (batch, seq))
    lr, wd = 1e-4, 0.1

    # --- longrope_jax
    tx = optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=wd)
    state = TrainState.create(params, tx, jax.random.key(1))
    step = jax.jit(functools.partial(train_step, model=Llama(config), tx=tx, lr_fn=lambda s: lr), donate_argnums=0)
    batch_j = {"tokens": jnp.asarray(tokens, jnp.int32), "positions": jnp.broadcast_to(jnp.arange(seq), (batch, seq)),
               "segment_ids": jnp.ones((batch, seq), jnp.int32)}
    state, m = step(state, batch_j)
    jax.block_until_ready(m)

    # --- transformers + torch.optim.AdamW
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=wd)
    t_tokens = torch.as_tensor(tokens)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = hf(t_tokens, labels=t_tokens).loss
        loss.backward()
        opt.step()

    torch_step()

    def jax_step():
        nonlocal state
        state, m = step(state, batch_j)
        jax.block_until_ready(m)

    jax_times, torch_times = alternate(jax_step, torch_step, steps)
    jax_s, torch_s = float(np.median(jax_times)), float(np.median(torch_times))

    n_params = sum(x.size for x in jax.tree.leaves(params))
    flops = flops_per_step({**spec, "seq": seq, "batch": batch}, n_params, spec["vocab_size"] * spec["hidden_size"])
    return {
        "bench": "train_step", "size": name, "params": n_params, "seq": seq, "batch": batch,
        "jax_tokens_per_s": round(batch * seq / jax_s), "torch_tokens_per_s": round(batch * seq / torch_s),
        "speedup_vs_torch": round(torch_s / jax_s, 2),
        "jax_tflops": round(flops / jax_s / 1e12, 4), "peak_matmul_tflops": round(peak / 1e12, 4),
        "jax_fraction_of_peak": round(flops / jax_s / peak, 3), "torch_fraction_of_peak": round(flops / torch_s / peak, 3),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,50m")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    peak = matmul_peak()
    for name in args.sizes.split(","):
        print(json.dumps(bench(name, args.steps, peak)), flush=True)


if __name__ == "__main__":
    main()
