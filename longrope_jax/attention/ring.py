"""Ring attention (sequence parallel): `shard_map` over the mesh axes that `length` maps to (one axis, or
several taken as one ring in the order given, e.g. ('fsdp', 'seq') for a single long prompt).

Each device keeps its query chunk; K/V chunks (unrepeated GQA heads, with their positions and
segment ids) travel the ring with `lax.ppermute` and are folded in with the blockwise kernel. The
backward pass runs a second ring in which dK/dV travel with their K/V and arrive home after a full turn.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from longrope_jax.attention import ring_flash
from longrope_jax.attention.blockwise import bwd_block, finish, fwd_block, init_acc, softmax_delta
from longrope_jax.attention.dense import group_heads
from longrope_jax.sharding.rules import partition_spec


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
        acc = fwd_block(q, *kv[:2], qpos, kv[2], qseg, kv[3], acc, chunk=chunk, window=window)
        return (acc, nxt), None

    (acc, kv), _ = lax.scan(step, (init_acc(q), (k, v, kpos, kseg)), None, length=n - 1)
    acc = fwd_block(q, *kv[:2], qpos, kv[2], qseg, kv[3], acc, chunk=chunk, window=window)
    o, lse = finish(acc, q.dtype)
    return o, (q, k, v, qpos, kpos, qseg, kseg, o, lse)


def _ring_bwd(axis, n, chunk, window, res, do):
    q, k, v, qpos, kpos, qseg, kseg, o, lse = res
    delta, perm = softmax_delta(o, do), _ring_perm(n)

    def step(carry, _):
        dq, kv, dkv = carry
        kv_next = lax.ppermute(kv, axis, perm)
        dq_b, dk_b, dv_b = bwd_block(q, kv[0], kv[1], do, lse, delta, qpos, kv[2], qseg, kv[3], chunk=chunk, window=window)
        # dK/dV ride with their block; after n hops they are back on the device that owns it.
        dkv = lax.ppermute((dkv[0] + dk_b, dkv[1] + dv_b), axis, perm)
        return (dq + dq_b, kv_next, dkv), None

    zeros = jnp.zeros(k.shape, jnp.float32)
    init = (jnp.zeros(q.shape, jnp.float32), (k, v, kpos, kseg), (zeros, zeros))
    (dq, _, (dk, dv)), _ = lax.scan(step, init, None, length=n)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _length_axes(mesh, rules) -> tuple:
    axis = partition_spec(("length",), rules)[0]
    axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    if mesh is None or not all(a in mesh.shape for a in axes):
        return ()
    return axes


def seq_shards(mesh, rules) -> int:
    """How many pieces the logical `length` axis is split into on `mesh` (1 without a mesh)."""
    return math.prod(mesh.shape[a] for a in _length_axes(mesh, rules))


def ring_attention(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, positions_BxL, segment_ids_BxL, *, mesh, rules,
                   chunk=512, sliding_window=None, zigzag: bool = False, block_kernel: str = "auto"):
    """Causal ring attention over the mesh axis that the logical `length` axis maps to.

    Inputs are global arrays (sharded or not); `shard_map` hands each device its slice. `zigzag` says
    the sequence is in the zig-zag order (`attention.zigzag`). Each ring step's blocks run as Pallas
    flash kernels on a TPU mesh where they fit (`ring_flash.usable`; `block_kernel="auto"`), else as
    the XLA blockwise kernel, which masks by positions; "xla" or "pallas" forces one.
    """
    spec_q = partition_spec(("batch", "length", "heads", "head_dim"), rules)
    spec_kv = partition_spec(("batch", "length", "kv_heads", "head_dim"), rules)
    spec_bl = partition_spec(("batch", "length"), rules)
    axes = _length_axes(mesh, rules)
    if not axes:
        raise ValueError(
            "attention='ring' needs a mesh and logical rules that map 'length' to mesh axes "
            f"(e.g. ('length', 'seq')); got mesh axes {None if mesh is None else dict(mesh.shape)} and "
            f"'length' -> {spec_q[1]!r}"
        )
    axis = axes[0] if len(axes) == 1 else axes
    n = seq_shards(mesh, rules)
    kv = k_BxSxKxD.shape[2]

    parts = 2 if zigzag else 1
    why_not = ring_flash.usable(mesh, q_BxQxHxD.shape[1] // (n * parts), chunk, q_BxQxHxD.shape[-1], sliding_window)
    use_pallas = block_kernel == "pallas" or (block_kernel == "auto" and why_not is None)

    def local(q, k, v, pos, seg):
        if use_pallas:  # [B, H, L, D] for the kernels; positions are implied by the layout
            t = lambda x: x.transpose(0, 2, 1, 3)
            return t(ring_flash.ring_flash(t(q), t(k), t(v), seg, seg, axis, n, parts, chunk))
        qg = group_heads(q, k.shape[2])
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
