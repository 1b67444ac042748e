"""Long-document perplexity with a sliding window, several RoPE settings and lengths in one sweep.

The protocol is `yarn/eval/perplexity.py::compute_perplexity` (PI's, copied by LongRoPE): windows
begin at 0, stride, 2 stride, ...; a window is BOS + `ids[begin : begin + L - 1]` and only its last
`end - prev_end` tokens are scored, so every token is scored once with as much left context as the
window allows; the loop stops when a window reaches the end of the document. `ppl_window_mean` is exp
of the mean of per-window mean NLLs (the papers' number: a short last window weighs as much as a full
one); `ppl_token` is exp of the token-weighted mean. `truncate=True` is the cheap mode: one window
per document, its first L - 1 tokens.

Windows are padded to L (pads: segment 0, position 0, never attended by real tokens), so each
(method, length) compiles once. Dynamic NTK and LongRoPE take their frequencies from the longest
position in the forward pass (as HF does), so for them a batch holds windows of one real length
only, topped up with empty rows whose positions are all 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from longrope_jax import attention as attn_lib
from longrope_jax.loss import masked_nll, perplexity
from longrope_jax.model import Llama, LlamaConfig
from longrope_jax.rope import RopeScaling
from longrope_jax.sharding.init import param_shardings
from longrope_jax.sharding.mesh import axes_size, batch_sharding
from longrope_jax.sharding.rules import DEFAULT_RULES

ATTENTIONS = ("dense", "blockwise", "ring")


def select_documents(documents, tokenizer, *, docs: int | None, min_tokens: int, max_tokens: int | None = None) -> list:
    """Token ids (int32 arrays) of the first `docs` (None: all) documents with at least `min_tokens` tokens,
    in source order, each cut to its first `max_tokens` when given."""
    if docs is not None:
        check_int("docs", docs, 1)
    check_int("min_tokens", min_tokens, 1)
    if max_tokens is not None:
        check_int("max_tokens", max_tokens, min_tokens)
    out = []
    for doc in documents:
        ids = tokenizer.encode(doc)
        if len(ids) >= min_tokens:
            out.append(np.asarray(ids[:max_tokens], np.int32))
            if len(out) == docs:
                return out
    if docs is None and out:
        return out
    raise ValueError(f"perplexity: needs {docs or 1} documents of >= {min_tokens} tokens, found {len(out)} (ask for "
                     f"fewer --docs, shorter --lengths or a smaller --min-tokens, or use another corpus)")


def plan_windows(n_tokens: int, length: int, stride: int | None = None, truncate: bool = False) -> list:
    """[(begin, end, scored)] over a document of `n_tokens`: YaRN's loop. A window holds BOS and
    ids[begin:end]; its last `scored` tokens are scored. stride None: L - 1 (disjoint windows)."""
    span = length - 1  # BOS takes the first slot
    if truncate:
        n_tokens, stride = min(n_tokens, span), span
    stride = span if stride is None else stride
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + span, n_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


def window_batch(docs_ids, plan, length: int, bos_id: int, rows: int | None = None) -> dict:
    """int32 [rows, L] tokens, positions, segment_ids, targets and bool `scored` for planned windows
    [(doc index, begin, end, scored)], then empty rows up to `rows` (default: none). Pads have segment
    0 and position 0 and are never scored."""
    n = len(plan) if rows is None else rows
    tokens, positions, segments = (np.zeros((n, length), np.int32) for _ in range(3))
    scored = np.zeros((n, length), bool)
    for row, (doc, begin, end, count) in enumerate(plan):
        real = end - begin + 1
        tokens[row, 0], tokens[row, 1:real] = bos_id, docs_ids[doc][begin:end]
        positions[row, :real] = np.arange(real)
        segments[row, :real] = 1
        scored[row, real - 1 - count: real - 1] = True  # position j predicts token j + 1
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
    return {"tokens": tokens, "positions": positions, "segment_ids": segments, "targets": targets, "scored": scored}


class WindowScorer:
    """`scorer(scaling, batch) -> float64 [B]`: summed NLL of each row's scored tokens.

    One jitted function; RopeScaling is a static argument, so it compiles once per (method, length).
    Under a mesh (one process) the params are placed by their logical names and batches by
    `batch_sharding`. `traces` counts compilations.
    """

    def __init__(self, config: LlamaConfig, params, *, attention: str = "dense", attention_chunk: int | None = None,
                 mesh=None, rules=None):
        self.mesh, self.rules = mesh, rules or DEFAULT_RULES
        if attention not in ATTENTIONS:
            raise ValueError(f"attention {attention!r}: expected one of {ATTENTIONS}")
        if attention == "ring" and (mesh is None or attn_lib.seq_shards(mesh, self.rules) < 2):
            raise ValueError("attention 'ring': needs a mesh whose 'seq' axis has more than one device "
                             "(e.g. --mesh 1,1,8,1); use 'blockwise' on one device")
        chunk = config.attention_chunk if attention_chunk is None else attention_chunk
        self.config = dataclasses.replace(config, attention=attention, attention_chunk=chunk)
        self.model = Llama(self.config, mesh=mesh, rules=self.rules)
        self.sharding = None if mesh is None else batch_sharding(mesh, self.rules)
        self.batch_multiple = 1 if mesh is None else self._axes_size(0)
        if mesh is not None and params is not None:
            dense = dataclasses.replace(config, attention="dense")  # the parameters do not depend on the kernel
            params = jax.device_put(params, param_shardings(dense, mesh, self.rules))
        self.params = params  # None: only `jitted` is used (ahead-of-time compiles)
        self.traces = 0
        self.jitted = jax.jit(self._nll_sums, static_argnums=1)  # (params, scaling, tokens, positions, ...)

    def _axes_size(self, dim: int) -> int:
        return axes_size(self.mesh, (tuple(self.sharding.spec) + (None, None))[dim])

    def check_length(self, length: int) -> None:
        """Length constraints of the sharding and the chunked kernels, named before anything compiles."""
        cfg = self.config
        local = length
        if self.mesh is not None:
            shards = self._axes_size(1)
            unit = shards * (2 if cfg.attention == "ring" and cfg.ring_zigzag and shards > 1 else 1)
            if length % unit:
                raise ValueError(f"perplexity length {length}: not a multiple of {unit} (the mesh's sequence shards"
                                 f"{' x 2 for the zig-zag ring layout' if unit != shards else ''})")
            local = length // shards if cfg.attention == "ring" else length
        if cfg.attention in ("blockwise", "ring") and local > cfg.attention_chunk and local % cfg.attention_chunk:
            raise ValueError(f"perplexity length {length}: the per-device length {local} is not a multiple of "
                             f"attention_chunk {cfg.attention_chunk}")

    def _nll_sums(self, params, scaling, tokens, positions, segments, targets, scored):
        self.traces += 1  # runs only while tracing
        batch = {"tokens": tokens, "positions": positions, "segment_ids": segments}
        return jnp.sum(masked_nll(self.model, params, batch, targets, scored, rope_scaling=scaling), axis=1)

    def __call__(self, scaling: RopeScaling, batch: dict) -> np.ndarray:
        keys = ("tokens", "positions", "segment_ids", "targets", "scored")
        arrays = [batch[k] for k in keys]
        if self.sharding is not None:
            arrays = [jax.device_put(a, self.sharding) for a in arrays]
        return np.asarray(self.jitted(self.params, scaling, *arrays), np.float64)


def _batches(real_lengths: np.ndarray, batch_size: int, by_length: bool) -> list:
    """Row indices of each batch; with `by_length` a batch holds windows of one real length only."""
    groups = [np.flatnonzero(real_lengths == r) for r in np.unique(real_lengths)] if by_length \
        else [np.arange(len(real_lengths))]
    return [g[i: i + batch_size] for g in groups for i in range(0, len(g), batch_size)]


def evaluate_perplexity(config: LlamaConfig, params, documents, *, lengths, methods=None, stride: int | None = None,
                        truncate: bool = False, tokenizer=None, bos_id: int | None = None,
                        batch_size: int | None = None, attention: str = "dense", attention_chunk: int | None = None,
                        mesh=None, rules=None, progress: bool = False, scorer: WindowScorer | None = None) -> list:
    """Rows {method, length, ppl_window_mean, ppl_token, nll_window_mean, nll_token, tokens, windows, docs}
    for every method x length.

    `documents`: token-id sequences, or strings with `tokenizer`. `methods`: {name: RopeScaling or None
    (the model's own)}, default {"model": None}. `stride` (default L - 1: disjoint windows) must be at
    most L - 1 for every length, else tokens would go unscored. `batch_size` windows per call (default 4,
    rounded up to the mesh's data-parallel size). `scorer` reuses a WindowScorer (and its compilations).
    """
    lengths = [check_int("perplexity length", v, 2) for v in lengths]
    if not lengths:
        raise ValueError("perplexity lengths: expected at least one length")
    if stride is not None and not truncate:
        check_int("stride", stride, 1)
        if stride > min(lengths) - 1:
            raise ValueError(f"stride {stride}: expected at most L - 1 = {min(lengths) - 1} for length {min(lengths)} "
                             f"(a longer stride leaves tokens unscored)")
    methods = {"model": None} if methods is None else dict(methods)
    methods = {k: config.rope_scaling if v is None else v for k, v in methods.items()}
    if bos_id is None:
        bos_id = tokenizer.bos_id if tokenizer is not None else config.bos_token_id
    if bos_id is None:
        raise ValueError("perplexity: no BOS id (the tokenizer and the model config name none); pass bos_id")
    docs_ids = [np.asarray(tokenizer.encode(d) if isinstance(d, str) else d, np.int64) for d in documents]
    if not docs_ids or any(len(d) == 0 for d in docs_ids):
        raise ValueError("perplexity documents: expected at least one document, none of them empty")
    top = max(int(d.max()) for d in docs_ids)
    if min(int(d.min()) for d in docs_ids) < 0 or max(top, bos_id) >= config.vocab_size:
        raise ValueError(f"perplexity documents: token ids reach {max(top, bos_id)}; expected ids below the model's "
                         f"vocab_size {config.vocab_size} (wrong tokenizer?)")
    scorer = scorer or WindowScorer(config, params, attention=attention, attention_chunk=attention_chunk,
                                    mesh=mesh, rules=rules)
    for length in lengths:
        scorer.check_length(length)
    multiple = scorer.batch_multiple
    if batch_size is None:
        batch_size = -(-4 // multiple) * multiple
    check_int("batch_size", batch_size, 1)
    if batch_size % multiple:
        raise ValueError(f"batch_size {batch_size}: not a multiple of the mesh's data-parallel size {multiple}")

    # Batches are built as they run: all windows of a long corpus at once would not fit in memory.
    plans = {n: [(i, *w) for i, d in enumerate(docs_ids) for w in plan_windows(len(d), n, stride, truncate)]
             for n in lengths}
    real = {n: np.asarray([end - begin + 1 for _, begin, end, _ in plans[n]]) for n in lengths}
    calls = {(m, n): _batches(real[n], batch_size, s.depends_on_length) for m, s in methods.items() for n in lengths}
    rows = []
    with tqdm(total=sum(len(v) for v in calls.values()), desc="perplexity", disable=not progress) as bar:
        for name, scaling in methods.items():
            for length in lengths:
                sums = np.zeros(len(plans[length]))
                for idx in calls[name, length]:
                    batch = window_batch(docs_ids, [plans[length][i] for i in idx], length, bos_id, batch_size)
                    sums[idx] = scorer(scaling, batch)[: len(idx)]
                    bar.update(1)
                scored = np.asarray([p[3] for p in plans[length]], np.float64)
                rows.append(_perplexity_row(name, length, sums, scored, len(docs_ids)))
    return rows


def _perplexity_row(method: str, length: int, sums: np.ndarray, scored: np.ndarray, docs: int) -> dict:
    window_mean = float(np.mean(sums / scored))
    token = float(sums.sum() / scored.sum())
    return {"method": method, "length": length, "ppl_window_mean": perplexity(window_mean), "ppl_token": perplexity(token),
            "nll_window_mean": window_mean, "nll_token": token, "tokens": int(scored.sum()), "windows": len(sums),
            "docs": docs}


def check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)
