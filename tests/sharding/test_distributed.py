"""Multi-host start and global batches, in one process: process-local slices, `global_batch`, and
`initialize_distributed` against a recording stand-in for `jax.distributed`."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from longrope_jax.platform import TPU_ENV_VARS, on_cloud_tpu_vm
from longrope_jax.sharding import distributed
from longrope_jax.sharding.distributed import global_batch, initialize_distributed, local_slices
from longrope_jax.sharding.mesh import batch_sharding
from tests.sharding.sharded_model import BATCH, LENGTH, mesh_of, tokens_np


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
