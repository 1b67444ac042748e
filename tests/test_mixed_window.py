"""LongRoPE2's mixed context window (`LlamaConfig.mixed_window`): in a packed row, every document's logits
equal those of a forward pass over that document alone (which picks short or long factors by its own
length, as HF does), with dense, blockwise and ring attention (both layouts); the training config's key."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax.model import Llama, LlamaConfig, init_params
from longrope_jax.rope import RopeScaling, document_lengths
from tests.attention.inputs import RTOL, mesh_of, rel

ORIGINAL = 16
DOCS = (10, 30, 4, 20)  # short, long, short, long (> ORIGINAL): one 64-token row


def _config(**kw):
    rng = np.random.default_rng(0)
    scaling = RopeScaling("longrope", original_max_position_embeddings=ORIGINAL, factor=4.0,
                          short_factor=tuple(1 + rng.random(8) * 0.1), long_factor=tuple(1 + np.arange(8) * 1.5))
    return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       attention_chunk=8, rope_scaling=scaling, **kw)


def _packed(rows=2):
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 97, (rows, sum(DOCS))), jnp.int32)
    pos = np.concatenate([np.arange(n) for n in DOCS])
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(DOCS)])
    return tokens, *(jnp.asarray(np.broadcast_to(x, tokens.shape), jnp.int32) for x in (pos, seg))


def _per_document(config, params, tokens):
    """Each document alone (positions 0..n-1, one segment), concatenated back into the row."""
    model, out, start = Llama(config), [], 0
    for n in DOCS:
        out.append(model.apply({"params": params}, tokens[:, start:start + n]))
        start += n
    return jnp.concatenate(out, axis=1)


def test_document_lengths_follow_each_segment_in_any_order():
    _, pos, seg = _packed(1)
    want = np.concatenate([np.full(n, n) for n in DOCS])
    np.testing.assert_array_equal(document_lengths(pos, seg)[0], want)
    perm = np.random.default_rng(2).permutation(pos.shape[1])  # the zig-zag layout is a permutation
    np.testing.assert_array_equal(document_lengths(pos[:, perm], seg[:, perm])[0], want[perm])


@pytest.mark.parametrize("attention,layout,zigzag", [
    ("dense", None, False), ("blockwise", None, False), ("ring", (2, 4), True), ("ring", (1, 8), False)],
    ids=["dense", "blockwise", "ring-zigzag", "ring-contiguous"])
def test_packed_row_equals_per_document_forwards(attention, layout, zigzag):
    config = _config(mixed_window=True)
    params = init_params(config, jax.random.key(0))
    tokens, pos, seg = _packed()
    want = _per_document(config, params, tokens)
    mesh = None if layout is None else mesh_of(fsdp=layout[0], seq=layout[1])
    run = dataclasses.replace(config, attention=attention, ring_zigzag=zigzag)
    got = jax.jit(lambda p: Llama(run, mesh=mesh).apply({"params": p}, tokens, positions=pos, segment_ids=seg))(params)
    assert rel(got, want) < RTOL
    # Without the option the row's longest document decides for all: the short ones get the long factors.
    whole = Llama(dataclasses.replace(config, mixed_window=False)).apply(
        {"params": params}, tokens, positions=pos, segment_ids=seg)
    assert rel(whole[:, :DOCS[0]], want[:, :DOCS[0]]) > 1e-3


def test_gradients_match_per_document_losses():
    config = _config(mixed_window=True)
    params = init_params(config, jax.random.key(3))
    tokens, pos, seg = _packed()

    def nll(logits, toks):
        return jnp.sum(jax.nn.logsumexp(logits[:, :-1], -1)
                       - jnp.take_along_axis(logits[:, :-1], toks[:, 1:, None], -1)[..., 0])

    def packed_loss(p):
        logits = Llama(config).apply({"params": p}, tokens, positions=pos, segment_ids=seg)
        total, start = 0.0, 0
        for n in DOCS:  # a document's last token predicts nothing across the boundary
            total += nll(logits[:, start:start + n], tokens[:, start:start + n])
            start += n
        return total

    def separate_loss(p):
        total, start = 0.0, 0
        for n in DOCS:
            toks = tokens[:, start:start + n]
            total += nll(Llama(config).apply({"params": p}, toks), toks)
            start += n
        return total

    got, want = jax.grad(packed_loss)(params), jax.grad(separate_loss)(params)
    jax.tree.map(lambda g, w: np.testing.assert_array_less(rel(g, w), RTOL), got, want)


def test_training_config_sets_it_and_refuses_a_length_independent_rope(tmp_path):
    from longrope_jax.train.config import default_config, model_config

    c = default_config()
    c.rope.mixed_window = True
    with pytest.raises(ValueError, match=r"config.rope.mixed_window: needs a length-dependent RoPE"):
        model_config(c)
    c.rope.type, c.rope.factor = "dynamic", 2.0
    assert model_config(c).mixed_window is True


def test_a_non_boolean_mixed_window_is_a_clear_error():
    with pytest.raises(ValueError, match=r"LlamaConfig.mixed_window: expected true or false, got 'yes'"):
        _config(mixed_window="yes")
