"""Passkey retrieval on a length x depth grid.

The landmark-attention template (`data.passkey`, token-exact lengths); the trials of a cell go
through one greedy `generate` call of 10 tokens, and a hit is a completion whose first integer
equals the key. Keys come from a numpy Generator seeded by (seed, length, depth), so every method
sees the same keys.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from longrope_jax.data import passkey
from longrope_jax.eval.perplexity import check_int
from longrope_jax.generate import check_ids_fit, place_params
from longrope_jax.model import LlamaConfig

PASSKEY_NEW_TOKENS = 10  # as the landmark / YaRN / LongRoPE scripts


def depth_grid(depths) -> list:
    """A count n gives linspace(0, 1, n) (n = 1: the middle); a sequence is taken as given."""
    if isinstance(depths, (int, np.integer)) and not isinstance(depths, bool):
        check_int("passkey depths", depths, 1)
        return [0.5] if depths == 1 else [float(x) for x in np.linspace(0.0, 1.0, int(depths))]
    return [float(x) for x in depths]


def passkey_cells(tokenizer, *, lengths, depths, trials: int, seed: int = 0) -> list:
    """[(length, depth, keys[T], prompts int32 [T, length])] for the grid; every prompt is built here, so a
    bad length fails before anything compiles."""
    check_int("passkey trials", trials, 1)
    cells = []
    for length in lengths:
        check_int("passkey length", length, 2)
        for depth in depth_grid(depths):
            # Seeded by the cell, not its place in the grid: the same keys whatever else is asked for.
            rng = np.random.default_rng([seed, length, round(depth * 1e6)])
            keys = passkey.draw_keys(rng, trials)
            prompts = np.asarray([passkey.build_prompt(tokenizer, length, depth, int(k)) for k in keys], np.int32)
            cells.append((length, depth, keys, prompts))
    return cells


def score_passkey(completions, keys) -> list:
    """Hits: the first integer of each completion equals its key (no digits is a miss)."""
    return [passkey.first_integer(c) == int(k) for c, k in zip(completions, keys, strict=True)]


def evaluate_passkey(config: LlamaConfig, params, tokenizer, *, lengths, depths=5, trials: int = 10, methods=None,
                     seed: int = 0, max_new_tokens: int = PASSKEY_NEW_TOKENS, samples: int = 3,
                     progress: bool = False, generate_fn=None, mesh=None, rules=None) -> list:
    """Rows {method, length, depth, trials, correct, accuracy, samples} for every method x length x depth.

    The trials of a cell go through one greedy `generate` call; the completion is decoded up to EOS.
    `generate_fn` stands in for `generate.generate` (same signature). On a `mesh` each prompt and its KV
    cache are split over the devices (see `generate.prefill`), so 128k prompts fit a slice.
    """
    if generate_fn is None:
        from longrope_jax.generate import generate as generate_fn
    methods = {"model": None} if methods is None else dict(methods)
    cells = passkey_cells(tokenizer, lengths=lengths, depths=depths, trials=trials, seed=seed)
    check_ids_fit(config, max(int(c[3].max()) for c in cells), "passkey prompts")
    eos = tokenizer.eos_id
    placement = {} if mesh is None else {"mesh": mesh, "rules": rules}
    params = place_params(config, params, mesh, rules)  # once, not at every call
    rows = []
    with tqdm(total=len(methods) * len(cells), desc="passkey", disable=not progress) as bar:
        for name, scaling in methods.items():
            for length, depth, keys, prompts in cells:
                out = np.asarray(generate_fn(config, params, prompts, max_new_tokens, rope_scaling=scaling,
                                             temperature=0.0, eos_id=eos, **placement))
                completions = [tokenizer.decode(_until(row, eos)) for row in out]
                hits = score_passkey(completions, keys)
                shown = [{"key": int(k), "completion": c} for k, c in zip(keys[:samples], completions)]
                rows.append({"method": name, "length": int(length), "depth": float(depth), "trials": len(keys),
                             "correct": int(sum(hits)), "accuracy": float(np.mean(hits)), "samples": shown})
                bar.update(1)
    return rows


def _until(ids, eos_id) -> list:
    ids = [int(i) for i in ids]
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids
