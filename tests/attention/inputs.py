"""Attention test inputs and the dense reference: packed q/k/v, meshes on 8 CPU devices, relative error."""

import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax import attention as attn

RTOL = 1e-5
AXES = ("data", "fsdp", "seq", "tensor")


def mesh_of(data=1, fsdp=1, seq=1, tensor=1):
    return jax.make_mesh((data, fsdp, seq, tensor), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def packed_inputs(b=2, length=64, h=4, kv=2, d=16, seed=0, docs=(40, 24)):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, length, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, length, kv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, length, kv, d)), jnp.float32)
    do = jnp.asarray(rng.standard_normal((b, length, h, d)), jnp.float32)
    pos = np.concatenate([np.arange(n) for n in docs])
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(docs)])
    pos, seg = (jnp.asarray(np.broadcast_to(x, (b, length)), jnp.int32) for x in (pos, seg))
    return q, k, v, do, pos, seg


def dense_ref(q, k, v, pos, seg, window=None):
    return attn.dense_attention(q, k, v, attn.attention_mask(pos, pos, seg, seg, window))


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def assert_same_as_dense(fn, q, k, v, do, pos, seg, window=None):
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    ref, ref_vjp = jax.vjp(jax.jit(lambda q, k, v: dense_ref(q, k, v, pos, seg, window)), q, k, v)
    assert rel(out, ref) < RTOL
    for name, g, r in zip(("dq", "dk", "dv"), vjp(do), ref_vjp(do)):
        assert rel(g, r) < RTOL, name
