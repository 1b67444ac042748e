"""Dense attention, the reference every other kernel is tested against, and the shared mask rule.

Causality follows positions inside a segment (key position <= query position), never array order,
so layouts that move tokens (packing, the zig-zag ring layout) stay exact as long as positions
travel with their tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a fully masked row (padding) yields a uniform average instead of NaN.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_pos_BxQ, k_pos_BxS, q_seg_BxQ, k_seg_BxS, sliding_window: int | None = None):
    """Boolean [B, Q, S]: True where query may attend key."""
    qp, kp = q_pos_BxQ[:, :, None], k_pos_BxS[:, None, :]
    mask = (q_seg_BxQ[:, :, None] == k_seg_BxS[:, None, :]) & (kp <= qp)
    if sliding_window is not None:
        mask &= qp - kp < sliding_window
    return mask


def group_heads(q_BxQxHxD, kv_heads: int):
    b, q_len, h, d = q_BxQxHxD.shape
    if h % kv_heads:
        raise ValueError(f"attention: {h} query heads are not a multiple of {kv_heads} kv heads")
    return q_BxQxHxD.reshape(b, q_len, kv_heads, h // kv_heads, d)


def dense_attention(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxQxS):
    """softmax(q k^T / sqrt(D)) v with H query heads sharing K kv-heads (H % K == 0)."""
    b, q_len, h, d = q_BxQxHxD.shape
    q_BxQxKxGxD = group_heads(q_BxQxHxD, k_BxSxKxD.shape[2])
    s_BxKxGxQxS = jnp.einsum(
        "bqkgd,bskd->bkgqs", q_BxQxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
    ) * (d**-0.5)
    s_BxKxGxQxS = jnp.where(mask_BxQxS[:, None, None], s_BxKxGxQxS, MASKED)
    p_BxKxGxQxS = jax.nn.softmax(s_BxKxGxQxS, axis=-1).astype(v_BxSxKxD.dtype)
    o_BxQxKxGxD = jnp.einsum("bkgqs,bskd->bqkgd", p_BxKxGxQxS, v_BxSxKxD)
    return o_BxQxKxGxD.reshape(b, q_len, h, d)
