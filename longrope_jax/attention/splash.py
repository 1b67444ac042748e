"""Pallas splash attention (TPU only)."""

from __future__ import annotations

import jax


def splash_attention(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL):
    """Pallas splash attention (TPU only). Causal by array index, so contiguous layouts only."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, q_len, h, d = q_BxQxHxD.shape
    kv = k_BxSxKxD.shape[2]
    g = h // kv
    mask = sm.MultiHeadMask([sm.CausalMask((q_len, q_len))] * g)
    kernel = sk.make_splash_mqa_single_device(mask)  # g query heads share one K/V head
    q = (q_BxQxHxD * d**-0.5).reshape(b, q_len, kv, g, d).transpose(0, 2, 3, 1, 4)  # B K G L D
    k = k_BxSxKxD.transpose(0, 2, 1, 3)
    v = v_BxSxKxD.transpose(0, 2, 1, 3)

    def one(q_kgld, k_kld, v_kld, seg):
        ids = sk.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(q_kgld, k_kld, v_kld)

    o = jax.vmap(one)(q, k, v, segment_ids_BxL)  # B K G L D
    return o.transpose(0, 3, 1, 2, 4).reshape(b, q_len, h, d)
