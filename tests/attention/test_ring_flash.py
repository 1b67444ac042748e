"""The ring with Pallas flash blocks (the TPU path) against dense attention: outputs and dQ/dK/dV, GQA,
packed documents, contiguous and zig-zag layouts. On CPU the kernels run in Pallas' interpreter."""

import functools

import jax
import pytest
from jax.experimental import pallas as pl

from longrope_jax import attention as attn
from longrope_jax.attention import ring_flash
from longrope_jax.sharding.rules import DEFAULT_RULES
from tests.attention.inputs import assert_same_as_dense, mesh_of, packed_inputs


@pytest.fixture
def interpreted(monkeypatch):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    monkeypatch.setattr(fa.pl, "pallas_call", functools.partial(pl.pallas_call, interpret=True))


@pytest.mark.parametrize("zigzag", [True, False], ids=["zigzag", "contiguous"])
def test_pallas_ring_equals_dense(interpreted, zigzag):
    mesh = mesh_of(seq=2, fsdp=2)
    n, parts = 2, 2 if zigzag else 1
    length = n * parts * 128  # one 128-token block per part
    q, k, v, do, pos, seg = packed_inputs(b=2, length=length, docs=(length - 200, 200))

    def fn(q, k, v):
        args = (q, k, v, pos, seg)
        if zigzag:
            args = tuple(attn.zigzag(x, n) for x in args)
        out = attn.ring_attention(*args, mesh=mesh, rules=DEFAULT_RULES, chunk=128, zigzag=zigzag,
                                  block_kernel="pallas")
        return attn.unzigzag(out, n) if zigzag else out

    assert_same_as_dense(fn, q, k, v, do, pos, seg)


def test_the_pallas_blocks_are_chosen_only_where_they_fit():
    cpu = mesh_of(seq=2)
    assert ring_flash.usable(cpu, 512, 512, 128, None) == "not a TPU mesh"
    assert ring_flash.usable(None, 512, 512, 128, None) == "not a TPU mesh"


@pytest.mark.parametrize("length,expect_pallas", [(1024, True), (256, False)])
def test_on_a_tpu_slice_the_ring_compiles_with_pallas_blocks_where_they_fit(length, expect_pallas):
    """libtpu compiles the ring (forward and backward) for 4 v5p chips: Mosaic kernels when each device's
    zig-zag parts are whole 128-token blocks, the XLA blockwise kernel otherwise."""
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from longrope_jax.aot.topology import parse_topology, tpu_devices

    devices = np.asarray(tpu_devices(parse_topology("v5p:2x2x1"))).reshape(1, 1, 4, 1)
    mesh = Mesh(devices, ("data", "fsdp", "seq", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 4)
    spec = NamedSharding(mesh, PartitionSpec(None, "seq"))
    q = jax.ShapeDtypeStruct((1, length, 8, 128), jnp.bfloat16, sharding=spec)
    kv = jax.ShapeDtypeStruct((1, length, 2, 128), jnp.bfloat16, sharding=spec)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=spec)
    assert (ring_flash.usable(mesh, length // 8, 512, 128, None) is None) == expect_pallas

    def loss(q, k, v, pos, seg):
        out = attn.ring_attention(q, k, v, pos, seg, mesh=mesh, rules=DEFAULT_RULES, chunk=512, zigzag=True)
        return out.astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, ids, ids).compile().as_text()
    assert ("tpu_custom_call" in text) == expect_pallas


def test_ring_blocks_is_checked():
    from longrope_jax.model import LlamaConfig

    with pytest.raises(ValueError, match=r"LlamaConfig.ring_blocks: expected one of \('auto', 'xla', 'pallas'\)"):
        LlamaConfig(ring_blocks="mosaic")
