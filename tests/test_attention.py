"""Blockwise and ring attention against the dense reference: outputs and dQ/dK/dV, 8 CPU devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import attention as attn
from longrope_jax.model import Llama, LlamaConfig, init_params
from longrope_jax.sharding.rules import DEFAULT_RULES

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


@pytest.mark.parametrize("kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("chunk", [8, 16, 64])
def test_blockwise_equals_dense(kv, chunk):
    q, k, v, do, pos, seg = packed_inputs(kv=kv)
    fn = lambda q, k, v: attn.blockwise_attention(q, k, v, pos, pos, seg, seg, chunk=chunk)
    assert_same_as_dense(fn, q, k, v, do, pos, seg)


def test_blockwise_sliding_window_equals_dense():
    q, k, v, do, pos, seg = packed_inputs()
    fn = lambda q, k, v: attn.blockwise_attention(q, k, v, pos, pos, seg, seg, chunk=8, sliding_window=12)
    assert_same_as_dense(fn, q, k, v, do, pos, seg, window=12)


RING_MESHES = [
    dict(seq=2, fsdp=4), dict(seq=4, fsdp=2), dict(seq=8), dict(seq=2, data=2, tensor=2),
    dict(seq=4, tensor=2), dict(seq=2, data=2, fsdp=2),
]


@pytest.mark.parametrize("mesh_kw", RING_MESHES, ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()))
@pytest.mark.parametrize("zigzag", [True, False], ids=["zigzag", "contiguous"])
def test_ring_equals_dense(mesh_kw, zigzag):
    mesh = mesh_of(**mesh_kw)
    n = mesh.shape["seq"]
    q, k, v, do, pos, seg = packed_inputs(b=4)

    def fn(q, k, v):
        args = (q, k, v, pos, seg)
        if zigzag:
            args = tuple(attn.zigzag(x, n) for x in args)
        out = attn.ring_attention(*args, mesh=mesh, rules=DEFAULT_RULES, chunk=8)
        return attn.unzigzag(out, n) if zigzag else out

    assert_same_as_dense(fn, q, k, v, do, pos, seg)


def test_ring_sliding_window_and_one_chunk_per_device():
    mesh = mesh_of(seq=4, fsdp=2)
    q, k, v, do, pos, seg = packed_inputs()
    fn = lambda q, k, v: attn.ring_attention(q, k, v, pos, seg, mesh=mesh, rules=DEFAULT_RULES, chunk=64, sliding_window=10)
    assert_same_as_dense(fn, q, k, v, do, pos, seg, window=10)


def test_ring_needs_a_mesh_with_a_length_axis():
    q, k, v, _, pos, seg = packed_inputs()
    with pytest.raises(ValueError, match="attention='ring' needs a mesh"):
        attn.ring_attention(q, k, v, pos, seg, mesh=None, rules=DEFAULT_RULES)
    no_length = tuple(r for r in DEFAULT_RULES if r[0] != "length")
    with pytest.raises(ValueError, match="'length' -> None"):
        attn.ring_attention(q, k, v, pos, seg, mesh=mesh_of(seq=8), rules=no_length)


def test_chunk_must_divide_length():
    q, k, v, _, pos, seg = packed_inputs()
    with pytest.raises(ValueError, match="attention_chunk: length 64 is not a multiple of the chunk size 24"):
        attn.blockwise_attention(q, k, v, pos, pos, seg, seg, chunk=24)


def test_zigzag_round_trip_and_balanced_work():
    idx = attn.zigzag_indices(16, 2)
    np.testing.assert_array_equal(idx, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    x = jnp.arange(2 * 32).reshape(2, 32)
    np.testing.assert_array_equal(attn.unzigzag(attn.zigzag(x, 4), 4), x)
    contiguous = attn.causal_blocks_per_device(64, 8, balanced=False, chunk=4)
    balanced = attn.causal_blocks_per_device(64, 8, balanced=True, chunk=4)
    assert contiguous.sum() == balanced.sum()
    assert contiguous.max() / contiguous.min() > 5
    assert balanced.max() / balanced.min() <= 1.2
    assert attn.causal_critical_path(64, 8, True, 4) < attn.causal_critical_path(64, 8, False, 4)
    with pytest.raises(ValueError, match="multiple of 2 x seq shards"):
        attn.zigzag_indices(20, 4)


# ---- the full model ----------------------------------------------------------------------------------


def _config(**kw):
    return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       attention_chunk=8, **kw)


def _loss(config, mesh, params, tokens, segments):
    positions = jnp.concatenate([jnp.arange(40), jnp.arange(24)])[None].repeat(tokens.shape[0], 0)
    logits = Llama(config, mesh=mesh).apply({"params": params}, tokens, positions=positions, segment_ids=segments)
    nll = jax.nn.logsumexp(logits[:, :-1], -1) - jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    return jnp.mean(nll), logits


@pytest.mark.parametrize(
    "attention,layout",
    [("blockwise", None), ("ring", (1, 8)), ("ring", (2, 4)), ("ring", (4, 2)), ("dense", (2, 4))],
    ids=["blockwise", "ring-fsdp1xseq8", "ring-fsdp2xseq4", "ring-fsdp4xseq2", "dense-sharded"],
)
def test_model_loss_and_gradients_match_dense(attention, layout):
    config = _config(scan_layers=layout == (2, 4))
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 97, (4, 64)))
    segments = jnp.asarray(np.repeat([[1] * 40 + [2] * 24], 4, 0))
    (ref_loss, ref_logits), ref_grad = jax.value_and_grad(
        lambda p: _loss(config, None, p, tokens, segments), has_aux=True)(params)
    mesh = None if layout is None else mesh_of(fsdp=layout[0], seq=layout[1])
    other = dataclasses.replace(config, attention=attention)
    (loss, logits), grad = jax.jit(jax.value_and_grad(
        lambda p: _loss(other, mesh, p, tokens, segments), has_aux=True))(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    assert rel(logits, ref_logits) < RTOL  # ring: back in the original order
    jax.tree.map(lambda g, r: np.testing.assert_array_less(rel(g, r), RTOL), grad, ref_grad)


def test_model_accepts_pre_balanced_inputs():
    config = _config(attention="ring")
    mesh = mesh_of(fsdp=2, seq=4)
    params = init_params(config, jax.random.key(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 64)))
    positions = jnp.arange(64)[None].repeat(2, 0)
    ref = Llama(dataclasses.replace(config, attention="dense")).apply({"params": params}, tokens)
    balanced = jax.jit(lambda p, t, pos: Llama(config, mesh=mesh).apply({"params": p}, t, positions=pos, balanced=True))(
        params, attn.zigzag(tokens, 4), attn.zigzag(positions, 4))
    assert rel(attn.unzigzag(balanced, 4), ref) < RTOL


def test_ring_model_without_mesh_is_a_clear_error():
    config = _config(attention="ring")
    params = init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match="attention='ring' needs a mesh"):
        Llama(config).apply({"params": params}, jnp.zeros((1, 64), jnp.int32))


@pytest.mark.skipif(jax.devices()[0].platform != "tpu", reason="splash attention is a TPU (Pallas/Mosaic) kernel")
def test_splash_equals_dense_on_tpu():
    q, k, v, do, pos, seg = packed_inputs(length=512, d=128, docs=(300, 212))
    pos = jnp.arange(512)[None].repeat(2, 0)  # splash is causal by index: contiguous positions
    fn = lambda q, k, v: attn.splash_attention(q, k, v, seg)
    out = jax.jit(fn)(q, k, v)
    assert rel(out, dense_ref(q, k, v, pos, seg)) < 1e-2  # splash computes in bf16 on the MXU
