"""Generation on a mesh (8 CPU devices): the prompt and the KV cache are split over the devices the
batch leaves free, the fill runs the ring over them, and every token and logit equals the one-device path."""

import dataclasses

import jax
import numpy as np
import pytest

from longrope_jax import generate as gen
from longrope_jax.model import LlamaConfig, init_params
from longrope_jax.sharding.mesh import make_mesh
from longrope_jax.sharding.rules import DEFAULT_RULES, partition_spec, sequence_rules

LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 40,
            "short_factor": [1.0] * 4, "long_factor": [3.0] * 4}


def _config(rope=None, **kw):
    return LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, rope_scaling=rope, initializer_range=0.3,
                       attention="blockwise", attention_chunk=8, **kw)


@pytest.mark.parametrize("rows,mesh_kw,rope", [
    (1, dict(fsdp=2, seq=4), None), (1, dict(fsdp=2, seq=4), LONGROPE), (2, dict(fsdp=2, seq=4), LONGROPE),
    (1, dict(data=2, fsdp=4), None),
])
def test_mesh_generation_equals_one_device(rows, mesh_kw, rope):
    config = _config(rope, scan_layers=rope is None)
    params = init_params(config, jax.random.key(3))
    prompts = np.random.default_rng(rows).integers(0, 97, (rows, 30)).astype(np.int32)
    mesh = make_mesh(**mesh_kw)
    want = gen.generate(config, params, prompts, 17)  # crosses 40 tokens: LongRoPE re-prefills on the way
    got = gen.generate(config, params, prompts, 17, mesh=mesh)
    np.testing.assert_array_equal(got, want)
    logits_one, _ = gen.prefill(config, params, prompts, 46)
    logits_mesh, state = gen.prefill(config, params, prompts, 46, mesh=mesh)
    np.testing.assert_allclose(np.asarray(logits_mesh), np.asarray(logits_one), rtol=1e-5, atol=1e-5)
    slots = state["cache"]["k"].shape[2]
    assert slots == gen.cache_slots(config, 30, 46, rows, mesh) and slots >= 46
    spec = state["cache"]["k"].sharding.spec
    split = spec[2] if isinstance(spec[2], tuple) else (spec[2],)
    # the slots are split over every axis the batch leaves free: 8 devices in all
    batch = spec[1] if isinstance(spec[1], tuple) else (spec[1],) if spec[1] else ()
    assert np.prod([mesh.shape[a] for a in split + batch]) == 8


def test_sequence_rules_give_the_batch_only_the_axes_it_fills():
    shape = {"data": 1, "fsdp": 4, "seq": 8, "tensor": 1}
    one = sequence_rules(DEFAULT_RULES, shape, 1)
    assert partition_spec(("batch", "length"), one) == jax.sharding.PartitionSpec("data", ("fsdp", "seq"))
    assert partition_spec(("cache_length",), one)[0] == ("fsdp", "seq")
    four = sequence_rules(DEFAULT_RULES, shape, 4)
    assert partition_spec(("batch", "length"), four) == jax.sharding.PartitionSpec(("data", "fsdp"), "seq")
    step = sequence_rules(DEFAULT_RULES, shape, 1, decode=True)
    assert partition_spec(("batch", "length", "cache_length"), step)[1:] == (None, ("fsdp", "seq"))


def test_cache_slots_hold_the_padded_prompt_and_split_evenly():
    config = _config()  # attention_chunk 8: fills round to 8 tokens per device
    mesh = make_mesh(fsdp=2, seq=4)
    assert gen.cache_slots(config, 30, 46, 1, mesh) == 64  # 8 devices x 8 slots
    assert gen.cache_slots(config, 64, 79, 1, mesh) == 80  # the prompt is one chunk per device
    assert gen.cache_slots(config, 46, 46, 8, mesh) == 64  # 8 rows take fsdp: 4 pieces of 16
    assert gen.cache_slots(config, 30, 46, 1) == 48
    wide = dataclasses.replace(config, attention_chunk=512)
    assert gen.cache_slots(wide, 30, 46, 1) == 128 and gen.cache_slots(wide, 600, 700, 1) == 1024
    assert gen.cache_slots(wide, 300, 316, 1, mesh) == 1024  # 38 per device -> one bucket of 128


def test_nearby_prompt_lengths_share_one_compile():
    config = dataclasses.replace(_config(), attention_chunk=64)
    params = init_params(config, jax.random.key(3))
    before = gen.prefill_jit._cache_size(), gen.decode_jit._cache_size()
    outs = [gen.generate(config, params, np.ones((1, t), np.int32), 5) for t in (40, 50, 60)]
    assert (gen.prefill_jit._cache_size(), gen.decode_jit._cache_size()) == (before[0] + 1, before[1] + 1)
    assert all(o.shape == (1, 5) for o in outs)


def test_generation_shardings_are_the_ones_prefill_returns():
    config = _config()
    params = init_params(config, jax.random.key(3))
    mesh = make_mesh(fsdp=2, seq=4)
    _, state = gen.prefill(config, params, np.ones((1, 30), np.int32), 46, mesh=mesh)
    want = gen.generation_shardings(state, mesh)
    for got, expected in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
        assert got.sharding.is_equivalent_to(expected, got.ndim)
