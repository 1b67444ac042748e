"""Pallas splash attention (TPU only), per device under `shard_map`.

The kernel cannot be partitioned automatically, so it runs inside a `shard_map` whose specs come from
the logical rules: batch, heads and kv heads may be sharded; the sequence may not (splash is causal by
array index over the whole local sequence; use `ring` to split the sequence). GQA and packed
documents (segment ids) are handled by the kernel.
"""

from __future__ import annotations

import jax

from longrope_jax.sharding.rules import partition_spec


def _splash_local(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL):
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


def check_splash_mesh(mesh, rules) -> None:
    """Splash needs the whole sequence on each device: the logical `length` axis must not be split."""
    if mesh is None:
        return
    axes = partition_spec(("length",), rules)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    split = {a: mesh.shape[a] for a in axes if a in mesh.shape and mesh.shape[a] > 1}
    if split:
        raise ValueError(f"attention='splash': the sequence is split over mesh axes {split}; splash needs the whole "
                         f"sequence on each device (use attention='ring' to split it, or mesh seq=1)")


def splash_attention(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL, *, mesh=None, rules=None):
    """Causal splash attention (TPU only; causal by array index, so contiguous layouts only)."""
    if mesh is None:
        return _splash_local(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL)
    check_splash_mesh(mesh, rules)
    spec_q = partition_spec(("batch", "length", "heads", "head_dim"), rules)
    spec_kv = partition_spec(("batch", "length", "kv_heads", "head_dim"), rules)
    spec_bl = partition_spec(("batch", "length"), rules)
    return jax.shard_map(_splash_local, mesh=mesh, in_specs=(spec_q, spec_kv, spec_kv, spec_bl), out_specs=spec_q,
                         check_vma=False)(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxL)
