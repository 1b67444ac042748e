"""The ring's per-block attention as Pallas flash kernels (TPU), for contiguous and zig-zag layouts.

Each ring step pairs the local query part(s) with the K/V part(s) that arrived. Causality is by global
chunk order, so every (query part, key part) pair is one of three cases, chosen with `lax.switch`:
whole (the keys come earlier), diagonal (same chunk: the kernel's causal mask) or none (later keys:
skipped). Segment ids keep packed documents apart. Positions are not read: within a segment they
must rise with the array index, as they do for packed, contiguous or zig-zag batches (the generation
fill's padding sits in segment 0 and is never seen).

The kernels are JAX's Pallas TPU flash attention (`jax.experimental.pallas.ops.tpu.flash_attention`):
its forward with residuals gives each block's output and log-sum-exp, which the ring merges; its two
backward kernels take the *global* log-sum-exp (as m, with l = 1) and the softmax correction, so each
block's dQ, dK, dV are exact pieces of the whole. Those entry points are internal to JAX; `usable`
checks they exist before anything picks this path. On CPU the same kernels run in Pallas' interpreter
(tests/attention/test_ring_flash.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

NEG = -1e30  # log-sum-exp of a row that has seen nothing
LANES = 128  # the kernels' block sizes are multiples of this


def _kernels():
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    return fa


def usable(mesh, part_len: int, chunk: int, head_dim: int, sliding_window) -> str | None:
    """None when the Pallas path fits, else why not (the XLA blockwise kernel is used instead)."""
    if mesh is None or mesh.devices.flat[0].platform != "tpu":
        return "not a TPU mesh"
    if sliding_window is not None:
        return "sliding window"
    if part_len % LANES or min(chunk, part_len) % LANES or head_dim % 8:
        return f"local part {part_len} / chunk {chunk} not multiples of {LANES}"
    fa = _kernels()
    if not all(hasattr(fa, n) for n in ("_flash_attention_impl", "_flash_attention_bwd_dkv", "_flash_attention_bwd_dq")):
        return "this JAX has no Pallas flash residual kernels"
    return None


def _block(part_len: int, chunk: int) -> int:
    b = min(chunk, part_len)
    while part_len % b:
        b //= 2
    return b


def _fwd_kernel(q, k, v, qseg, kseg, causal: bool, block: int):
    fa = _kernels()
    o, l, m = fa._flash_attention_impl(q, k, v, None, fa.SegmentIds(qseg, kseg), True, causal, q.shape[-1] ** -0.5,
                                       1, block, block, block, False)
    return o.astype(jnp.float32), m + jnp.log(l)


def _bwd_kernel(q, k, v, qseg, kseg, lse, delta, do, causal: bool, block: int):
    fa = _kernels()
    seg, ones, scale = fa.SegmentIds(qseg, kseg), jnp.ones_like(lse), q.shape[-1] ** -0.5
    dk, dv = fa._flash_attention_bwd_dkv(q, k, v, None, seg, ones, lse, do, delta, block_q_major=block, block_q=block,
                                         block_k_major=block, block_k=block, sm_scale=scale, causal=causal,
                                         mask_value=fa.DEFAULT_MASK_VALUE, debug=False)
    dq, _ = fa._flash_attention_bwd_dq(q, k, v, None, seg, ones, lse, do, delta, block_q_major=block,
                                       block_k_major=block, block_k=block, sm_scale=scale, causal=causal,
                                       mask_value=fa.DEFAULT_MASK_VALUE, debug=False)
    return dq.astype(jnp.float32), dk.astype(jnp.float32), dv.astype(jnp.float32)


def _chunk_ids(device, n: int, parts: int):
    """Global chunk index of each local part: [device] contiguous, [device, 2n - 1 - device] zig-zag."""
    return [device] if parts == 1 else [device, 2 * n - 1 - device]


def _relation(q_id, k_id):
    """0: later keys (skip), 1: earlier keys (whole block), 2: the same chunk (causal)."""
    return jnp.where(q_id > k_id, 1, jnp.where(q_id == k_id, 2, 0))


def _split(x, parts: int, axis: int):
    return jnp.split(x, parts, axis=axis) if parts > 1 else [x]


def _expand(kv, groups: int):
    return jnp.repeat(kv, groups, axis=1) if groups > 1 else kv


def _fold(d, groups: int):
    b, h, s, dim = d.shape
    return d.reshape(b, h // groups, groups, s, dim).sum(2) if groups > 1 else d


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def ring_flash(q, k, v, qseg, kseg, axis, n: int, parts: int, chunk: int):
    """Local shards: q [B, H, Q, D], k/v [B, K, S, D], segment ids [B, Q] / [B, S] -> out [B, H, Q, D]."""
    return _fwd(q, k, v, qseg, kseg, axis, n, parts, chunk)[0]


def _fwd(q, k, v, qseg, kseg, axis, n, parts, chunk):
    perm = [(i, (i + 1) % n) for i in range(n)]
    me = lax.axis_index(axis)
    groups = q.shape[1] // k.shape[1]
    part_len = q.shape[2] // parts
    block = _block(part_len, chunk)
    q_parts, qseg_parts = _split(q, parts, 2), _split(qseg, parts, 1)
    q_ids = _chunk_ids(me, n, parts)

    def skip(*_):
        return jnp.zeros(q_parts[0].shape, jnp.float32), jnp.full(q_parts[0].shape[:3], NEG, jnp.float32)

    def attend(kv, src, acc):
        k_parts, v_parts, kseg_parts = _split(kv[0], parts, 2), _split(kv[1], parts, 2), _split(kv[2], parts, 1)
        out = []
        for qi, (o, lse) in enumerate(acc):
            for ki, k_id in enumerate(_chunk_ids(src, n, parts)):
                args = (q_parts[qi], _expand(k_parts[ki], groups), _expand(v_parts[ki], groups), qseg_parts[qi],
                        kseg_parts[ki])
                o_b, lse_b = lax.switch(_relation(q_ids[qi], k_id), [
                    skip, lambda *a: _fwd_kernel(*a, False, block), lambda *a: _fwd_kernel(*a, True, block)], *args)
                new = jnp.logaddexp(lse, lse_b)
                o = o * jnp.exp(lse - new)[..., None] + o_b * jnp.exp(lse_b - new)[..., None]
                lse = new
            out.append((o, lse))
        return out

    def step(carry, s):
        acc, kv = carry
        nxt = lax.ppermute(kv, axis, perm)
        return (attend(kv, (me - s) % n, acc), nxt), None

    acc0 = [skip() for _ in range(parts)]
    (acc, kv), _ = lax.scan(step, (acc0, (k, v, kseg)), jnp.arange(n - 1))
    acc = attend(kv, (me - (n - 1)) % n, acc)
    o = jnp.concatenate([a[0] for a in acc], axis=2).astype(q.dtype)
    lse = jnp.concatenate([a[1] for a in acc], axis=2)
    return o, (q, k, v, qseg, kseg, o, lse)


def _bwd(axis, n, parts, chunk, res, do):
    q, k, v, qseg, kseg, o, lse = res
    perm = [(i, (i + 1) % n) for i in range(n)]
    me = lax.axis_index(axis)
    groups = q.shape[1] // k.shape[1]
    part_len = q.shape[2] // parts
    block = _block(part_len, chunk)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    q_parts, qseg_parts, q_ids = _split(q, parts, 2), _split(qseg, parts, 1), _chunk_ids(me, n, parts)
    lse_parts, delta_parts, do_parts = _split(lse, parts, 2), _split(delta, parts, 2), _split(do, parts, 2)

    def none(q_p, k_p, *_):
        return jnp.zeros(q_p.shape, jnp.float32), jnp.zeros(k_p.shape, jnp.float32), jnp.zeros(k_p.shape, jnp.float32)

    def step(carry, s):
        dq, kv, dkv = carry
        kv_next = lax.ppermute(kv, axis, perm)
        src = (me - s) % n
        k_parts, v_parts, kseg_parts = _split(kv[0], parts, 2), _split(kv[1], parts, 2), _split(kv[2], parts, 1)
        dq_parts = _split(dq, parts, 2)
        dk_parts, dv_parts = [], []
        for ki, k_id in enumerate(_chunk_ids(src, n, parts)):
            kk, vv = _expand(k_parts[ki], groups), _expand(v_parts[ki], groups)
            dk_b = dv_b = jnp.zeros(kk.shape, jnp.float32)
            for qi in range(parts):
                args = (q_parts[qi], kk, vv, qseg_parts[qi], kseg_parts[ki], lse_parts[qi], delta_parts[qi],
                        do_parts[qi])
                dq_i, dk_i, dv_i = lax.switch(_relation(q_ids[qi], k_id), [
                    none, lambda *a: _bwd_kernel(*a, False, block), lambda *a: _bwd_kernel(*a, True, block)], *args)
                dq_parts[qi] = dq_parts[qi] + dq_i
                dk_b, dv_b = dk_b + dk_i, dv_b + dv_i
            dk_parts.append(_fold(dk_b, groups))
            dv_parts.append(_fold(dv_b, groups))
        dk_s, dv_s = jnp.concatenate(dk_parts, axis=2), jnp.concatenate(dv_parts, axis=2)
        # dK/dV ride with their block; after n hops they are back on the device that owns it.
        dkv = lax.ppermute((dkv[0] + dk_s, dkv[1] + dv_s), axis, perm)
        return (jnp.concatenate(dq_parts, axis=2), kv_next, dkv), None

    zeros = jnp.zeros(k.shape, jnp.float32)
    init = (jnp.zeros(q.shape, jnp.float32), (k, v, kseg), (zeros, zeros))
    (dq, _, (dk, dv)), _ = lax.scan(step, init, jnp.arange(n))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


ring_flash.defvjp(_fwd, _bwd)
