"""Search fitness throughput: candidates evaluated per second with traced factors (one compile for the
whole search, `candidates_per_call` candidates per call) against the peer that bakes each candidate's
factors into a freshly jitted function (a recompile per candidate, what a naive port does).

Both compute the same perplexity (checked: the JSON line carries the largest relative difference). Prints
one JSON line per mode and a summary line with the ratio and compile counts.

    python benchmarks/search.py [--candidates 64 --baked 8 --candidates-per-call 4 --docs 5]
"""

from __future__ import annotations

import argparse
import json
import time

import longrope_jax  # noqa: F401  first: keeps jax from probing for a TPU on a CPU host with libtpu
import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax.model import Llama, LlamaConfig, init_params
from longrope_jax.rope import RopeScaling
from longrope_jax.search.fitness import PerplexityEvaluator

ORIG, TARGET = 64, 256


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=ORIG, bos_token_id=256, eos_token_id=257)


def baked_perplexity(config, params, windows, factors, traces: list) -> float:
    """The peer: λ is a constant of a new jitted function, so every candidate traces and compiles."""
    scaling = RopeScaling("longrope", short_factor=tuple(factors), long_factor=tuple(factors),
                          original_max_position_embeddings=ORIG, factor=TARGET / ORIG)

    @jax.jit
    def nll_sums(params, windows_NxL):
        traces.append(1)

        def window_nll(window_L):
            logits_LxV = Llama(config).apply({"params": params}, window_L[None], rope_scaling=scaling)[0, :-1]
            picked = jnp.take_along_axis(logits_LxV, window_L[1:, None], axis=-1)[:, 0]
            return jnp.sum(jax.nn.logsumexp(logits_LxV, axis=-1) - picked)

        return jax.lax.map(window_nll, windows_NxL)

    sums = np.asarray(nll_sums(params, windows), np.float64)
    return float(np.exp(sums.sum() / (windows.shape[0] * (windows.shape[1] - 1))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=64, help="candidates timed on the traced path")
    ap.add_argument("--baked", type=int, default=8, help="candidates timed on the recompiling path")
    ap.add_argument("--candidates-per-call", type=int, default=4)
    ap.add_argument("--docs", type=int, default=5)
    args = ap.parse_args()

    config = tiny_config()
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 256, (args.docs, TARGET)).astype(np.int32)
    windows[:, 0] = 256  # BOS
    factors = np.round(np.sort(rng.uniform(1.0, 5.0, (args.candidates + 1, 8)), axis=1), 2)
    device = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"

    common = {"bench": "search_fitness", "device": device, "docs": args.docs, "length": TARGET,
              "model": "2 layers x 64, head_dim 16"}
    rates = {}
    for c in sorted({1, args.candidates_per_call}):
        evaluator = PerplexityEvaluator(config, params, windows, original_length=ORIG, target_length=TARGET,
                                        candidates_per_call=c)
        start = time.perf_counter()
        evaluator(factors[:c])  # compile + the first call
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        traced = evaluator(factors[1: 1 + args.candidates])
        traced_s = time.perf_counter() - start
        rates[c] = (args.candidates / traced_s, compile_s, evaluator.traces)
        print(json.dumps({**common, "mode": "traced", "candidates_per_call": c, "candidates": args.candidates,
                          "seconds": round(traced_s, 4), "candidates_per_s": round(rates[c][0], 2),
                          "first_call_s": round(compile_s, 3), "compiles": evaluator.traces}), flush=True)

    traces: list = []
    start = time.perf_counter()
    baked = [baked_perplexity(config, params, jnp.asarray(windows), f, traces) for f in factors[1: 1 + args.baked]]
    baked_s = time.perf_counter() - start
    baked_rate = args.baked / baked_s
    diff = float(np.max(np.abs(np.asarray(baked) - traced[: args.baked]) / np.asarray(baked)))
    print(json.dumps({**common, "mode": "recompile", "candidates": args.baked, "seconds": round(baked_s, 4),
                      "candidates_per_s": round(baked_rate, 2), "compiles": len(traces),
                      "max_rel_diff_vs_traced": diff}), flush=True)
    traced_rate, compile_s, compiles = rates[args.candidates_per_call]
    # Including its one compile, the traced path's rate over a search of the paper's size (64 + 40 x 32).
    search_size = 64 + 40 * 32
    with_compile = search_size / (compile_s + search_size / traced_rate)
    print(json.dumps({**common, "mode": "summary", "candidates_per_call": args.candidates_per_call,
                      "speedup": round(traced_rate / baked_rate, 1),
                      "speedup_one_per_call": round(rates[1][0] / baked_rate, 1),
                      "speedup_incl_compile_over_paper_search": round(with_compile / baked_rate, 1),
                      "compiles_traced": compiles, "compiles_recompile": len(traces)}), flush=True)

if __name__ == "__main__":
    main()
