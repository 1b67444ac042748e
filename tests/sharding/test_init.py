"""Sharded initialization on five meshes: every parameter's `.sharding.spec` against specs written by
hand, values against unsharded init, and the sharded forward against the unsharded one."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longrope_jax.model import Llama
from longrope_jax.sharding.distributed import (
    global_batch,
)
from longrope_jax.sharding.init import init_sharded, param_shardings
from longrope_jax.sharding.mesh import batch_sharding
from tests.sharding.sharded_model import (
    CONFIG,
    MESHES,
    axes_size,
    config_of,
    expected_spec,
    flat,
    mesh_of,
    normalize,
    reference_params,
    sharded_params,
    tokens_np,
)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_init_places_every_parameter_as_its_logical_names_say(mesh_name, scan):
    mesh = mesh_of(mesh_name)
    params = flat(sharded_params(mesh_name, scan))
    reference = flat(reference_params(scan))
    assert sorted(params) == sorted(reference)
    for path, x in params.items():
        want = expected_spec(path, scan)
        assert x.shape == reference[path].shape, path
        assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh, path
        assert normalize(x.sharding.spec, x.ndim) == want, (path, x.sharding.spec, want)
        # Each device holds exactly its block: no whole copy of a parameter the rules shard.
        block = tuple(d // axes_size(mesh, a) for d, a in zip(x.shape, want))
        assert {s.data.shape for s in x.addressable_shards} == {block}, path
        if any(axes_size(mesh, a) > 1 for a in want):
            assert np.prod(block) < np.prod(x.shape), path
    # 'data' replicates parameters; every other mesh axis shards the embedding.
    embedding, ways = params["embed_tokens/embedding"], mesh.size // mesh.shape["data"]
    assert {s.data.size for s in embedding.addressable_shards} == {embedding.size // ways}


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_sharded_init_equals_unsharded_init(scan):
    config, rng = config_of(scan), jax.random.key(0)
    jit_unsharded = jax.jit(lambda r: nn.meta.unbox(Llama(config).init(r, jnp.zeros((1, 8), jnp.int32))["params"]))(rng)
    ref, tokens = reference_params(scan), tokens_np()
    ref_logits = Llama(config).apply({"params": ref}, tokens)
    for mesh_name in ("fsdp8", "fsdp2_seq2_tensor2"):
        params = jax.device_get(sharded_params(mesh_name, scan))
        # Same random bits as jit of the unsharded init (threefry is partitionable) ...
        jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(jit_unsharded))
        # ... and the same model as eager `init_params` (which may differ in the last bit).
        np.testing.assert_allclose(Llama(config).apply({"params": params}, tokens), ref_logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_forward_equals_unsharded_forward(mesh_name, scan):
    mesh, config = mesh_of(mesh_name), config_of(scan)
    tokens = tokens_np()
    batch = global_batch(tokens, mesh, batch_sharding(mesh), tokens.shape)
    logits = jax.jit(Llama(config, mesh=mesh).apply)({"params": sharded_params(mesh_name, scan)}, batch)
    ref = Llama(config).apply({"params": reference_params(scan)}, tokens)
    want = P(("data", "fsdp"), "seq", "tensor")  # (batch, length, vocab)
    assert normalize(logits.sharding.spec, 3, mesh) == normalize(want, 3, mesh)
    err = np.max(np.abs(np.asarray(logits) - ref)) / np.max(np.abs(ref))
    assert err < 1e-5, f"relative error {err:.2e}"


@pytest.mark.parametrize("overrides, path, shape, axes", [
    ({"vocab_size": 97}, "embed_tokens/embedding", "(97, 64)", "'tensor' of size 2"),
    ({"num_key_value_heads": 1, "num_attention_heads": 8}, "layers_0/self_attn/k_proj/kernel", "(64, 1, 8)",
     "'tensor' of size 2"),
])
def test_parameter_that_does_not_divide_its_mesh_axes_names_itself(overrides, path, shape, axes):
    config = dataclasses.replace(CONFIG, **overrides)
    mesh = mesh_of("fsdp4_tensor2")
    for make in (param_shardings, functools.partial(init_sharded, rng=jax.random.key(0))):
        with pytest.raises(ValueError) as e:
            make(config, mesh)
        msg = str(e.value)
        assert f"parameter {path}: shape {shape}" in msg and axes in msg, msg


def test_param_shardings_tree_matches_init_params():
    shardings = param_shardings(CONFIG, mesh_of("fsdp8"))
    is_sharding = lambda x: isinstance(x, NamedSharding)
    assert jax.tree.structure(shardings, is_leaf=is_sharding) == jax.tree.structure(reference_params(False))
