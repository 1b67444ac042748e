"""The one next-token NLL (`longrope_jax.loss`) against a float64 log-softmax in numpy and a per-position
loop for the targets (tests/nll_reference.py), on random packed batches: padding and a document's last
token score nothing, the zig-zag ring order under a mesh gives the plain order's sums, and perplexity
reads inf rather than raising when it overflows."""

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import attention as attn
from longrope_jax import loss
from longrope_jax.model import Llama, init_params
from longrope_jax.sharding.mesh import make_mesh
from longrope_jax.sharding.rules import DEFAULT_RULES
from tests.nll_reference import next_token_mask64, nll64
from tests.tiny import BYTE_VOCAB, random_byte_llama

B, L = 4, 64


def packed_batch(seed: int, b: int = B, length: int = L, vocab: int = BYTE_VOCAB) -> dict[str, np.ndarray]:
    """Rows of 1-4 random documents (numbered 1.., positions restarting at 0) then padding (segment 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, length)).astype(np.int32)
    positions, segments = np.zeros((b, length), np.int32), np.zeros((b, length), np.int32)
    for r in range(b):
        used = length - int(rng.integers(0, length // 4))  # up to a quarter padding
        cuts = np.sort(rng.choice(np.arange(1, used), size=int(rng.integers(0, 4)), replace=False))
        for doc, (start, stop) in enumerate(zip([0, *cuts], [*cuts, used])):
            segments[r, start:stop] = doc + 1
            positions[r, start:stop] = np.arange(stop - start)
    return {"tokens": tokens, "positions": positions, "segment_ids": segments}


@pytest.fixture(scope="module")
def model():
    config = random_byte_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=L,
                               num_key_value_heads=2, attention_chunk=8)
    return config, jax.jit(lambda rng: init_params(config, rng))(jax.random.key(0))


def test_next_token_targets_drop_padding_and_cross_document_targets():
    # Hand-made: documents [5 6 7] and [8 9], then two pads. 7 (EOS of the first) must not predict 8.
    tokens = np.array([[5, 6, 7, 8, 9, 0, 0]])
    segments = np.array([[1, 1, 1, 2, 2, 0, 0]])
    targets, mask = loss.next_token_targets(jnp.asarray(tokens), jnp.asarray(segments))
    np.testing.assert_array_equal(mask, [[True, True, False, True, False, False, False]])
    np.testing.assert_array_equal(np.where(mask, targets, -1), [[6, 7, -1, 9, -1, -1, -1]])
    for seed in range(5):
        batch = packed_batch(seed)
        targets, mask = loss.next_token_targets(jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"]))
        want_targets, want_mask = next_token_mask64(batch["tokens"], batch["segment_ids"])
        np.testing.assert_array_equal(mask, want_mask)
        np.testing.assert_array_equal(np.where(want_mask, targets, 0), want_targets)
        assert (batch["segment_ids"] == 0).any() and want_mask.sum() < B * (L - 1)  # padding and documents ends


@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["spread", "peaked"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_nll_equals_a_float64_log_softmax(scale, dtype):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((3, 17, 501)) * scale, dtype)
    targets = rng.integers(0, 501, (3, 17))
    got = loss.token_nll(logits, jnp.asarray(targets))
    assert got.dtype == jnp.float32  # the softmax runs in fp32 whatever the logits' dtype
    np.testing.assert_allclose(got, nll64(np.asarray(logits.astype(jnp.float32)), targets), rtol=1e-5, atol=1e-5)


def test_masked_and_sum_nll_equal_the_reference_on_packed_batches(model):
    config, params = model
    net = Llama(config)
    for seed in (2, 3):
        batch = packed_batch(seed)
        logits = net.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"])
        targets, mask = next_token_mask64(batch["tokens"], batch["segment_ids"])
        want = np.where(mask, nll64(logits, targets), 0.0)
        jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
        got = loss.masked_nll(net, params, jbatch, jnp.asarray(targets), jnp.asarray(mask))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        total, count = loss.sum_nll(net, params, jbatch)
        assert int(count) == mask.sum()
        assert float(total) == pytest.approx(want.sum(), rel=1e-5)


@pytest.mark.parametrize("chunk", [8, 64], ids=["chunked", "whole"])
@pytest.mark.parametrize("flat", [False, True], ids=["BxL", "tokens"])
def test_chunked_token_nll_and_its_gradient_equal_a_float64_log_softmax(chunk, flat):
    rng = np.random.default_rng(4)
    hidden, head = rng.standard_normal((3, 32, 16)), rng.standard_normal((16, 40)) * 0.5
    targets = rng.integers(0, 40, (3, 32))
    got = loss.chunked_token_nll(jnp.asarray(hidden, jnp.float32), jnp.asarray(head, jnp.float32),
                                 jnp.asarray(targets), chunk=chunk, flat=flat)
    np.testing.assert_allclose(got, nll64(hidden @ head, targets), rtol=1e-5, atol=1e-5)
    # d(sum NLL)/d head = hidden^T (softmax - onehot), in float64
    logits = hidden @ head
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("ble,blv->ev", hidden, p - np.eye(40)[targets])
    grad = jax.grad(lambda w: jnp.sum(loss.chunked_token_nll(
        jnp.asarray(hidden, jnp.float32), w, jnp.asarray(targets), chunk=chunk, flat=flat)))(jnp.asarray(head, jnp.float32))
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", [(2, 4), (1, 8)], ids=["fsdp2xseq4", "fsdp1xseq8"])
def test_zigzag_ring_under_a_mesh_equals_the_plain_order(model, layout):
    config, params = model
    mesh = make_mesh(fsdp=layout[0], seq=layout[1])
    batch = {k: jnp.asarray(v) for k, v in packed_batch(4).items()}
    plain = Llama(config)
    ring = Llama(dataclasses.replace(config, attention="ring", ring_zigzag=True), mesh=mesh, rules=DEFAULT_RULES)
    assert loss.zigzag_shards(plain) == 1 and loss.zigzag_shards(ring) == layout[1]
    contiguous = Llama(dataclasses.replace(config, attention="ring", ring_zigzag=False), mesh=mesh, rules=DEFAULT_RULES)
    assert loss.zigzag_shards(contiguous) == 1

    want_total, want_count = loss.sum_nll(plain, params, batch)
    for net in (ring, contiguous):
        total, count = jax.jit(lambda p, b, net=net: loss.sum_nll(net, p, b))(params, batch)
        assert int(count) == int(want_count)
        assert float(total) == pytest.approx(float(want_total), rel=1e-5)

    # Per position: the ring's NLL comes back in the zig-zag order; undone, it is the plain order's.
    targets, mask = loss.next_token_targets(batch["tokens"], batch["segment_ids"])
    want = loss.masked_nll(plain, params, batch, targets, mask)
    got = jax.jit(lambda p, b, t, m: loss.masked_nll(ring, p, b, t, m))(params, batch, targets, mask)
    assert not np.allclose(got, want, rtol=1e-3)  # really reordered ...
    np.testing.assert_allclose(attn.unzigzag(got, layout[1]), want, rtol=1e-5, atol=1e-6)  # ... and only that

    # The gradients of the summed NLL match too (the training objective).
    grad = jax.jit(jax.grad(lambda p: loss.sum_nll(ring, p, batch)[0]))(params)
    ref = jax.grad(lambda p: loss.sum_nll(plain, p, batch)[0])(params)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(np.abs(r).max())),
                 grad, ref)


def test_perplexity_reads_inf_on_overflow_and_keeps_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning may escape either
        assert loss.perplexity(1e4) == math.inf
        assert math.isnan(loss.perplexity(math.nan))
        assert loss.perplexity(math.log(7.0)) == pytest.approx(7.0, rel=1e-12)
        assert isinstance(loss.perplexity(np.float32(0.5)), float)
        got = loss.perplexity(np.array([0.0, 1e4, np.nan, -np.inf]))
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    assert got[0] == 1.0 and got[1] == math.inf and math.isnan(got[2]) and got[3] == 0.0


def _loss_grad_temporaries(chunk: int) -> int:
    """Compiled temporaries of d(sum NLL)/d(hidden, head) for a TPU chip (libtpu; deterministic)."""
    from longrope_jax.aot.topology import parse_topology, tpu_devices

    device = tpu_devices(parse_topology("v5p:2x2x1"))[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = (jax.ShapeDtypeStruct((1, 4096, 256), jnp.bfloat16, sharding=sharding),
            jax.ShapeDtypeStruct((256, 8192), jnp.bfloat16, sharding=sharding),
            jax.ShapeDtypeStruct((1, 4096), jnp.int32, sharding=sharding))
    fn = jax.value_and_grad(lambda h, w, t: jnp.sum(loss.chunked_token_nll(h, w, t, chunk=chunk)), argnums=(0, 1))
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_loss_compiles_to_a_fraction_of_the_dense_temporaries():
    dense, chunked = _loss_grad_temporaries(4096), _loss_grad_temporaries(256)
    # Dense holds [4096, 8192] fp32 logits (128 MiB) and their gradient; chunks of 256 hold 1/16 of that.
    assert dense > 128 << 20 and chunked < dense / 4
