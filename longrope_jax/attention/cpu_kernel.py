"""The CPU flash-attention kernel (csrc/flash_cpu.cc, built by cpu_build.py) as a JAX op with a
custom VJP.

Same numbers as `dense_attention` (float32, to rounding) and the same mask rule. Where it cannot run
(not built, not float32, a head size or length it does not take), `supports` says so and the model
keeps the XLA path. `materialize` is the library's other op: a copy XLA:CPU cannot fuse through.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax.attention.cpu_build import available, unavailable

BLOCK_Q, BLOCK_K = 128, 128  # forward: queries per task (per head), keys per block; measured, README
BWD_BLOCK_Q, BWD_BLOCK_K = 128, 128  # backward: queries per block, keys per task


def _shape_problem(q_BxQxHxD, k_BxSxKxD) -> str | None:
    _, q_len, h, d = q_BxQxHxD.shape
    if q_BxQxHxD.dtype != jnp.float32 or k_BxSxKxD.dtype != jnp.float32:
        return f"expected float32 q and k, got {q_BxQxHxD.dtype} and {k_BxSxKxD.dtype}"
    if d % 16 or not 16 <= d <= 256:
        return f"expected a head_dim that is a multiple of 16 in [16, 256], got {d}"
    if q_len % 16 or k_BxSxKxD.shape[1] % 16:
        return f"expected query and key lengths that are multiples of 16, got {q_len} and {k_BxSxKxD.shape[1]}"
    if h % k_BxSxKxD.shape[2]:
        return f"expected query heads ({h}) to be a multiple of kv heads ({k_BxSxKxD.shape[2]})"
    return None


def supports(q_BxQxHxD, k_BxSxKxD) -> bool:
    """Whether the kernel takes these shapes and dtypes and is available here."""
    return _shape_problem(q_BxQxHxD, k_BxSxKxD) is None and available()


def _attrs(d, window, block_q, block_k):
    return dict(window=np.int64(-1 if window is None else window), scale=np.float32(d ** -0.5),
                block_q=np.int64(block_q), block_k=np.int64(block_k))


def _forward(q, k, v, qpos, kpos, qseg, kseg, window):
    b, q_len, h, d = q.shape
    call = jax.ffi.ffi_call("longrope_flash_fwd", (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                                   jax.ShapeDtypeStruct((b, h, q_len), jnp.float32)),
                            vmap_method="sequential")
    return call(q, k, v, qpos, kpos, qseg, kseg, **_attrs(d, window, BLOCK_Q, BLOCK_K))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, qpos, kpos, qseg, kseg, window):
    return _forward(q, k, v, qpos, kpos, qseg, kseg, window)[0]


def _flash_fwd(q, k, v, qpos, kpos, qseg, kseg, window):
    o, lse = _forward(q, k, v, qpos, kpos, qseg, kseg, window)
    return o, (q, k, v, o, lse, qpos, kpos, qseg, kseg)


def _flash_bwd(window, res, do):
    q, k, v, o, lse, qpos, kpos, qseg, kseg = res
    call = jax.ffi.ffi_call("longrope_flash_bwd", tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
                            vmap_method="sequential")
    dq, dk, dv = call(q, k, v, o, do.astype(jnp.float32), lse, qpos, kpos, qseg, kseg,
                      **_attrs(q.shape[-1], window, BWD_BLOCK_Q, BWD_BLOCK_K))
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, q_pos, k_pos, q_seg, k_seg, *, sliding_window=None):
    """Attention equal to `dense_attention` with `attention_mask(q_pos, k_pos, q_seg, k_seg, sliding_window)`,
    computed by the CPU kernel; check `supports` first. Rows that see no key give zeros (as blockwise)."""
    if (problem := _shape_problem(q_BxQxHxD, k_BxSxKxD)) or (problem := unavailable()):
        raise ValueError(f"flash_attention: {problem}")
    ints = [jnp.asarray(x, jnp.int32) for x in (q_pos, k_pos, q_seg, k_seg)]
    return _flash(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, *ints, sliding_window)


def materialize(x: jax.Array) -> jax.Array:
    """`x`, copied into a buffer of its own by the kernel library; `x` itself where the library is not
    available (same values either way). XLA:CPU cannot fuse through a custom call, so an expensive
    producer that every consumer would recompute (the rotary cos/sin, once per head otherwise) is
    evaluated once."""
    return x if unavailable() else _copy(x)


@jax.custom_jvp
def _copy(x):
    return jax.ffi.ffi_call("longrope_materialize", jax.ShapeDtypeStruct(x.shape, x.dtype),
                            vmap_method="broadcast_all")(x)


@_copy.defjvp
def _copy_jvp(primals, tangents):
    return _copy(primals[0]), tangents[0]
