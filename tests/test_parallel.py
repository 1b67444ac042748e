"""Mesh, logical rules, sharded init and data placement on 8 CPU devices.

References: unsharded single-device init and forward for values; for placement, partition specs
written out by hand below from the logical names and DEFAULT_RULES (not derived with Flax).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from longrope_jax.model import Llama, LlamaConfig, init_params
from longrope_jax.sharding import distributed
from longrope_jax.sharding.distributed import (
    TPU_ENV_VARS,
    global_batch,
    initialize_distributed,
    local_slices,
    on_cloud_tpu_vm,
)
from longrope_jax.sharding.init import init_sharded, param_shardings
from longrope_jax.sharding.mesh import batch_sharding, make_mesh
from longrope_jax.sharding.rules import DEFAULT_RULES, MESH_AXES, rules_from_config

# Every dimension a DEFAULT_RULES mesh below shards divides: heads and kv heads by tensor=4,
# hidden by fsdp*seq=8, vocab and mlp by 4.
CONFIG = LlamaConfig(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
)
BATCH, LENGTH = 8, 16

MESHES = {  # (data, fsdp, seq, tensor)
    "fsdp8": (1, 8, 1, 1),
    "fsdp2_tensor4": (1, 2, 1, 4),
    "fsdp4_tensor2": (1, 4, 1, 2),
    "fsdp2_seq2_tensor2": (1, 2, 2, 2),
    "data2_seq2_tensor2": (2, 1, 2, 2),
}

# By hand from DEFAULT_RULES: embed -> (fsdp, seq); heads, kv_heads, mlp, vocab -> tensor.
E = ("fsdp", "seq")
EXPECTED_SPECS = {
    "embed_tokens/embedding": ("tensor", E),  # (vocab, embed)
    "self_attn/q_proj/kernel": (E, "tensor", None),  # (embed, heads, head_dim)
    "self_attn/k_proj/kernel": (E, "tensor", None),  # (embed, kv_heads, head_dim)
    "self_attn/v_proj/kernel": (E, "tensor", None),
    "self_attn/o_proj/kernel": ("tensor", None, E),  # (heads, head_dim, embed)
    "mlp/gate_proj/kernel": (E, "tensor"),  # (embed, mlp)
    "mlp/up_proj/kernel": (E, "tensor"),
    "mlp/down_proj/kernel": ("tensor", E),  # (mlp, embed)
    "input_layernorm/scale": (E,),  # (embed,)
    "post_attention_layernorm/scale": (E,),
    "norm/scale": (E,),
    "lm_head/kernel": (E, "tensor"),  # (embed, vocab)
}


def mesh_of(name):
    data, fsdp, seq, tensor = MESHES[name]
    return make_mesh(data=data, fsdp=fsdp, seq=seq, tensor=tensor)


def config_of(scan):
    return dataclasses.replace(CONFIG, scan_layers=scan)


def flat(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="/"): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def expected_spec(path, scan):
    """The hand-written spec for a param path ('layers_0/mlp/up_proj/kernel' or 'layers/...')."""
    key = path.split("/", 1)[1] if path.startswith("layers") else path
    spec = EXPECTED_SPECS[key]
    return ((None,) + spec) if scan and path.startswith("layers/") else spec


def normalize(spec, ndim, mesh=None):
    """PartitionSpec -> tuple of length ndim; ('a',) and 'a' are the same placement, and so is
    leaving out an axis of size 1 of `mesh` (XLA drops those from the shardings it infers)."""
    out = [(tuple(a) if isinstance(a, (tuple, list)) else (a,)) if a is not None else () for a in tuple(spec)]
    if mesh is not None:
        out = [tuple(n for n in a if mesh.shape[n] > 1) for a in out]
    out = [None if not a else a for a in out]
    out = [a[0] if isinstance(a, tuple) and len(a) == 1 else a for a in out]
    return tuple(out + [None] * (ndim - len(out)))


def axes_size(mesh, axes):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


@functools.cache
def sharded_params(mesh_name, scan):
    return init_sharded(config_of(scan), mesh_of(mesh_name), jax.random.key(0))


@functools.cache
def reference_params(scan):
    return init_params(config_of(scan), jax.random.key(0))


def tokens_np():
    return np.random.default_rng(1).integers(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32)


# ---- make_mesh ---------------------------------------------------------------------------------


def test_make_mesh_default_puts_every_device_on_fsdp_with_auto_axes():
    mesh = make_mesh()
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "seq": 1, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert set(mesh.devices.flat) == set(jax.devices())


@pytest.mark.parametrize("kwargs, shape", [
    (dict(data=2, fsdp=-1, tensor=2), (2, 2, 1, 2)),
    (dict(data=-1, fsdp=2, seq=2, tensor=1), (2, 2, 2, 1)),
    (dict(fsdp=1, seq=-1), (1, 1, 8, 1)),
    (dict(data=2, fsdp=2, seq=2, tensor=1), (2, 2, 2, 1)),  # no -1: the sizes must use every device
])
def test_make_mesh_infers_the_minus_one_axis(kwargs, shape):
    mesh = make_mesh(**kwargs)
    assert tuple(mesh.shape[a] for a in MESH_AXES) == shape


def test_make_mesh_reshapes_explicit_devices_in_the_given_order():
    devices = jax.devices()[::-1][:4]
    mesh = make_mesh(fsdp=-1, seq=2, devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "seq": 2, "tensor": 1}
    assert list(mesh.devices.flat) == devices


@pytest.mark.parametrize("kwargs, message", [
    (dict(fsdp=3, seq=2), "data=1 x fsdp=3 x seq=2 x tensor=1 = 6 does not equal 8 devices"),
    (dict(fsdp=-1, seq=3), "the other axes give 3, which does not divide 8 devices"),
    (dict(data=-1, fsdp=-1), "at most one axis may be -1, got 2 (data, fsdp)"),
    (dict(fsdp=0), "make_mesh fsdp=0: expected a positive integer or -1"),
    (dict(tensor=2.0), "make_mesh tensor=2.0"),
])
def test_make_mesh_errors_show_the_arithmetic(kwargs, message):
    with pytest.raises(ValueError) as e:
        make_mesh(**kwargs)
    assert message in str(e.value)


# ---- rules -------------------------------------------------------------------------------------


def test_rules_from_config_replaces_in_place_and_appends_new_names():
    rules = rules_from_config({"embed": "fsdp", "vocab": None, "mlp": ["tensor"], "experts": "data,fsdp"})
    expected = dict(DEFAULT_RULES, embed="fsdp", vocab=None, experts=("data", "fsdp"))
    assert [name for name, _ in rules] == [name for name, _ in DEFAULT_RULES] + ["experts"]
    assert dict(rules) == expected
    hash(rules)  # a Flax module attribute must be hashable
    assert rules_from_config() == DEFAULT_RULES
    assert rules_from_config([("embed", "fsdp"), ("embed", "seq")])[2:4] == (("embed", "fsdp"), ("embed", "seq"))


@pytest.mark.parametrize("overrides, message", [
    ({"embed": "model"}, "logical axis rule 'embed': unknown mesh axis 'model'"),
    ({"mlp": ("tensor", "tesnor")}, "unknown mesh axis 'tesnor'"),
    ({"mlp": ("tensor", "tensor")}, "mesh axis repeated"),
    ([("embed",)], "expected a (logical name, mesh axes) pair"),
])
def test_rules_from_config_rejects_bad_overrides(overrides, message):
    with pytest.raises(ValueError) as e:
        rules_from_config(overrides)
    assert message in str(e.value)


def test_param_shardings_follow_overridden_rules():
    mesh = mesh_of("fsdp4_tensor2")
    rules = rules_from_config({"embed": "fsdp", "vocab": None, "mlp": None})
    shardings = flat(param_shardings(CONFIG, mesh, rules))
    assert normalize(shardings["embed_tokens/embedding"].spec, 2) == (None, "fsdp")
    assert normalize(shardings["layers_0/mlp/up_proj/kernel"].spec, 2) == ("fsdp", None)
    assert normalize(shardings["layers_0/self_attn/q_proj/kernel"].spec, 3) == ("fsdp", "tensor", None)


def test_batch_sharding_maps_batch_and_length():
    mesh = mesh_of("fsdp2_seq2_tensor2")
    assert normalize(batch_sharding(mesh).spec, 2) == (("data", "fsdp"), "seq")
    rules = rules_from_config({"batch": "data", "length": None})
    assert normalize(batch_sharding(mesh, rules).spec, 2) == ("data", None)


# ---- sharded init ------------------------------------------------------------------------------


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


# ---- data placement (single process) -----------------------------------------------------------


def test_local_slices_and_global_batch_in_one_process():
    mesh = mesh_of("fsdp2_seq2_tensor2")
    sharding = batch_sharding(mesh)
    assert local_slices((BATCH, LENGTH), sharding) == (slice(0, BATCH), slice(0, LENGTH))
    tokens = tokens_np()
    positions = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), tokens.shape).copy()
    batch = global_batch({"tokens": tokens, "positions": positions}, mesh, P(("data", "fsdp"), "seq"))
    for name, want in (("tokens", tokens), ("positions", positions)):
        assert batch[name].sharding.is_equivalent_to(sharding, 2), name
        np.testing.assert_array_equal(np.asarray(batch[name]), want)
        assert {s.data.shape for s in batch[name].addressable_shards} == {(BATCH // 2, LENGTH // 2)}


def test_global_batch_rejects_data_that_is_neither_local_nor_global():
    mesh = mesh_of("fsdp8")
    with pytest.raises(ValueError) as e:
        global_batch({"tokens": tokens_np()[:, :8]}, mesh, batch_sharding(mesh), (BATCH, LENGTH))
    assert "global_batch['tokens']: local data has shape (8, 8)" in str(e.value)
    assert "expected (8, 16)" in str(e.value)


# ---- initialize_distributed --------------------------------------------------------------------


@pytest.fixture
def fake_distributed(monkeypatch):
    """Records jax.distributed.initialize calls instead of starting a runtime."""
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for var in ("LONGROPE_COORDINATOR", "LONGROPE_NUM_PROCESSES", "LONGROPE_PROCESS_ID", *TPU_ENV_VARS):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_initialize_distributed_single_process_is_a_no_op(fake_distributed, monkeypatch):
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: False)
    assert initialize_distributed() is False
    assert initialize_distributed(num_processes=1) is False
    assert fake_distributed == []


def test_initialize_distributed_on_a_tpu_vm_lets_jax_detect_the_slice(fake_distributed, monkeypatch):
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: True)
    assert initialize_distributed() is True
    assert initialize_distributed() is True  # idempotent
    assert fake_distributed == [((), {"local_device_ids": None})]


def test_initialize_distributed_explicit_from_args_or_env_uses_gloo_on_cpu(fake_distributed, monkeypatch):
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: False)
    old = jax.config.jax_cpu_collectives_implementation
    try:
        jax.config.update("jax_cpu_collectives_implementation", None)
        assert initialize_distributed("10.0.0.1:1234", 2, 1) is True
        assert jax.config.jax_cpu_collectives_implementation == "gloo"
    finally:
        jax.config.update("jax_cpu_collectives_implementation", old)
    fake_distributed.clear()
    monkeypatch.setenv("LONGROPE_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("LONGROPE_NUM_PROCESSES", "4")
    monkeypatch.setenv("LONGROPE_PROCESS_ID", "3")
    assert initialize_distributed() is True
    assert fake_distributed == [(("10.0.0.1:1234", 4, 3), {"local_device_ids": None})]


@pytest.mark.parametrize("kwargs, env, message", [
    (dict(coordinator_address="10.0.0.1:1234"), {}, "missing ['num_processes', 'process_id']"),
    (dict(num_processes=2, process_id=0), {}, "missing ['coordinator_address']"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {}, "process_id=2 must be in [0, 2)"),
    ({}, {"LONGROPE_NUM_PROCESSES": "two"}, "LONGROPE_NUM_PROCESSES='two': expected an integer"),
])
def test_initialize_distributed_rejects_incomplete_settings(fake_distributed, monkeypatch, kwargs, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError) as e:
        initialize_distributed(**kwargs)
    assert message in str(e.value)
    assert fake_distributed == []


def test_tpu_worker_env_marks_a_cloud_tpu_vm(monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0,t1v-n-1")
    assert on_cloud_tpu_vm()
