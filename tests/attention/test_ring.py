"""Ring attention against the dense reference (outputs and dQ/dK/dV) on meshes of 8 CPU devices, and
the full model's loss and gradients under dense, blockwise and ring attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import attention as attn
from longrope_jax.model import Llama, LlamaConfig, init_params
from longrope_jax.sharding.rules import DEFAULT_RULES
from tests.attention.inputs import RTOL, assert_same_as_dense, mesh_of, packed_inputs, rel

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
