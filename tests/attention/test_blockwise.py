"""Blockwise attention against the dense reference (outputs and dQ/dK/dV), and its memory inside a
differentiated scan over layers (the kernel shared with the ring)."""

import math
import re

import jax
import jax.numpy as jnp
import pytest

from longrope_jax import attention as attn
from longrope_jax.sharding.rules import DEFAULT_RULES
from longrope_jax.attention.blockwise import CPU_CHUNK, block_schedule, cpu_blocks
from tests.attention.inputs import RTOL, assert_same_as_dense, dense_ref, packed_inputs, rel


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


@pytest.mark.parametrize("q_chunk, window", [(32, None), (64, None), (16, 12)])
def test_blockwise_with_more_query_rows_than_keys_per_block_equals_dense(q_chunk, window):
    # Documents of 40 and 24 tokens: blocks of 32 queries x 8 keys straddle the boundary (partial, masked),
    # lie inside one document (fully visible, unmasked) or across it (skipped).
    q, k, v, do, pos, seg = packed_inputs()
    fn = lambda q, k, v: attn.blockwise_attention(q, k, v, pos, pos, seg, seg, chunk=8, q_chunk=q_chunk,
                                                  sliding_window=window)
    assert_same_as_dense(fn, q, k, v, do, pos, seg, window=window)


def test_blockwise_on_zigzag_positions_equals_dense():
    q, k, v, do, pos, seg = packed_inputs(docs=(64,))
    idx = attn.zigzag_indices(64, 4)
    take = lambda x: jnp.take(x, idx, axis=1)
    fn = lambda q, k, v: attn.blockwise_attention(q, k, v, take(pos), take(pos), take(seg), take(seg), chunk=8, q_chunk=16)
    out = jax.jit(fn)(take(q), take(k), take(v))
    ref = jax.jit(lambda q, k, v: dense_ref(q, k, v, pos, seg))(q, k, v)
    assert rel(out, take(ref)) < RTOL


def test_block_schedule_of_a_causal_row_visits_each_needed_block_once():
    pos = jnp.broadcast_to(jnp.arange(64), (2, 64))
    seg = jnp.ones((2, 64), jnp.int32)
    order, n_full, n_part = block_schedule(pos, pos, seg, seg, 16, 8, None)
    # Query chunk i (16 rows) sees key blocks 0..2i+1 of 8: the first 2i fully, the two on the diagonal partly.
    assert n_full.tolist() == [0, 2, 4, 6] and n_part.tolist() == [2, 2, 2, 2]
    for i in range(4):
        assert sorted(order[i, : 2 * i + 2].tolist()) == list(range(2 * i + 2))
    _, n_full, n_part = block_schedule(pos, pos, seg, seg, 16, 8, 12)
    assert n_full.tolist() == [0, 0, 0, 0] and n_part.tolist() == [2, 4, 4, 4]


def test_chunk_must_divide_length():
    q, k, v, _, pos, seg = packed_inputs()
    with pytest.raises(ValueError, match="attention_chunk: length 64 is not a multiple of the chunk size 24"):
        attn.blockwise_attention(q, k, v, pos, pos, seg, seg, chunk=24)


# ---- memory under a differentiated scan over layers ------------------------------------------------
# Differentiating a `lax.scan` (what `nn.scan` over layers becomes) makes JAX hoist the loop-invariant part
# of its body. Without the kernels' optimization_barrier the mask work (a function of positions and segment
# ids only) was hoisted through the chunk scans and kept for every (query chunk, key chunk) pair:
# [nq, nk, B, K, G, cq, ck] buffers, O(heads * L^2), which the TPU compiler then had to allocate.

L_SCAN, H_SCAN, D_SCAN, CHUNK_SCAN = 256, 4, 16, 32


def _largest(jaxpr) -> int:
    sizes = [math.prod(int(d) for d in dims.split(",") if d)
             for dims in re.findall(r"\b(?:f32|f16|bf16|bool|i32)\[([0-9,]*)\]", str(jaxpr))]
    return max(sizes)


def _layer_scan_grad(kernel):
    pos = jnp.broadcast_to(jnp.arange(L_SCAN, dtype=jnp.int32), (2, L_SCAN))
    seg = jnp.ones((2, L_SCAN), jnp.int32)

    def loss(x, ws):
        def layer(x, w):
            return kernel(x * w, pos, seg), None
        return jnp.sum(jax.lax.scan(layer, x, ws)[0])

    x = jnp.ones((2, L_SCAN, H_SCAN, D_SCAN), jnp.float32)
    return jax.make_jaxpr(jax.grad(loss))(x, jnp.ones((2,)))


@pytest.mark.parametrize("impl", ["blockwise", "ring"])
def test_no_quadratic_buffers_under_a_differentiated_layer_scan(impl):
    if impl == "blockwise":
        kernel = lambda x, pos, seg: attn.blockwise_attention(x, x, x, pos, pos, seg, seg, chunk=CHUNK_SCAN)
    else:
        mesh = jax.make_mesh((1, 2, 2, 1), ("data", "fsdp", "seq", "tensor"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 4, devices=jax.devices()[:4])
        kernel = lambda x, pos, seg: attn.ring_attention(x, x, x, pos, seg, mesh=mesh, rules=DEFAULT_RULES, chunk=CHUNK_SCAN)
    # Linear: per-layer residuals [layers, B, L, H, D] (2 * 2 * L * H * D); quadratic: B * H * L * L per score tensor.
    assert _largest(_layer_scan_grad(kernel)) < 2 * H_SCAN * L_SCAN * L_SCAN // 4


@pytest.mark.parametrize("length", [256, 384, 1024, 1152, 4096, 8192, 16384, 65536])
@pytest.mark.parametrize("rows", [1, 9, 16, 64, 4096])
def test_cpu_blocks_are_square_powers_of_two_that_divide_the_length(length, rows):
    q_rows, keys = cpu_blocks(length, rows)
    assert q_rows == keys and keys & (keys - 1) == 0 and CPU_CHUNK <= keys <= 512 and not length % keys


def test_cpu_blocks_take_the_measured_sizes():
    assert cpu_blocks(256, 16 * 4) == (128, 128)  # the tiny model's training batch
    assert cpu_blocks(256, 4 * 4) == (128, 128)  # two chunks at least, so causal blocks are skipped
    assert cpu_blocks(512, 8 * 4) == (128, 128)  # the demo's evaluation batch at 512 tokens
    assert cpu_blocks(1024, 2 * 8) == (256, 256)  # the ~58M benchmark model
    assert cpu_blocks(4096, 9) == (256, 256)  # SmolLM2-135M, batch 1
    assert cpu_blocks(8192, 9) == cpu_blocks(16384, 9) == (512, 512)
