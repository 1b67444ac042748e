"""Attention kernels. `dense` is the reference: causal, segment-aware, fp32 softmax, GQA without repeat.

Causality follows positions inside a segment (key position <= query position), not array order, so
layouts that move tokens (packing, load-balanced ring chunks) stay correct as long as positions
travel with their tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("dense",)

# Finite, so a fully masked row (padding) yields a uniform average instead of NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    q_pos_BxQ: jax.Array,
    k_pos_BxS: jax.Array,
    q_seg_BxQ: jax.Array,
    k_seg_BxS: jax.Array,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean [B, Q, S]: True where query may attend key."""
    qp, kp = q_pos_BxQ[:, :, None], k_pos_BxS[:, None, :]
    mask = (q_seg_BxQ[:, :, None] == k_seg_BxS[:, None, :]) & (kp <= qp)
    if sliding_window is not None:
        mask &= qp - kp < sliding_window
    return mask


def dense_attention(
    q_BxQxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    mask_BxQxS: jax.Array,
) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v with H query heads sharing K kv-heads (H % K == 0)."""
    b, q_len, h, d = q_BxQxHxD.shape
    kv = k_BxSxKxD.shape[2]
    if h % kv:
        raise ValueError(f"attention: {h} query heads are not a multiple of {kv} kv heads")
    q_BxQxKxGxD = q_BxQxHxD.reshape(b, q_len, kv, h // kv, d)
    s_BxKxGxQxS = jnp.einsum(
        "bqkgd,bskd->bkgqs", q_BxQxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
    ) * (d**-0.5)
    s_BxKxGxQxS = jnp.where(mask_BxQxS[:, None, None], s_BxKxGxQxS, _MASKED)
    p_BxKxGxQxS = jax.nn.softmax(s_BxKxGxQxS, axis=-1).astype(v_BxSxKxD.dtype)
    o_BxQxKxGxD = jnp.einsum("bkgqs,bskd->bqkgd", p_BxKxGxQxS, v_BxSxKxD)
    return o_BxQxKxGxD.reshape(b, q_len, h, d)
