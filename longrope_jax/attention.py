"""Attention kernels, chosen by `LlamaConfig.attention`.

- `dense`: the reference. Materialises [Q, S] scores; fp32 softmax; GQA without repeating K/V.
- `blockwise`: online softmax over query and key chunks (`lax.scan`) with a flash-style custom VJP,
  so forward and backward memory are O(L * chunk). Chunk pairs whose mask is empty are skipped.
- `ring`: `shard_map` over the mesh axis that `length` maps to. Each device keeps its query chunk;
  K/V chunks (unrepeated GQA heads, with their positions and segment ids) travel the ring with
  `lax.ppermute` and are folded in with the blockwise kernel. The backward pass runs a second ring
  in which dK/dV travel with their K/V and arrive home after a full turn.
- `splash`: TPU only, `jax.experimental.pallas.ops.tpu.splash_attention` (contiguous layouts).

Causality follows positions inside a segment (key position <= query position), never array order,
so layouts that move tokens (packing, the load-balanced zig-zag ring layout) stay exact as long as
positions travel with their tokens.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

ATTENTION_IMPLS = ("dense", "blockwise", "ring", "splash")

# Finite, so a fully masked row (padding) yields a uniform average instead of NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
_NEG = -1e30  # online-softmax running max before any key is seen


def attention_mask(q_pos_BxQ, k_pos_BxS, q_seg_BxQ, k_seg_BxS, sliding_window: int | None = None):
    """Boolean [B, Q, S]: True where query may attend key."""
    qp, kp = q_pos_BxQ[:, :, None], k_pos_BxS[:, None, :]
    mask = (q_seg_BxQ[:, :, None] == k_seg_BxS[:, None, :]) & (kp <= qp)
    if sliding_window is not None:
        mask &= qp - kp < sliding_window
    return mask


def _group(q_BxQxHxD, kv_heads: int):
    b, q_len, h, d = q_BxQxHxD.shape
    if h % kv_heads:
        raise ValueError(f"attention: {h} query heads are not a multiple of {kv_heads} kv heads")
    return q_BxQxHxD.reshape(b, q_len, kv_heads, h // kv_heads, d)


def dense_attention(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxQxS):
    """softmax(q k^T / sqrt(D)) v with H query heads sharing K kv-heads (H % K == 0)."""
    b, q_len, h, d = q_BxQxHxD.shape
    q_BxQxKxGxD = _group(q_BxQxHxD, k_BxSxKxD.shape[2])
    s_BxKxGxQxS = jnp.einsum(
        "bqkgd,bskd->bkgqs", q_BxQxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
    ) * (d**-0.5)
    s_BxKxGxQxS = jnp.where(mask_BxQxS[:, None, None], s_BxKxGxQxS, _MASKED)
    p_BxKxGxQxS = jax.nn.softmax(s_BxKxGxQxS, axis=-1).astype(v_BxSxKxD.dtype)
    o_BxQxKxGxD = jnp.einsum("bkgqs,bskd->bqkgd", p_BxKxGxQxS, v_BxSxKxD)
    return o_BxQxKxGxD.reshape(b, q_len, h, d)


# ---- the chunked kernel shared by blockwise and ring -----------------------------------------------


def chunk_size(length: int, chunk: int) -> int:
    if length <= chunk:
        return length
    if length % chunk:
        raise ValueError(f"attention_chunk: length {length} is not a multiple of the chunk size {chunk}")
    return chunk


def _chunks(x, c: int, axis: int = 1):
    """Split `axis` into [n, c] and move n to the front (the scan axis)."""
    shape = x.shape
    x = x.reshape(shape[:axis] + (shape[axis] // c, c) + shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _unchunk(x, axis: int = 1):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _scores(q_c, k_c, scale):
    return jnp.einsum("bqkgd,bskd->bkgqs", q_c, k_c, preferred_element_type=jnp.float32) * scale


def _fwd_block(q, k, v, qpos, kpos, qseg, kseg, acc, *, chunk, window):
    """Fold one K/V block into the running (o, m, l) of every query; O(chunk^2) scores at a time.

    q [B,Q,K,G,D]; k, v [B,S,K,D]; acc = (o [B,Q,K,G,D] f32, m [B,K,G,Q] f32, l [B,K,G,Q] f32).
    """
    cq, ck = chunk_size(q.shape[1], chunk), chunk_size(k.shape[1], chunk)
    scale = q.shape[-1] ** -0.5
    o, m, l = acc
    kv_xs = (_chunks(k, ck), _chunks(v, ck), _chunks(kpos, ck), _chunks(kseg, ck))

    def q_step(_, xs):
        q_c, qpos_c, qseg_c, o_c, m_c, l_c = xs

        def k_step(carry, ys):
            k_c, v_c, kpos_c, kseg_c = ys
            mask = attention_mask(qpos_c, kpos_c, qseg_c, kseg_c, window)[:, None, None]

            def compute(carry):
                o_c, m_c, l_c = carry
                s = jnp.where(mask, _scores(q_c, k_c, scale), _NEG)
                m_new = jnp.maximum(m_c, s.max(-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                corr = jnp.exp(m_c - m_new)
                l_c = l_c * corr + p.sum(-1)
                pv = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v_c.dtype), v_c, preferred_element_type=jnp.float32)
                o_c = o_c * jnp.moveaxis(corr, -1, 1)[..., None] + pv
                return o_c, m_new, l_c

            return lax.cond(mask.any(), compute, lambda c: c, carry), None

        out, _ = lax.scan(k_step, (o_c, m_c, l_c), kv_xs)
        return None, out

    q_xs = (_chunks(q, cq), _chunks(qpos, cq), _chunks(qseg, cq), _chunks(o, cq), _chunks(m, cq, 3), _chunks(l, cq, 3))
    _, (o, m, l) = lax.scan(q_step, None, q_xs)
    return _unchunk(o), _unchunk(m, 3), _unchunk(l, 3)


def _bwd_block(q, k, v, do, lse, delta, qpos, kpos, qseg, kseg, *, chunk, window):
    """Gradients from one K/V block: (dq [B,Q,K,G,D], dk [B,S,K,D], dv [B,S,K,D]), all f32."""
    cq, ck = chunk_size(q.shape[1], chunk), chunk_size(k.shape[1], chunk)
    scale = q.shape[-1] ** -0.5
    q_xs = (_chunks(q, cq), _chunks(do, cq), _chunks(lse, cq, 3), _chunks(delta, cq, 3),
            _chunks(qpos, cq), _chunks(qseg, cq))

    def k_step(dq, ys):
        k_c, v_c, kpos_c, kseg_c = ys

        def q_step(carry, xs):
            q_c, do_c, lse_c, delta_c, qpos_c, qseg_c = xs
            mask = attention_mask(qpos_c, kpos_c, qseg_c, kseg_c, window)[:, None, None]

            def compute(carry):
                dk_c, dv_c = carry
                s = _scores(q_c, k_c, scale)
                p = jnp.where(mask, jnp.exp(s - lse_c[..., None]), 0.0)
                dv_c = dv_c + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do_c.dtype), do_c, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqkgd,bskd->bkgqs", do_c, v_c, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_c[..., None]) * scale
                dq_c = jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(k_c.dtype), k_c, preferred_element_type=jnp.float32)
                dk_c = dk_c + jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(q_c.dtype), q_c, preferred_element_type=jnp.float32)
                return (dk_c, dv_c), dq_c

            def skip(carry):
                return carry, jnp.zeros(q_c.shape, jnp.float32)

            return lax.cond(mask.any(), compute, skip, carry)

        zeros = jnp.zeros(k_c.shape, jnp.float32)
        (dk_c, dv_c), dq_parts = lax.scan(q_step, (zeros, zeros), q_xs)
        return dq + _unchunk(dq_parts), (dk_c, dv_c)

    kv_xs = (_chunks(k, ck), _chunks(v, ck), _chunks(kpos, ck), _chunks(kseg, ck))
    dq, (dk, dv) = lax.scan(k_step, jnp.zeros(q.shape, jnp.float32), kv_xs)
    return dq, _unchunk(dk), _unchunk(dv)


def _init_acc(q):
    b, q_len, kv, g, _ = q.shape
    return jnp.zeros(q.shape, jnp.float32), jnp.full((b, kv, g, q_len), _NEG, jnp.float32), jnp.zeros((b, kv, g, q_len), jnp.float32)


def _finish(acc, dtype):
    o, m, l = acc
    l_safe = jnp.where(l == 0, 1.0, l)
    out = o / jnp.moveaxis(l_safe, -1, 1)[..., None]
    return out.astype(dtype), m + jnp.log(l_safe)


def _delta(o, do):
    """rowsum(dO * O) per query and head: the softmax-backward correction, [B,K,G,Q]."""
    return jnp.moveaxis(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1), 1, -1)


# ---- blockwise (one device) --------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _blockwise(q, k, v, qpos, kpos, qseg, kseg, chunk, window):
    return _blockwise_fwd(q, k, v, qpos, kpos, qseg, kseg, chunk, window)[0]


def _blockwise_fwd(q, k, v, qpos, kpos, qseg, kseg, chunk, window):
    acc = _fwd_block(q, k, v, qpos, kpos, qseg, kseg, _init_acc(q), chunk=chunk, window=window)
    o, lse = _finish(acc, q.dtype)
    return o, (q, k, v, qpos, kpos, qseg, kseg, o, lse)


def _blockwise_bwd(chunk, window, res, do):
    q, k, v, qpos, kpos, qseg, kseg, o, lse = res
    dq, dk, dv = _bwd_block(q, k, v, do, lse, _delta(o, do), qpos, kpos, qseg, kseg, chunk=chunk, window=window)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, q_pos, k_pos, q_seg, k_seg, *, chunk=512, sliding_window=None):
    """Memory-efficient attention, equal to `dense_attention` with the same mask."""
    b, q_len, h, d = q_BxQxHxD.shape
    q = _group(q_BxQxHxD, k_BxSxKxD.shape[2])
    o = _blockwise(q, k_BxSxKxD, v_BxSxKxD, q_pos, k_pos, q_seg, k_seg, chunk, sliding_window)
    return o.reshape(b, q_len, h, d)


# ---- ring (sequence parallel) ------------------------------------------------------------------------


def _ring_perm(n: int):
    return [(i, (i + 1) % n) for i in range(n)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _ring(q, k, v, qpos, kpos, qseg, kseg, axis, n, chunk, window):
    return _ring_fwd(q, k, v, qpos, kpos, qseg, kseg, axis, n, chunk, window)[0]


def _ring_fwd(q, k, v, qpos, kpos, qseg, kseg, axis, n, chunk, window):
    perm = _ring_perm(n)

    def step(carry, _):
        acc, kv = carry
        nxt = lax.ppermute(kv, axis, perm)  # issued before the math so the transfer can overlap it
        acc = _fwd_block(q, *kv[:2], qpos, kv[2], qseg, kv[3], acc, chunk=chunk, window=window)
        return (acc, nxt), None

    (acc, kv), _ = lax.scan(step, (_init_acc(q), (k, v, kpos, kseg)), None, length=n - 1)
    acc = _fwd_block(q, *kv[:2], qpos, kv[2], qseg, kv[3], acc, chunk=chunk, window=window)
    o, lse = _finish(acc, q.dtype)
    return o, (q, k, v, qpos, kpos, qseg, kseg, o, lse)


def _ring_bwd(axis, n, chunk, window, res, do):
    q, k, v, qpos, kpos, qseg, kseg, o, lse = res
    delta, perm = _delta(o, do), _ring_perm(n)

    def step(carry, _):
        dq, kv, dkv = carry
        kv_next = lax.ppermute(kv, axis, perm)
        dq_b, dk_b, dv_b = _bwd_block(q, kv[0], kv[1], do, lse, delta, qpos, kv[2], qseg, kv[3], chunk=chunk, window=window)
        # dK/dV ride with their block; after n hops they are back on the device that owns it.
        dkv = lax.ppermute((dkv[0] + dk_b, dkv[1] + dv_b), axis, perm)
        return (dq + dq_b, kv_next, dkv), None

    zeros = jnp.zeros(k.shape, jnp.float32)
    init = (jnp.zeros(q.shape, jnp.float32), (k, v, kpos, kseg), (zeros, zeros))
    (dq, _, (dk, dv)), _ = lax.scan(step, init, None, length=n)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _mesh_axes(names, rules):
    spec = nn.logical_to_mesh_axes(names, rules)
    return P(*spec) if spec is not None else P(*([None] * len(names)))


def seq_shards(mesh, rules) -> int:
    """Size of the mesh axis that the logical `length` axis maps to (1 without a mesh)."""
    axis = _mesh_axes(("length",), rules)[0]
    if mesh is None or not isinstance(axis, str) or axis not in mesh.shape:
        return 1
    return mesh.shape[axis]


def ring_attention(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, positions_BxL, segment_ids_BxL, *, mesh, rules,
                   chunk=512, sliding_window=None):
    """Causal ring attention over the mesh axis that the logical `length` axis maps to.

    Inputs are global arrays (sharded or not); `shard_map` hands each device its slice.
    """
    spec_q = _mesh_axes(("batch", "length", "heads", "head_dim"), rules)
    spec_kv = _mesh_axes(("batch", "length", "kv_heads", "head_dim"), rules)
    spec_bl = _mesh_axes(("batch", "length"), rules)
    axis = spec_q[1]
    if mesh is None or not isinstance(axis, str) or axis not in mesh.shape:
        raise ValueError(
            "attention='ring' needs a mesh and logical rules that map 'length' to one mesh axis "
            f"(e.g. ('length', 'seq')); got mesh axes {None if mesh is None else dict(mesh.shape)} and "
            f"'length' -> {axis!r}"
        )
    n = mesh.shape[axis]
    kv = k_BxSxKxD.shape[2]

    def local(q, k, v, pos, seg):
        qg = _group(q, k.shape[2])
        o = _ring(qg, k, v, pos, pos, seg, seg, axis, n, chunk, sliding_window)
        return o.reshape(q.shape)

    heads_axis = spec_kv[2]
    if isinstance(heads_axis, str) and kv % mesh.shape[heads_axis]:
        raise ValueError(
            f"attention='ring': {kv} kv heads do not split over mesh axis {heads_axis!r} of size {mesh.shape[heads_axis]}"
        )
    return jax.shard_map(
        local, mesh=mesh, in_specs=(spec_q, spec_kv, spec_kv, spec_bl, spec_bl), out_specs=spec_q, check_vma=False,
    )(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, positions_BxL, segment_ids_BxL)


# ---- load-balanced (zig-zag) layout ------------------------------------------------------------------


def zigzag_indices(length: int, shards: int) -> np.ndarray:
    """Token order that gives every ring device equal causal work.

    The sequence is cut into 2*shards chunks; device i holds chunks i and 2*shards-1-i (one early,
    one late), e.g. shards=2: [0,1,2,3] -> [0,3 | 1,2]. `x[:, idx]` reorders; `unzigzag` undoes it.
    """
    if length % (2 * shards):
        raise ValueError(f"zig-zag layout: length {length} is not a multiple of 2 x seq shards ({2 * shards})")
    c = length // (2 * shards)
    order = [j for i in range(shards) for j in (i, 2 * shards - 1 - i)]
    return np.concatenate([np.arange(j * c, (j + 1) * c) for j in order])


def zigzag(x, shards: int, axis: int = 1):
    return jnp.take(x, jnp.asarray(zigzag_indices(x.shape[axis], shards)), axis=axis)


def unzigzag(x, shards: int, axis: int = 1):
    inverse = np.argsort(zigzag_indices(x.shape[axis], shards))
    return jnp.take(x, jnp.asarray(inverse), axis=axis)


def causal_work(length: int, shards: int, balanced: bool, chunk: int | None = None) -> np.ndarray:
    """[ring step, device]: (query chunk, key chunk) pairs each device computes for one causal sequence.

    Mirrors the kernel's skip rule: a pair is computed unless every key lies after every query.
    """
    chunk = chunk or length // (2 * shards)
    positions = zigzag_indices(length, shards) if balanced else np.arange(length)
    local = positions.reshape(shards, -1)
    q_last = local.reshape(shards, -1, chunk).max(-1)  # [device, q chunk]
    k_first = local.reshape(shards, -1, chunk).min(-1)  # [device, k chunk]
    work = np.zeros((shards, shards), int)
    for step in range(shards):
        for dev in range(shards):
            src = (dev - step) % shards  # the K/V block that visits `dev` at this step
            work[step, dev] = int((k_first[src][None, :] <= q_last[dev][:, None]).sum())
    return work


def causal_blocks_per_device(length: int, shards: int, balanced: bool, chunk: int | None = None) -> np.ndarray:
    """Total chunk pairs per ring device for one causal sequence."""
    return causal_work(length, shards, balanced, chunk).sum(0)


def causal_critical_path(length: int, shards: int, balanced: bool, chunk: int | None = None) -> int:
    """Chunk pairs on the slowest device summed over ring steps: what truly parallel devices wait for,
    since they hand K/V on together at every step."""
    return int(causal_work(length, shards, balanced, chunk).max(1).sum())


# ---- splash (TPU) ------------------------------------------------------------------------------------


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
