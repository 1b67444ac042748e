"""The search's fitness: perplexity of a LongRoPE candidate on a few fixed long documents.

As in microsoft/LongRoPE's search (`--samples 5 --truncate`): each document gives one window, BOS
followed by its first `length - 1` tokens, and perplexity is exp of the mean next-token NLL over all
windows' tokens (every window has the same length, so this is also the mean of per-window means).

`PerplexityEvaluator` compiles the model once for the whole search: λ and n̂ are traced inputs, several
candidates go through one call with `jax.vmap`, and the windows and parameters sit on the device from
the start. `traces` counts how often the jitted function was traced (1 after any number of calls).
With a score mask (LongRoPE2's needle-driven perplexity, search/needle.py) only the marked tokens count:
perplexity is exp of their mean NLL, from the same chunked loss (no [B, L, V] logits).
On a mesh each (candidate, window) pair is one sequence split over every device (`sequence_rules`),
attended with the ring, one pair after another; the parameters stay sharded by their logical names.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax import attention as attn_lib
from longrope_jax.loss import masked_nll, next_token_targets, perplexity, sum_nll
from longrope_jax.model import Llama, LlamaConfig
from longrope_jax.rope import RopeScaling
from longrope_jax.sharding.init import param_shardings
from longrope_jax.sharding.rules import DEFAULT_RULES, sequence_rules


def eval_windows(documents, tokenizer, length: int, count: int) -> np.ndarray:
    """int32 [count, length]: BOS + the first `length - 1` tokens of the first `count` documents (in
    source order) that have at least `length` tokens."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"docs: expected a positive integer, got {count!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"eval length: expected an integer >= 2, got {length!r}")
    rows = []
    for doc in documents:
        ids = tokenizer.encode(doc)
        if len(ids) >= length:
            rows.append([tokenizer.bos_id] + list(ids[: length - 1]))
            if len(rows) == count:
                return np.asarray(rows, np.int32)
    raise ValueError(f"perplexity: needs {count} documents of >= {length} tokens, found {len(rows)} "
                     f"(ask for fewer documents, shorter windows or another corpus)")


class PerplexityEvaluator:
    """`evaluator(factors_CxD, start_tokens_C) -> perplexity[C]` (float64 numpy) for C candidates.

    Every candidate is evaluated with `RopeScaling(longrope, short_factor = long_factor = λ,
    original_max_position_embeddings=original_length, factor=target_length/original_length)`, so the
    model uses λ whichever side of the original length the windows are, and the attention scale is the
    one the exported rope_scaling gives. n̂ is traced when `search_start_tokens`, else the fixed
    `start_tokens` (0 skips the start-token path entirely). Calls go `candidates_per_call` at a time;
    a short last chunk is padded with copies, so every call has the same shapes.

    `score_mask_NxL` (bool, the windows' shape) marks the tokens whose NLL is scored (token j is predicted
    at position j - 1; BOS cannot be scored); None scores every token after BOS.
    """

    def __init__(self, config: LlamaConfig, params, windows_NxL, *, original_length: int, target_length: int,
                 candidates_per_call: int = 4, search_start_tokens: bool = False, start_tokens: int = 0,
                 mesh=None, rules=None, score_mask_NxL=None):
        if isinstance(candidates_per_call, bool) or not isinstance(candidates_per_call, int) or candidates_per_call < 1:
            raise ValueError(f"candidates_per_call: expected a positive integer, got {candidates_per_call!r}")
        self.config = config
        self.d_half = config.rope_scaling.rotary_dim(config.head_dim) // 2
        self.candidates_per_call = candidates_per_call
        self.search_start_tokens = search_start_tokens
        self.base = RopeScaling(
            "longrope", short_factor=(1.0,) * self.d_half, long_factor=(1.0,) * self.d_half,
            original_max_position_embeddings=original_length, factor=target_length / original_length,
            start_tokens=0 if search_start_tokens else start_tokens,
            partial_rotary_factor=config.rope_scaling.partial_rotary_factor,
        )
        self.traces = 0
        self.mesh, self.model = mesh, Llama(config)
        if mesh is not None:
            self.model = Llama(config, mesh=mesh, rules=sequence_rules(rules or DEFAULT_RULES, mesh.shape, 1))
            if attn_lib.seq_shards(mesh, self.model.rules) > 1:
                self.model = self.model.clone(config=dataclasses.replace(config, attention="ring"))
        # (params, factors_CxD, start_tokens_C, windows_NxL[, score_mask_NxL]) -> NLL sums [N, C]
        self.jitted = jax.jit(self._nll_sums)
        self.score_mask = None
        if windows_NxL is None:  # ahead-of-time compiles use `jitted` alone
            self.windows = self.params = None
            return
        windows = np.asarray(windows_NxL)
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise ValueError(f"eval windows: expected int [docs, length >= 2], got shape {windows.shape}")
        if windows.min() < 0 or windows.max() >= config.vocab_size:
            raise ValueError(f"eval windows: token ids span {windows.min()}..{windows.max()}; expected ids below the "
                             f"model's vocab_size {config.vocab_size} (wrong tokenizer?)")
        self.check_length(windows.shape[1])
        self.scored_tokens = windows.shape[0] * (windows.shape[1] - 1)  # predicted tokens: all but BOS
        if score_mask_NxL is not None:
            mask = np.asarray(score_mask_NxL)
            if mask.shape != windows.shape or mask.dtype != np.bool_:
                raise ValueError(f"score mask: expected bool of the windows' shape {windows.shape}, got "
                                 f"{mask.dtype} {mask.shape}")
            if mask[:, 0].any() or not mask.any(axis=1).all():
                raise ValueError("score mask: every window must score at least one token, and never its first")
            self.scored_tokens = int(mask.sum())
            self.score_mask = jax.device_put(jnp.asarray(mask))
        self.windows = jax.device_put(jnp.asarray(windows, jnp.int32))  # once: every call reuses them
        self.params = jax.device_put(params, None if mesh is None else param_shardings(config, mesh, self.model.rules))

    def check_length(self, length: int) -> None:
        """On a mesh the ring needs whole attention chunks on every device."""
        shards = attn_lib.seq_shards(self.mesh, self.model.rules) if self.mesh is not None else 1
        local, chunk = -(-length // shards), self.config.attention_chunk
        if length % shards or (local > chunk and local % chunk):
            raise ValueError(f"search length {length}: on this mesh it is split into {shards} pieces, each of "
                             f"which must be a whole number of attention chunks ({chunk}) or at most one")

    def _nll_sums(self, params, factors_CxD, start_tokens_C, windows_NxL, score_mask_NxL=None):
        self.traces += 1  # runs only while tracing: counts compilations
        model = self.model

        def window_nll(factors_D, start_tokens, window_L, scored_L):
            n_hat = start_tokens if self.search_start_tokens else self.base.start_tokens
            scaling = dataclasses.replace(self.base, short_factor=factors_D, long_factor=factors_D, start_tokens=n_hat)
            tokens_1xL = window_L[None]
            batch = {"tokens": tokens_1xL, "positions": jnp.arange(tokens_1xL.shape[1])[None],
                     "segment_ids": jnp.ones_like(tokens_1xL)}
            if scored_L is None:
                return sum_nll(model, params, batch, rope_scaling=scaling)[0]
            targets_1xL, mask_1xL = next_token_targets(batch["tokens"], batch["segment_ids"])
            # position t predicts token t + 1: shift the scored-token mask one to the left
            predicts_scored_1xL = jnp.concatenate([scored_L[1:], jnp.zeros((1,), bool)])[None]
            nll_1xL = masked_nll(model, params, batch, targets_1xL, mask_1xL & predicts_scored_1xL, rope_scaling=scaling)
            return jnp.sum(nll_1xL)

        if self.mesh is None:
            per_candidate = jax.vmap(window_nll, in_axes=(0, 0, None, None))
        else:  # each pair is already spread over the whole mesh
            per_candidate = lambda f_CxD, s_C, w, m: jax.lax.map(lambda fs: window_nll(*fs, w, m), (f_CxD, s_C))
        # One window at a time keeps memory at one window's activations however many documents there are.
        return jax.lax.map(lambda wm: per_candidate(factors_CxD, start_tokens_C, *wm),
                           (windows_NxL, score_mask_NxL))  # [N, C]

    def window_sums(self, factors_CxD, start_tokens_C=None) -> np.ndarray:
        """Scored-token NLL sums per window and candidate, [N, C] float64."""
        factors = np.asarray(factors_CxD, np.float32)
        if factors.ndim != 2 or factors.shape[1] != self.d_half:
            raise ValueError(f"factors: expected shape [candidates, {self.d_half}], got {factors.shape}")
        count = factors.shape[0]
        start = np.zeros(count, np.int32) if start_tokens_C is None else np.asarray(start_tokens_C, np.int32)
        if start.shape != (count,):
            raise ValueError(f"start_tokens: expected shape [{count}], got {start.shape}")
        out = []
        c = self.candidates_per_call
        for i in range(0, count, c):
            f, s = factors[i: i + c], start[i: i + c]
            pad = c - len(f)
            if pad:
                f = np.concatenate([f, np.repeat(f[-1:], pad, 0)])
                s = np.concatenate([s, np.repeat(s[-1:], pad, 0)])
            args = (self.params, jnp.asarray(f), jnp.asarray(s), self.windows)
            if self.score_mask is not None:
                args += (self.score_mask,)
            out.append(np.asarray(self.jitted(*args), np.float64)[:, : c - pad])
        return np.concatenate(out, axis=1)

    def __call__(self, factors_CxD, start_tokens_C=None) -> np.ndarray:
        out = [self.window_sums(factors_CxD, start_tokens_C).sum(0)]
        ppl = perplexity(np.concatenate(out) / self.scored_tokens)
        return np.where(np.isnan(ppl), math.inf, ppl)  # a NaN candidate ranks last
