"""Forward-pass throughput of the Flax LLaMA against transformers' LlamaForCausalLM, same weights.

Prints one JSON line per (rope type, length): tokens/s of each and their ratio, plus the max relative
logit difference, so speed is never reported for a model that disagrees with the peer.

    python benchmarks/forward.py [--layers 4 --hidden 256 --lengths 256,1024 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from longrope_jax.io.hf import load_hf
from longrope_jax.model import Llama

ROPES = {
    "default": None,
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 256,
                 "short_factor": [1.0] * 16, "long_factor": [1.0 + 0.2 * i for i in range(16)]},
}


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    for name, rope in ROPES.items():
        cfg = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 64,
            max_position_embeddings=1024, rope_scaling=rope,
        )
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            config, params = load_hf(tmp)
        forward = jax.jit(lambda p, t: Llama(config).apply({"params": p}, t))
        for length in map(int, args.lengths.split(",")):
            tokens = np.random.default_rng(0).integers(0, 32000, (args.batch, length))
            t_tokens, j_tokens = torch.as_tensor(tokens), jnp.asarray(tokens)
            compile_start = time.perf_counter()
            ours = forward(params, j_tokens).block_until_ready()
            compile_s = time.perf_counter() - compile_start
            ref = hf(t_tokens).logits.numpy()
            jax_s = best_time(lambda: forward(params, j_tokens).block_until_ready(), args.repeats)
            torch_s = best_time(lambda: hf(t_tokens), args.repeats)
            n = args.batch * length
            print(json.dumps({
                "bench": "forward", "rope": name, "length": length, "batch": args.batch, "layers": args.layers,
                "hidden": args.hidden, "device": jax.devices()[0].platform,
                "jax_tokens_per_s": round(n / jax_s), "torch_tokens_per_s": round(n / torch_s),
                "speedup_vs_transformers": round(torch_s / jax_s, 2), "jax_compile_s": round(compile_s, 2),
                "max_rel_logit_diff": float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref))),
            }), flush=True)


if __name__ == "__main__":
    main()
