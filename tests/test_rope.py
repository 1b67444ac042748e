"""RoPE variants against transformers' ROPE_INIT_FUNCTIONS and rotary module (torch fp32)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from longrope_jax import rope
from longrope_jax.rope import RopeScaling, apply_rotary, cos_sin, frequencies, rope_cos_sin
from tests.hf_reference import hf_cos_sin, hf_frequencies

RTOL = 2e-6


def ours(rope_dict, *, head_dim=128, theta=10000.0, max_pos=2048, seq_len=None):
    inv, att = frequencies(
        RopeScaling.from_hf(rope_dict), head_dim=head_dim, theta=theta, max_position_embeddings=max_pos, seq_len=seq_len
    )
    return np.asarray(inv), float(att)


def assert_matches_hf(rope_dict, **kw):
    inv, att = ours(rope_dict, **kw)
    ref_inv, ref_att = hf_frequencies(rope_dict, **kw)
    assert inv.shape == ref_inv.shape
    np.testing.assert_allclose(inv, ref_inv, rtol=RTOL, atol=0)
    assert att == pytest.approx(ref_att, rel=RTOL)


def draw(rng: np.random.Generator, rope_type: str):
    """A random model geometry, RoPE parameters and seq_len around the interesting boundaries."""
    head_dim = int(rng.choice([32, 64, 80, 96, 128, 256]))
    theta = float(rng.choice([10000.0, 500000.0, 1e6]))
    lo = int(rng.choice([256, 1024, 2048, 4096, 8192]))
    factor = float(np.round(rng.uniform(1.0, 64.0), 3))
    max_pos = int(lo * rng.choice([1, 2, 4, 16, 32]))
    prf = float(rng.choice([1.0, 1.0, 0.5, 0.75]))
    d = int(head_dim * prf)
    if d % 2:
        prf = 1.0
        d = head_dim
    d2 = d // 2
    seq_len = rng.choice([None, 0, 1, lo - 1, lo, lo + 1, max_pos, max_pos + 1, 4 * max_pos + 3])
    seq_len = None if seq_len is None else int(seq_len)
    p = {"rope_type": rope_type}
    if rope_type in ("linear", "dynamic"):
        p["factor"] = factor
    elif rope_type == "yarn":
        p.update(factor=factor, original_max_position_embeddings=lo)
        if rng.random() < 0.5:
            p["beta_fast"], p["beta_slow"] = float(rng.choice([8, 32, 128])), float(rng.choice([0.5, 1, 2]))
        if rng.random() < 0.3:
            p["attention_factor"] = float(rng.uniform(0.5, 2))
        if rng.random() < 0.3:
            p["mscale"], p["mscale_all_dim"] = float(rng.uniform(0.5, 1.5)), float(rng.uniform(0.5, 1.5))
        if rng.random() < 0.3:
            p["truncate"] = bool(rng.random() < 0.5)
    elif rope_type == "llama3":
        low = float(rng.choice([0.5, 1.0, 2.0]))
        p.update(factor=factor, original_max_position_embeddings=lo, low_freq_factor=low,
                 high_freq_factor=low + float(rng.choice([1.0, 3.0, 8.0])))
    elif rope_type == "longrope":
        p.update(
            short_factor=[float(x) for x in np.sort(rng.uniform(1, 4, d2))],
            long_factor=[float(x) for x in np.sort(rng.uniform(1, 80, d2))],
            original_max_position_embeddings=lo,
        )
        if rng.random() < 0.3:
            p["factor"] = factor
        if rng.random() < 0.3:
            p["attention_factor"] = float(rng.uniform(0.5, 2))
    if prf != 1.0:
        p["partial_rotary_factor"] = prf
    return p, dict(head_dim=head_dim, theta=theta, max_pos=max_pos, seq_len=seq_len)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn", "llama3", "longrope"])
def test_frequencies_match_transformers_on_drawn_configs(rope_type):
    rng = np.random.default_rng(sum(map(ord, rope_type)))
    for _ in range(40):
        p, kw = draw(rng, rope_type)
        assert_matches_hf(p, **kw)


@pytest.mark.parametrize("head_dim,theta", [(64, 10000.0), (128, 500000.0), (96, 1e6)])
def test_default_matches_transformers(head_dim, theta):
    for p in (None, {"rope_type": "default"}, {"type": "default"}):
        assert_matches_hf(p, head_dim=head_dim, theta=theta)


def test_default_with_partial_rotary_matches_linear_factor_one():
    # HF Llama's default init ignores partial_rotary_factor; its linear init (factor 1) honours it.
    inv, _ = ours({"rope_type": "default", "partial_rotary_factor": 0.5}, head_dim=128)
    ref, _ = hf_frequencies({"rope_type": "linear", "factor": 1.0, "partial_rotary_factor": 0.5}, head_dim=128)
    assert inv.shape == (32,)
    np.testing.assert_allclose(inv, ref, rtol=RTOL)


@pytest.mark.parametrize("s,max_pos", [(2.0, 2048), (8.0, 4096), (16.0, 2048)])
def test_static_ntk_equals_hf_dynamic_at_factor_one_and_s_times_length(s, max_pos):
    # Dynamic NTK with factor 1 at seq_len = s * L has base * s**(d/(d-2)): the static NTK-aware base.
    inv, att = ours({"rope_type": "ntk", "factor": s}, max_pos=max_pos)
    ref, _ = hf_frequencies({"rope_type": "dynamic", "factor": 1.0}, max_pos=max_pos, seq_len=int(s * max_pos))
    np.testing.assert_allclose(inv, ref, rtol=RTOL)
    assert att == 1.0


# ---- golden values from transformers' own tests/utils/test_modeling_rope_utils.py -------------


def test_golden_default():
    inv, _ = ours(None)
    assert inv[1] == pytest.approx(8.6596e-01, rel=1e-4)
    assert inv[-1] == pytest.approx(1.1548e-04, rel=1e-4)


@pytest.mark.parametrize("factor", [2.0, 10.0, 20.0])
def test_golden_linear(factor):
    inv, att = ours({"rope_type": "linear", "factor": factor})
    np.testing.assert_allclose(inv, ours(None)[0] / factor, rtol=1e-6)
    assert att == 1.0


def test_golden_dynamic():
    default = ours(None)[0]
    for seq_len in (None, 1, 2048):
        np.testing.assert_allclose(ours({"rope_type": "dynamic", "factor": 10.0}, seq_len=seq_len)[0], default, rtol=1e-6)
    inv, _ = ours({"rope_type": "dynamic", "factor": 10.0}, seq_len=16384)
    np.testing.assert_allclose(inv[[1, 2, -1]], [8.0931e-01, 6.5498e-01, 1.6265e-06], rtol=1e-4)


def test_golden_yarn():
    p = {"rope_type": "yarn", "factor": 10.0, "original_max_position_embeddings": 2048}
    inv, att = ours(p)
    default = ours(None)[0]
    assert att == pytest.approx(0.1 * math.log(10.0) + 1)
    assert np.all(inv <= default * (1 + 1e-6)) and np.all(inv >= default / 10 * (1 - 1e-6))
    np.testing.assert_allclose(inv[[16, 17, -1]], [1.0e-01, 8.3479e-02, 1.1548e-05], rtol=1e-4)
    assert ours({**p, "attention_factor": 0.5})[1] == 0.5
    wide, _ = ours({**p, "beta_fast": 1000.0})
    assert wide[0] == pytest.approx(default[0])
    np.testing.assert_allclose(wide[-20:], default[-20:] / 10, rtol=1e-6)
    assert np.all(wide[1:] < default[1:])


def test_golden_llama3():
    p = {"rope_type": "llama3", "factor": 10.0, "original_max_position_embeddings": 2048,
         "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    inv, att = ours(p)
    default = ours(None)[0]
    assert att == 1.0
    assert np.all(inv <= default * (1 + 1e-6)) and np.all(inv >= default / 10 * (1 - 1e-6))
    np.testing.assert_allclose(inv[[31, 32, 40]], [1.0730e-02, 7.7785e-03, 3.4539e-04], rtol=1e-4)
    all_scaled, _ = ours({**p, "high_freq_factor": 1000.0})
    assert np.all(all_scaled < default)


def test_golden_longrope_attention_and_switch():
    short, long = [1.5] * 64, [7.0] * 64
    p = {"rope_type": "longrope", "short_factor": short, "long_factor": long, "original_max_position_embeddings": 2048}
    default = ours(None)[0]
    inv, att = ours(p, max_pos=2048 * 8)
    assert att == pytest.approx(math.sqrt(1 + math.log(8) / math.log(2048)))
    np.testing.assert_allclose(inv, default / 1.5, rtol=1e-6)
    np.testing.assert_allclose(ours(p, seq_len=0)[0], default / 1.5, rtol=1e-6)
    np.testing.assert_allclose(ours(p, seq_len=2049)[0], default / 7.0, rtol=1e-6)


# ---- LongRoPE boundary, start tokens, traced parameters ---------------------------------------


def _longrope(d2=32, lo=64, **kw):
    rng = np.random.default_rng(0)
    return {
        "rope_type": "longrope",
        "short_factor": [float(x) for x in np.sort(rng.uniform(1, 2, d2))],
        "long_factor": [float(x) for x in np.sort(rng.uniform(1, 16, d2))],
        "original_max_position_embeddings": lo,
        **kw,
    }


@pytest.mark.parametrize("seq_len,long", [(63, False), (64, False), (65, True), (512, True)])
def test_longrope_switches_to_long_strictly_above_original_length(seq_len, long):
    p = _longrope()
    assert bool(rope.use_long_factors(RopeScaling.from_hf(p), seq_len)) is long
    assert_matches_hf(p, head_dim=64, max_pos=512, seq_len=seq_len)
    inv, _ = ours(p, head_dim=64, max_pos=512, seq_len=seq_len)
    expected = p["long_factor"] if long else p["short_factor"]
    np.testing.assert_allclose(inv, ours(None, head_dim=64)[0] / np.asarray(expected, np.float32), rtol=RTOL)


@pytest.mark.parametrize("length", [64, 65])
@pytest.mark.parametrize(
    "p",
    [
        _longrope(),
        {"rope_type": "dynamic", "factor": 4.0},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
        None,
    ],
    ids=["longrope", "dynamic", "yarn", "default"],
)
def test_model_cos_sin_match_hf_rotary_module_forward(p, length):
    # HF picks long/short (and the dynamic base) from max(position_ids)+1 at run time; so do we.
    positions = np.arange(length)[None]
    ref_cos, ref_sin = hf_cos_sin(p, positions, head_dim=64, max_pos=64 if p and p["rope_type"] == "dynamic" else 512)
    cos, sin = rope_cos_sin(
        RopeScaling.from_hf(p), jnp.asarray(positions), head_dim=64, theta=10000.0,
        max_position_embeddings=64 if p and p["rope_type"] == "dynamic" else 512,
    )
    np.testing.assert_allclose(np.asarray(cos), ref_cos, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin), ref_sin, rtol=1e-5, atol=2e-6)


def test_start_tokens_keep_original_angles_below_n_hat():
    n_hat = 8
    p = _longrope()
    scaling = RopeScaling.from_hf({**p, "start_tokens": n_hat})
    positions = np.arange(100)[None]
    cos, sin = rope_cos_sin(scaling, jnp.asarray(positions), head_dim=64, theta=10000.0, max_position_embeddings=512)
    plain_cos, plain_sin = hf_cos_sin(None, positions, head_dim=64, max_pos=512)
    long_cos, long_sin = hf_cos_sin(p, positions, head_dim=64, max_pos=512)
    np.testing.assert_allclose(np.asarray(cos)[:, :n_hat], plain_cos[:, :n_hat], rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin)[:, :n_hat], plain_sin[:, :n_hat], rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(cos)[:, n_hat:], long_cos[:, n_hat:], rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin)[:, n_hat:], long_sin[:, n_hat:], rtol=1e-5, atol=2e-6)


def test_traced_factors_and_start_tokens_compile_once():
    base = RopeScaling.from_hf(_longrope())
    positions = jnp.arange(100)[None]
    traces = []

    @jax.jit
    def tables(long_factor, start_tokens):
        traces.append(1)
        s = dataclasses.replace(base, long_factor=long_factor, start_tokens=start_tokens)
        return rope_cos_sin(s, positions, head_dim=64, theta=10000.0, max_position_embeddings=512)

    rng = np.random.default_rng(1)
    for n_hat in (0, 4, 16):
        lam = np.sort(rng.uniform(1, 16, 32)).astype(np.float32)
        cos, sin = tables(jnp.asarray(lam), jnp.int32(n_hat))
        concrete = dataclasses.replace(base, long_factor=tuple(map(float, lam)), start_tokens=n_hat)
        ref_cos, ref_sin = rope_cos_sin(concrete, positions, head_dim=64, theta=10000.0, max_position_embeddings=512)
        np.testing.assert_allclose(np.asarray(cos), np.asarray(ref_cos), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(sin), np.asarray(ref_sin), rtol=1e-5, atol=1e-6)
    assert len(traces) == 1


def test_traced_seq_len_selects_like_python_seq_len():
    s = RopeScaling.from_hf(_longrope())
    f = jax.jit(lambda n: frequencies(s, head_dim=64, theta=1e4, max_position_embeddings=512, seq_len=n)[0])
    for n in (1, 64, 65, 300):
        np.testing.assert_allclose(np.asarray(f(jnp.int32(n))), ours(_longrope(), head_dim=64, max_pos=512, seq_len=n)[0])
    d = RopeScaling.from_hf({"rope_type": "dynamic", "factor": 4.0})
    g = jax.jit(lambda n: frequencies(d, head_dim=64, theta=1e4, max_position_embeddings=64, seq_len=n)[0])
    for n in (10, 64, 200):
        ref, _ = hf_frequencies({"rope_type": "dynamic", "factor": 4.0}, head_dim=64, max_pos=64, seq_len=n)
        np.testing.assert_allclose(np.asarray(g(jnp.int32(n))), ref, rtol=RTOL)


def test_apply_rotary_matches_hf_apply_rotary_pos_emb():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 10, 4, 64)).astype(np.float32)  # B L H D
    k = rng.standard_normal((2, 10, 2, 64)).astype(np.float32)
    positions = np.stack([np.arange(10), np.arange(5, 15)])
    cos, sin = cos_sin(jnp.asarray(positions), rope.default_inv_freq(64, 10000.0), 1.3)
    ref_q, ref_k = apply_rotary_pos_emb(
        torch.tensor(q).transpose(1, 2), torch.tensor(k).transpose(1, 2),
        torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin)),
    )
    np.testing.assert_allclose(np.asarray(apply_rotary(jnp.asarray(q), cos, sin)), ref_q.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(apply_rotary(jnp.asarray(k), cos, sin)), ref_k.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-6)


def test_partial_rotary_passes_the_tail_through():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 2, 64)), jnp.float32)
    cos, sin = cos_sin(jnp.arange(5)[None], rope.default_inv_freq(64, 1e4, 0.5))
    out = apply_rotary(x, cos, sin)
    np.testing.assert_array_equal(np.asarray(out[..., 32:]), np.asarray(x[..., 32:]))
    assert not np.allclose(np.asarray(out[:, 1:, :, :32]), np.asarray(x[:, 1:, :, :32]))


# ---- HF mapping -------------------------------------------------------------------------------

ROUND_TRIP = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
     "beta_slow": 1.0, "attention_factor": 1.1, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0},
    _longrope(start_tokens=4, factor=8.0, attention_factor=1.2),
    {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
]


@pytest.mark.parametrize("p", ROUND_TRIP)
def test_from_hf_to_hf_round_trip(p):
    s = RopeScaling.from_hf(p)
    assert RopeScaling.from_hf(s.to_hf()) == s
    assert hash(s) == hash(RopeScaling.from_hf(s.to_hf()))
    if p is not None:
        assert s.to_hf() == p


def test_type_alias_legacy_su_and_none():
    assert RopeScaling.from_hf(None) == RopeScaling()
    assert RopeScaling.from_hf({"type": "linear", "factor": 2}) == RopeScaling("linear", factor=2.0)
    legacy = RopeScaling.from_hf({"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                                  "original_max_position_embeddings": 16})
    assert legacy.rope_type == "longrope"
    assert RopeScaling.from_hf({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8,
                                "rope_theta": 5e5}).factor == 2.0


def test_ntk_exports_as_default_with_scaled_theta_that_hf_reproduces():
    s = RopeScaling("ntk", factor=4.0)
    out = s.to_hf(rope_theta=10000.0, head_dim=128)
    assert out["rope_type"] == "default"
    ref, _ = hf_frequencies(None, theta=out["rope_theta"])
    np.testing.assert_allclose(ours({"rope_type": "ntk", "factor": 4.0})[0], ref, rtol=RTOL)
    with pytest.raises(ValueError, match="rope_theta and head_dim"):
        s.to_hf()


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"rope_type": "bogus"}, "rope_type: unknown type 'bogus'"),
        ({"rope_type": "linear"}, r"rope_scaling.factor: required"),
        ({"rope_type": "yarn", "factor": 2.0}, "original_max_position_embeddings: required"),
        ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0},
         "high_freq_factor: required"),
        ({"rope_type": "longrope", "long_factor": [1.0], "original_max_position_embeddings": 8}, "short_factor: required"),
        ({"rope_type": "linear", "factor": 0.5}, r"rope_scaling.factor: expected a number >= 1"),
        ({"rope_type": "dynamic", "factor": 0.9}, r"rope_scaling.factor: expected a number >= 1"),
        ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "beta_fast": 1.0, "beta_slow": 4.0},
         r"rope_scaling.beta_fast: expected >= beta_slow"),
        ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 4.0,
          "high_freq_factor": 4.0}, r"rope_scaling.low_freq_factor: expected < high_freq_factor"),
        ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "attention_factor": -1.0},
         r"rope_scaling.attention_factor: expected a number >= 0"),
        ({"rope_type": "linear", "factor": 2.0, "beta_fast": 32}, r"unknown key\(s\) \['beta_fast'\]"),
        ({"rope_type": "linear", "factor": 2.0, "foo": 1}, r"unknown key\(s\) \['foo'\]"),
        ({"rope_type": "longrope", "short_factor": [1.0, -1.0], "long_factor": [1.0, 2.0],
          "original_max_position_embeddings": 8}, r"rope_scaling.short_factor: expected a 1-D list of finite positive"),
        ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0], "original_max_position_embeddings": 8,
          "start_tokens": -2}, r"rope_scaling.start_tokens: expected an integer >= 0"),
        ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 1.5}, "partial_rotary_factor: expected"),
    ],
)
def test_validation_errors_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        RopeScaling.from_hf(bad)


@pytest.mark.parametrize("key", ["short_factor", "long_factor"])
def test_wrong_factor_length_names_key_and_expected_length(key):
    p = _longrope(d2=32)
    p[key] = p[key][:-1]
    s = RopeScaling.from_hf(p)
    with pytest.raises(ValueError, match=rf"rope_scaling.{key}: has 31 values; expected rotary_dim/2 = 32"):
        frequencies(s, head_dim=64, theta=1e4, max_position_embeddings=512)


def test_direct_construction_rejects_parameters_of_another_type():
    with pytest.raises(ValueError, match=r"rope_scaling.beta_fast: not a parameter of rope_type 'linear'"):
        RopeScaling("linear", factor=2.0, beta_fast=32.0)
    with pytest.raises(ValueError, match=r"rope_scaling.start_tokens: not a parameter"):
        RopeScaling("yarn", factor=2.0, original_max_position_embeddings=8, start_tokens=3)
