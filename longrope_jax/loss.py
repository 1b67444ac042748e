"""The one next-token NLL: targets within a document, the scored-token mask, the zig-zag order of the
ring layout, a chunked LM head, and a perplexity that cannot overflow. Training, evaluation and the
search all use it.

No [B, L, V] logits exist here: the model returns its final hidden states and the head runs over
chunks of `LlamaConfig.loss_chunk` tokens per sequence shard inside a rematerialised scan, so the
forward and the backward hold one chunk's [B, chunk, V] logits at a time and keep only [B, L] NLLs.

A batch is `{"tokens", "positions", "segment_ids"}` int32 [B, L]. Token t predicts token t+1 only
where both have the same nonzero segment id: padding (segment 0) and a document's last token predict
nothing, and one document's EOS never predicts the next document's BOS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from longrope_jax import attention as attn_lib
from longrope_jax.model import Llama, flat_tokens, rules_of


def next_token_targets(tokens_BxL, segment_ids_BxL):
    """(targets int [B, L], mask bool [B, L]): the next token of the same document, and where one exists."""
    targets_BxL = jnp.concatenate([tokens_BxL[:, 1:], jnp.zeros_like(tokens_BxL[:, :1])], axis=1)
    next_seg_BxL = jnp.concatenate([segment_ids_BxL[:, 1:], jnp.zeros_like(segment_ids_BxL[:, :1])], axis=1)
    return targets_BxL, (next_seg_BxL == segment_ids_BxL) & (segment_ids_BxL != 0)


def token_nll(logits_BxLxV, targets_BxL):
    """NLL per position as logsumexp - target logit (fp32 softmax); no [B, L, V] log-softmax is kept."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    picked_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_BxLxV, axis=-1) - picked_BxL


def zigzag_shards(model: Llama) -> int:
    """Ring devices the model's zig-zag layout balances over (1: the batch keeps its order)."""
    cfg = model.config
    if cfg.attention != "ring" or not cfg.ring_zigzag or model.mesh is None:
        return 1
    return attn_lib.seq_shards(model.mesh, rules_of(model))


def length_shards(model: Llama) -> int:
    """Devices the model's sequence axis is split over (1 without a mesh)."""
    return 1 if model.mesh is None else attn_lib.seq_shards(model.mesh, rules_of(model))


def head_matrix(config, params):
    """The LM head as [E, V] in the compute dtype: the tied embedding table, or lm_head's kernel."""
    w_ExV = params["embed_tokens"]["embedding"].T if config.tie_word_embeddings else params["lm_head"]["kernel"]
    return w_ExV.astype(config.jnp_dtype)


def _head_nll(hidden_xE, head_ExV, targets_x, flat: bool):
    """NLL of `targets` under hidden @ head. `flat` runs the head on [tokens, E] rows: XLA:CPU then takes
    the head's gradient as one plain matmul instead of first transposing the [..., V] cotangent."""
    if flat:
        nll_T = _head_nll(hidden_xE.reshape(-1, hidden_xE.shape[-1]), head_ExV, targets_x.reshape(-1), False)
        return nll_T.reshape(targets_x.shape)
    logits_xV = jnp.einsum("...e,ev->...v", hidden_xE, head_ExV, preferred_element_type=jnp.float32)
    return token_nll(logits_xV, targets_x)


def chunked_token_nll(hidden_BxLxE, head_ExV, targets_BxL, *, chunk: int, shards: int = 1, flat: bool = False):
    """NLL [B, L] of `targets` under logits = hidden @ head, `chunk` tokens of every sequence shard at a time.

    The length splits as (shards, chunks, chunk), so each scan step takes one chunk from every shard and
    no device holds more than [B, chunk, V] logits (recomputed in the backward, not stored). `flat`: see
    `_head_nll` (`model.flat_tokens`: a multi-device mesh's rules name the batch and length axes)."""
    b, length, e = hidden_BxLxE.shape
    local = length // shards
    if local <= chunk:
        return _head_nll(hidden_BxLxE, head_ExV, targets_BxL, flat)
    if length % shards or local % chunk:
        raise ValueError(f"loss_chunk {chunk}: does not divide the per-shard length {length} / {shards} shards")
    n = local // chunk
    hidden_NxBxSxCxE = jnp.moveaxis(hidden_BxLxE.reshape(b, shards, n, chunk, e), 2, 0)
    targets_NxBxSxC = jnp.moveaxis(targets_BxL.reshape(b, shards, n, chunk), 2, 0)
    step = jax.checkpoint(lambda h, t: _head_nll(h, head_ExV, t, flat), policy=jax.checkpoint_policies.nothing_saveable)
    _, nll_NxBxSxC = lax.scan(lambda _, xs: (None, step(*xs)), None, (hidden_NxBxSxCxE, targets_NxBxSxC))
    return jnp.moveaxis(nll_NxBxSxC, 0, 2).reshape(b, length)


def masked_nll(model: Llama, params, batch, targets_BxL, mask_BxL, *, rope_scaling=None):
    """NLL [B, L] of `targets` where `mask` holds, 0 elsewhere, in an order the caller must not rely on.

    With the zig-zag ring layout the whole batch (targets and mask included) is reordered once here and
    the model is told so (`balanced=True`): nothing moves back, and sums over L are unchanged.
    """
    tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
    shards = zigzag_shards(model)
    if shards > 1:
        tokens, positions, segments, targets_BxL, mask_BxL = (
            attn_lib.zigzag(x, shards) for x in (tokens, positions, segments, targets_BxL, mask_BxL))
    hidden_BxLxE = model.apply({"params": params}, tokens, positions=positions, segment_ids=segments,
                               rope_scaling=rope_scaling, balanced=shards > 1, hidden=True)
    nll_BxL = chunked_token_nll(hidden_BxLxE, head_matrix(model.config, params), targets_BxL,
                                chunk=model.config.loss_chunk, shards=length_shards(model),
                                flat=flat_tokens(model.mesh))
    return jnp.where(mask_BxL, nll_BxL, 0.0)


def sum_nll(model: Llama, params, batch, *, rope_scaling=None):
    """(summed next-token NLL, number of scored tokens) of a packed batch: the training objective."""
    targets_BxL, mask_BxL = next_token_targets(batch["tokens"], batch["segment_ids"])
    nll_BxL = masked_nll(model, params, batch, targets_BxL, mask_BxL, rope_scaling=rope_scaling)
    return jnp.sum(nll_BxL), jnp.sum(mask_BxL)


def perplexity(mean_nll):
    """exp(mean NLL); inf where that overflows, so a diverged model reads inf instead of raising."""
    with np.errstate(over="ignore"):
        out = np.exp(np.asarray(mean_nll, np.float64))
    return float(out) if out.ndim == 0 else out
