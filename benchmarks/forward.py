"""Forward-pass throughput of the Flax LLaMA against transformers' LlamaForCausalLM, same weights.

Prints one JSON line per (rope type, length): tokens/s of each and their ratio, plus the max relative
logit difference, so speed is never reported for a model that disagrees with the peer. The two sides
alternate run by run (best of `--repeats` each), so load from other processes falls on both alike.

    python benchmarks/forward.py [--layers 4 --hidden 256 --lengths 256,1024 --repeats 5]
    python benchmarks/forward.py --arch smollm2-135m --lengths 8192,16384 --repeats 1

`--arch smollm2-135m` is the SmolLM2-135M architecture (30 layers, hidden 576, 9 heads, 3 kv heads,
intermediate 1536, vocabulary 49152, tied embeddings, rope_theta 1e5) with random weights, default
RoPE, against transformers with SDPA attention. Its 16k row takes minutes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import longrope_jax  # noqa: F401  first: keeps jax from probing for a TPU on a CPU host with libtpu
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


def best_times(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Best of `repeats` runs of each, the two alternating run by run."""
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(times_a), min(times_b)


def hf_configs(args):
    """(name, transformers.LlamaConfig) pairs to compare."""
    if args.arch == "smollm2-135m":
        yield "default", transformers.LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
            max_position_embeddings=8192, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
        )
        return
    for name, rope in ROPES.items():
        yield name, transformers.LlamaConfig(
            vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 64,
            max_position_embeddings=1024, rope_scaling=rope, attn_implementation="sdpa",
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--arch", choices=["small", "smollm2-135m"], default="small")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    for name, cfg in hf_configs(args):
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            config, params = load_hf(tmp)
        forward = jax.jit(lambda p, t: Llama(config).apply({"params": p}, t))
        for length in map(int, args.lengths.split(",")):
            tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, length))
            t_tokens, j_tokens = torch.as_tensor(tokens), jnp.asarray(tokens)
            compile_start = time.perf_counter()
            forward.lower(params, j_tokens).compile()
            compile_s = time.perf_counter() - compile_start
            ours = np.asarray(forward(params, j_tokens).block_until_ready())
            ref = hf(t_tokens).logits.numpy()
            diff = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
            del ours, ref
            jax_s, torch_s = best_times(lambda: forward(params, j_tokens).block_until_ready(), lambda: hf(t_tokens),
                                        args.repeats)
            n = args.batch * length
            print(json.dumps({
                "bench": "forward", "rope": name, "length": length, "batch": args.batch, "layers": cfg.num_hidden_layers,
                "hidden": cfg.hidden_size, "device": jax.devices()[0].platform,
                "jax_tokens_per_s": round(n / jax_s), "torch_tokens_per_s": round(n / torch_s),
                "speedup_vs_transformers": round(torch_s / jax_s, 2), "jax_compile_s": round(compile_s, 2),
                "max_rel_logit_diff": diff, "arch": args.arch, "jax_s": round(jax_s, 2), "torch_s": round(torch_s, 2),
            }), flush=True)


if __name__ == "__main__":
    main()
