"""Flax LLaMA against transformers' LlamaForCausalLM (torch fp32), loaded through load_hf."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from longrope_jax.io.hf import load_hf
from longrope_jax.model import Llama, LlamaConfig, flat_dot_general, init_params
from longrope_jax.rope import RopeScaling

VOCAB, MAX_POS, ORIG = 97, 64, 32
RTOL = 1e-4

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": ORIG},
    "llama3": {"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": ORIG,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": ORIG,
                 "short_factor": [1.0 + 0.05 * i for i in range(8)],
                 "long_factor": [1.0 + 0.9 * i for i in range(8)]},
}


def make_hf(path, rope=None, *, kv_heads=2, tied=False, seed=0, max_pos=MAX_POS, **extra):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=max_pos, rope_scaling=rope,
        tie_word_embeddings=tied, rms_norm_eps=1e-5, **extra,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1; random scales make the test sensitive to them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


def hf_logits(model, tokens, positions=None):
    with torch.no_grad():
        kw = {} if positions is None else {"position_ids": torch.as_tensor(positions)}
        return model(torch.as_tensor(tokens), **kw).logits.numpy()


def tokens_of(length, batch=2, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


def assert_close(ours, ref):
    err = np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref))
    assert err < RTOL, f"relative error {err:.2e}"


@pytest.mark.parametrize("rope_name", list(ROPES))
@pytest.mark.parametrize("length", [24, 48], ids=["below_original", "above_original"])
def test_logits_match_transformers_for_every_rope_type(tmp_path, rope_name, length):
    rope = ROPES[rope_name]
    max_pos = ORIG if rope_name == "dynamic" else MAX_POS  # dynamic scales past max_position_embeddings
    model = make_hf(tmp_path, rope, max_pos=max_pos)
    config, params = load_hf(tmp_path)
    assert config.rope_scaling == RopeScaling.from_hf(rope)
    tokens = tokens_of(length)
    assert_close(Llama(config).apply({"params": params}, jnp.asarray(tokens)), hf_logits(model, tokens))


@pytest.mark.parametrize(
    "kv_heads,tied,scan,rope_name",
    [(4, False, False, "longrope"), (2, True, False, "yarn"), (2, False, True, "longrope"),
     (1, True, True, "llama3"), (4, True, True, "default")],
    ids=["mha", "gqa_tied", "gqa_scan", "mqa_tied_scan", "mha_tied_scan"],
)
def test_logits_match_transformers_across_geometries(tmp_path, kv_heads, tied, scan, rope_name):
    model = make_hf(tmp_path, ROPES[rope_name], kv_heads=kv_heads, tied=tied, seed=1)
    config, params = load_hf(tmp_path, scan_layers=scan)
    assert config.tie_word_embeddings is tied and config.num_key_value_heads == kv_heads
    assert ("layers" in params) is scan
    for length in (20, 40):
        tokens = tokens_of(length, seed=length)
        assert_close(Llama(config).apply({"params": params}, jnp.asarray(tokens)), hf_logits(model, tokens))


def test_attention_and_mlp_bias_match_transformers(tmp_path):
    model = make_hf(tmp_path, ROPES["yarn"], attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model.save_pretrained(tmp_path)
    config, params = load_hf(tmp_path)
    tokens = tokens_of(40)
    assert_close(Llama(config).apply({"params": params}, jnp.asarray(tokens)), hf_logits(model, tokens))


def test_explicit_positions_match_transformers_position_ids(tmp_path):
    model = make_hf(tmp_path, ROPES["longrope"])
    config, params = load_hf(tmp_path)
    tokens = tokens_of(16)
    positions = np.stack([np.arange(16) + 5, np.arange(16) + 30])  # second row crosses ORIG: long factors
    out = Llama(config).apply({"params": params}, jnp.asarray(tokens), positions=jnp.asarray(positions))
    # As in HF, max(positions)+1 over the whole batch picks the factors: long for both rows here.
    assert_close(out, hf_logits(model, tokens, positions))
    short = Llama(config).apply({"params": params}, jnp.asarray(tokens[:1]), positions=jnp.asarray(positions[:1]))
    assert_close(short, hf_logits(model, tokens[:1], positions[:1]))
    assert not np.allclose(short, out[:1], atol=1e-3)


def test_segment_ids_isolate_packed_documents(tmp_path):
    model = make_hf(tmp_path, ROPES["yarn"])
    config, params = load_hf(tmp_path)
    lengths = [11, 7, 14]
    docs = [tokens_of(n, batch=1, seed=i)[0] for i, n in enumerate(lengths)]
    tokens = np.concatenate(docs)[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    packed = np.asarray(Llama(config).apply(
        {"params": params}, jnp.asarray(tokens), positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments)
    ))
    start = 0
    for doc in docs:
        assert_close(packed[:, start:start + len(doc)], hf_logits(model, doc[None]))
        start += len(doc)
    # Without segment ids the later documents see earlier ones, so the check above can fail.
    unsegmented = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(tokens), positions=jnp.asarray(positions)))
    assert not np.allclose(unsegmented[:, lengths[0]:], packed[:, lengths[0]:], atol=1e-3)


def _tiny(**kw):
    kw.setdefault("rope_scaling", RopeScaling.from_hf(ROPES["longrope"]))
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS, **kw)


def _stack(params, n):
    layers = [params.pop(f"layers_{i}") for i in range(n)]
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def test_scan_and_remat_give_the_same_logits_and_gradients():
    config = _tiny()
    params = init_params(config, jax.random.key(0))
    tokens = jnp.asarray(tokens_of(40))

    def loss(cfg, p):
        logits = Llama(cfg).apply({"params": p}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    ref_loss, ref_grad = jax.value_and_grad(lambda p: loss(config, p))(params)
    stacked = _stack(dict(params), config.num_hidden_layers)
    for variant in (dict(scan_layers=True), dict(remat_policy="full"), dict(scan_layers=True, remat_policy="dots")):
        cfg = dataclasses.replace(config, **variant)
        p = stacked if cfg.scan_layers else params
        value, grad = jax.value_and_grad(lambda q: loss(cfg, q))(p)
        np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
        ref = _stack(dict(ref_grad), config.num_hidden_layers) if cfg.scan_layers else ref_grad
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grad, ref)


def test_scanned_init_has_a_leading_layers_axis_and_logical_names():
    config = _tiny(scan_layers=True)
    boxed = Llama(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    q = boxed["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.names == ("layers", "embed", "heads", "head_dim")
    assert q.value.shape == (3, 64, 4, 16)
    assert boxed["embed_tokens"]["embedding"].names == ("vocab", "embed")
    assert boxed["layers"]["self_attn"]["k_proj"]["kernel"].names == ("layers", "embed", "kv_heads", "head_dim")
    assert boxed["layers"]["mlp"]["down_proj"]["kernel"].names == ("layers", "mlp", "embed")


def test_traced_longrope_factors_reuse_one_compiled_model():
    config = _tiny()
    params = init_params(config, jax.random.key(0))
    tokens = jnp.asarray(tokens_of(48))  # above ORIG: long factors are in use
    traces = []

    @jax.jit
    def logits(long_factor, start_tokens):
        traces.append(1)
        scaling = dataclasses.replace(config.rope_scaling, long_factor=long_factor, start_tokens=start_tokens)
        return Llama(config).apply({"params": params}, tokens, rope_scaling=scaling)

    rng = np.random.default_rng(0)
    outs = []
    for n_hat in (0, 4):
        lam = np.sort(rng.uniform(1, 8, 8)).astype(np.float32)
        out = logits(jnp.asarray(lam), jnp.int32(n_hat))
        scaling = RopeScaling.from_hf({**ROPES["longrope"], "long_factor": lam.tolist(), "start_tokens": n_hat})
        ref = Llama(dataclasses.replace(config, rope_scaling=scaling)).apply({"params": params}, tokens)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        outs.append(out)
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1])


def test_bfloat16_compute_stays_close_to_float32():
    config = _tiny()
    params = init_params(config, jax.random.key(0))
    tokens = jnp.asarray(tokens_of(32))
    ref = Llama(config).apply({"params": params}, tokens)
    out = Llama(dataclasses.replace(config, dtype="bfloat16")).apply({"params": params}, tokens)
    assert out.dtype == jnp.float32
    assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 0.05


def test_config_hf_round_trip_and_transformers_accepts_it():
    for rope in ROPES.values():
        config = _tiny(rope_scaling=RopeScaling.from_hf(rope), tie_word_embeddings=True)
        d = config.to_hf()
        assert LlamaConfig.from_hf(d) == config
        hf = transformers.LlamaConfig(**{k: v for k, v in d.items() if k != "architectures"})
        assert LlamaConfig.from_hf(hf.to_dict()) == config


def test_phi3_style_top_level_original_length_wins():
    d = _tiny().to_hf()
    d["rope_parameters"]["original_max_position_embeddings"] = 16
    d["rope_scaling"]["original_max_position_embeddings"] = 16
    d["original_max_position_embeddings"] = 8
    assert LlamaConfig.from_hf(d).rope_scaling.original_max_position_embeddings == 8


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(model_type="gpt2"), "model_type"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
    ],
)
def test_config_errors_name_the_key(change, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf({**_tiny().to_hf(), **change})


def test_config_rejects_bad_jax_settings():
    with pytest.raises(ValueError, match="LlamaConfig.remat_policy"):
        _tiny(remat_policy="sometimes")
    with pytest.raises(ValueError, match="LlamaConfig.attention"):
        _tiny(attention="magic")
    with pytest.raises(ValueError, match="rope_scaling.short_factor: has 8 values; expected rotary_dim/2 = 4"):
        dataclasses.replace(_tiny(), head_dim=8)


def test_mistral_sliding_window_matches_transformers(tmp_path):
    cfg = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_POS, sliding_window=8, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    config, params = load_hf(tmp_path)
    assert config.model_type == "mistral" and config.sliding_window == 8
    tokens = tokens_of(30)
    ours = Llama(config).apply({"params": params}, jnp.asarray(tokens))
    assert_close(ours, hf_logits(model, tokens))
    unwindowed = Llama(dataclasses.replace(config, sliding_window=None)).apply({"params": params}, jnp.asarray(tokens))
    assert not np.allclose(unwindowed[:, 8:], ours[:, 8:], atol=1e-4)


def test_static_ntk_model_matches_transformers_at_the_exported_theta(tmp_path):
    # transformers has no "ntk" type: it runs as plain RoPE with base theta * s**(d/(d-2)).
    ntk = RopeScaling("ntk", factor=4.0)
    exported = ntk.to_hf(rope_theta=10000.0, head_dim=16)
    model = make_hf(tmp_path, None, rope_theta=exported["rope_theta"])
    config, params = load_hf(tmp_path)
    config = dataclasses.replace(config, rope_theta=10000.0, rope_scaling=ntk)
    assert config.to_hf()["rope_theta"] == pytest.approx(exported["rope_theta"])
    tokens = tokens_of(48)
    assert_close(Llama(config).apply({"params": params}, jnp.asarray(tokens)), hf_logits(model, tokens))


@pytest.mark.parametrize("lhs_shape, rhs_shape, dims", [
    ((12, 32), (32, 4, 8), (((1,), (0,)), ((), ()))),  # q/k/v projection: [T, E] x [E, H, D]
    ((12, 4, 8), (4, 8, 32), (((1, 2), (0, 1)), ((), ()))),  # o_proj: [T, H, D] x [H, D, E]
    ((2, 6, 32), (32, 16), (((2,), (0,)), ((), ()))),  # leading token axes kept
    ((3, 5, 7), (3, 7, 2), (((2,), (1,)), ((0,), (0,)))),  # batch axes: handed to lax.dot_general
])
def test_flat_dot_general_equals_dot_general(lhs_shape, rhs_shape, dims):
    rng = np.random.default_rng(0)
    lhs, rhs = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (lhs_shape, rhs_shape))
    want = jax.lax.dot_general(lhs, rhs, dims)
    got = flat_dot_general(lhs, rhs, dims)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
