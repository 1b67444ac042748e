"""KV-cache decoding against full recomputation and `transformers` generate.

Tiny random HF models (torch fp32) are converted with `load_hf`. The reference for each cached step
is an uncached forward over exactly the tokens so far (its own RoPE seq_len, which matters for
LongRoPE and dynamic NTK): transformers' where it has the same semantics, else our uncached model.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from longrope_jax import generate as gen
from longrope_jax.data.tokenizer import ByteTokenizer
from longrope_jax.io.hf import load_hf
from longrope_jax.model import Llama, LlamaConfig, init_params

transformers.logging.set_verbosity_error()

VOCAB = 264  # the byte tokenizer's
ORIG, T, N = 16, 12, 8  # prompt 12 + 8 new tokens: the fed tokens at positions 12..18 cross ORIG = 16
CROSS = ORIG - T  # index of the decode step whose token sits at position ORIG (seq_len ORIG + 1)
ATOL = 1e-4
PROMPTS = np.random.default_rng(0).integers(0, VOCAB, (2, T))
LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": ORIG,
            "short_factor": [1.0 + 0.05 * i for i in range(8)], "long_factor": [1.0 + 0.9 * i for i in range(8)]}
CASES = {  # name: (HF rope dict, HF config extras, load_hf overrides, start_tokens)
    "default_mha_tied": (None, dict(num_key_value_heads=4, tie_word_embeddings=True), {}, 0),
    "yarn_tied": ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": ORIG},
                  dict(tie_word_embeddings=True), {}, 0),
    "llama3_scan": ({"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": ORIG,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0}, {}, dict(scan_layers=True), 0),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, dict(max_position_embeddings=ORIG), {}, 0),
    "longrope": (LONGROPE, {}, {}, 0),
    "longrope_start_tokens_scan": (LONGROPE, {}, dict(scan_layers=True), 2),
    "mistral_linear_sliding_window_scan": ({"rope_type": "linear", "factor": 2.0}, dict(sliding_window=5),
                                           dict(scan_layers=True), 0),
}


@functools.lru_cache(maxsize=None)
def tiny_hf_model(case: str, root: str):
    """(HF model, LlamaConfig, params, rope_scaling) of a tiny random model (weights ~N(0, 0.2), so
    logits are spread out and greedy choices are not near ties)."""
    rope, extra, overrides, start_tokens = CASES[case]
    arch = "mistral" if "sliding_window" in extra else "llama"
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, eos_token_id=None,
              bos_token_id=None, pad_token_id=None, rope_scaling=rope)
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**kw, **extra})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    path = f"{root}/{case}"
    model.save_pretrained(path)
    config, params = load_hf(path, **overrides)
    scaling = dataclasses.replace(config.rope_scaling, start_tokens=start_tokens) if start_tokens else None
    return model, config, params, scaling


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny torch forwards run ~100x faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf"))
    return lambda case: tiny_hf_model(case, root)


@functools.partial(jax.jit, static_argnames=("config", "scaling"))
def prefix_logits(config, params, seq_BxL, n, scaling):
    """Logits after seq[:, :n] from our uncached model: the tail is another segment at position 0
    (packing, checked against HF in test_model), so RoPE's seq_len is n as in a forward over the prefix."""
    valid_L = jnp.arange(seq_BxL.shape[1]) < n
    logits = Llama(config).apply({"params": params}, seq_BxL, jnp.where(valid_L, jnp.arange(seq_BxL.shape[1]), 0),
                                 valid_L.astype(jnp.int32), rope_scaling=scaling)
    return logits[:, n - 1]


def recomputed_logits(model, config, params, seq_BxL, scaling) -> np.ndarray:
    """[B, N, V]: the logits that predict tokens T..T+N-1, each from an uncached forward over exactly the
    tokens before it. transformers computes them, except where it has no equivalent: LongRoPE start
    tokens, and dynamic NTK (its rotary module keeps the longest length seen as state); there our
    uncached model does."""
    if scaling is not None or config.rope_scaling.rope_type == "dynamic":
        seq = jnp.asarray(seq_BxL)
        return np.stack([np.asarray(prefix_logits(config, params, seq, n, scaling)) for n in range(T, T + N)], 1)
    with torch.no_grad():
        return np.stack([model(torch.as_tensor(seq_BxL[:, :n])).logits[:, -1].numpy() for n in range(T, T + N)], 1)


def cached_logits(config, params, seq_BxL, scaling) -> np.ndarray:
    """[B, N, V] from prefill + decode_step along seq (the functions generate runs)."""
    logits, state = gen.prefill(config, params, seq_BxL[:, :T], T + N - 1, rope_scaling=scaling)
    out = [np.asarray(logits)]
    for i in range(N - 1):
        logits, state = gen.decode_step(config, params, state, seq_BxL[:, T + i], rope_scaling=scaling)
        out.append(np.asarray(logits))
    return np.stack(out, 1)


# ---- cached decoding = full recomputation ------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_cached_greedy_decoding_equals_full_recomputation(build, case):
    model, config, params, scaling = build(case)
    out = gen.generate(config, params, PROMPTS, N, rope_scaling=scaling)
    assert out.shape == (2, N) and out.dtype == np.int32
    seq = np.concatenate([PROMPTS, out], 1)
    ref = recomputed_logits(model, config, params, seq, scaling)
    np.testing.assert_array_equal(out, ref.argmax(-1))  # every greedy token is the recomputed argmax
    np.testing.assert_allclose(cached_logits(config, params, seq, scaling), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["dynamic", "longrope"])
def test_reprefill_when_rope_frequencies_switch_where_a_kept_cache_goes_wrong(build, case):
    """At the step that crosses the original length, our cached step equals transformers' forward over
    exactly those tokens (no cache). transformers' own KV cache keeps the keys rotated with the old
    frequencies (short factors / old base), as a cache without re-prefill would, and is far off there."""
    model, config, params, scaling = build(case)
    seq = np.concatenate([PROMPTS, gen.generate(config, params, PROMPTS, N, rope_scaling=scaling)], 1)
    _, state = gen.prefill(config, params, seq[:, :T], T + N - 1, rope_scaling=scaling)
    for i in range(CROSS):
        _, state = gen.decode_step(config, params, state, seq[:, T + i], rope_scaling=scaling)
    ours, _ = gen.decode_step(config, params, state, seq[:, ORIG], rope_scaling=scaling)
    tokens = torch.as_tensor(seq[:, :ORIG + 1])
    with torch.no_grad():  # kept first: HF's dynamic rotary module remembers the longest length seen
        past = model(tokens[:, :ORIG], use_cache=True).past_key_values
        kept = model(tokens[:, ORIG:], past_key_values=past, use_cache=True).logits[:, -1].numpy()
        want = model(tokens).logits[:, -1].numpy()
    scale = np.abs(want).max()
    assert np.abs(np.asarray(ours) - want).max() < 1e-4 * scale
    assert np.abs(kept - want).max() > 1e-2 * scale


# ---- against transformers -------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["default_mha_tied", "yarn_tied", "llama3_scan", "mistral_linear_sliding_window_scan"])
def test_greedy_equals_transformers_generate(build, case):
    model, config, params, scaling = build(case)
    with torch.no_grad():
        want = model.generate(torch.as_tensor(PROMPTS), attention_mask=torch.ones(PROMPTS.shape, dtype=torch.long),
                              do_sample=False, max_new_tokens=N)[:, T:].numpy()
    np.testing.assert_array_equal(gen.generate(config, params, PROMPTS, N, rope_scaling=scaling), want)


# ---- sampling, EOS, text ----------------------------------------------------------------------------


def test_sampling_with_a_fixed_rng_is_deterministic(build):
    _, config, params, _ = build("default_mha_tied")
    kw = dict(temperature=1.5, top_p=0.95, top_k=20)
    a = gen.generate(config, params, PROMPTS, N, rng=jax.random.key(1), **kw)
    b = gen.generate(config, params, PROMPTS, N, rng=jax.random.key(1), **kw)
    c = gen.generate(config, params, PROMPTS, N, rng=jax.random.PRNGKey(2), **kw)  # raw keys work too
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kw", [dict(temperature=1e-5), dict(temperature=1.0, top_k=1),
                                dict(temperature=2.0, top_p=1e-6)], ids=["tiny_temperature", "top_k_1", "tiny_top_p"])
def test_sampling_that_leaves_one_choice_equals_greedy(build, kw):
    _, config, params, _ = build("default_mha_tied")
    greedy = gen.generate(config, params, PROMPTS, N)
    np.testing.assert_array_equal(gen.generate(config, params, PROMPTS, N, rng=jax.random.key(3), **kw), greedy)


def test_top_k_samples_only_among_the_k_most_likely(build):
    model, config, params, _ = build("default_mha_tied")
    out = gen.generate(config, params, PROMPTS, N, temperature=5.0, top_k=3, rng=jax.random.key(4))
    ref = recomputed_logits(model, config, params, np.concatenate([PROMPTS, out], 1), None)
    rank = (ref > np.take_along_axis(ref, out[..., None], -1)).sum(-1)
    assert rank.max() < 3 and rank.max() > 0  # high temperature: not always the argmax


def test_rows_keep_emitting_eos_after_it(build):
    _, config, params, _ = build("default_mha_tied")
    greedy = gen.generate(config, params, PROMPTS, N)
    eos = int(greedy[0, 2])
    out = gen.generate(config, params, PROMPTS, N, eos_id=eos)
    first = [list(row).index(eos) if eos in row else N for row in greedy]
    for row, stop in enumerate(first):
        np.testing.assert_array_equal(out[row, :stop + 1], greedy[row, :stop + 1])
        assert (out[row, stop:] == eos).all()
    assert not np.array_equal(out, greedy)


def test_generate_text_runs_prompts_of_different_lengths(build):
    _, config, params, _ = build("default_mha_tied")
    tok = ByteTokenizer()
    prompts = ["eleven char", "hi", "other words"]  # BOS + 11 bytes = T: one batch of two, and "hi" alone
    texts = gen.generate_text(config, params, tok, prompts, N, eos_id=None)
    batch = gen.generate(config, params, np.array([[tok.bos_id, *tok.encode(p)] for p in prompts[::2]]), N)
    alone = gen.generate(config, params, np.array([[tok.bos_id, *tok.encode("hi")]]), N)[0]
    assert texts == [tok.decode(batch[0]), tok.decode(alone), tok.decode(batch[1])]


def test_cache_keeps_the_model_dtype():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, dtype="bfloat16", param_dtype="bfloat16")
    params = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    logits, state = jax.eval_shape(functools.partial(gen.prefill_jit, config, max_len=T + 2, scaling=config.rope_scaling),
                                   params, gen.padded_prompts(config, PROMPTS), np.int32(T))
    slots = gen.cache_slots(config, T, T + 2, 2)  # rounded up to a bucket: nearby lengths share compiles
    assert state["cache"]["k"].dtype == jnp.bfloat16 and state["cache"]["k"].shape == (2, 2, slots, 2, 8)
    assert slots >= T + 2 and slots % gen.BUCKET == 0
    assert state["cache"]["v"].dtype == jnp.bfloat16 and logits.dtype == jnp.float32


# ---- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,kw,match", [
    ((np.zeros((2, 0), np.int32), 4), {}, "prompts_BxT"),
    ((np.zeros((5,), np.int32), 4), {}, "prompts_BxT"),
    ((np.full((1, 3), VOCAB), 4), {}, r"prompts_BxT: token id 264 .*\[0, 264\)"),
    ((np.full((1, 3), -1), 4), {}, "prompts_BxT: token id -1"),
    ((np.zeros((1, 3), np.float32), 4), {}, "prompts_BxT: expected integer"),
    ((PROMPTS, 0), {}, "max_new_tokens: expected an integer >= 1"),
    ((PROMPTS, 4), dict(temperature=-0.5), "temperature: expected a finite number >= 0"),
    ((PROMPTS, 4), dict(temperature=1.0, top_p=0.0, rng=jax.random.key(0)), r"top_p: expected .*\(0, 1\]"),
    ((PROMPTS, 4), dict(temperature=1.0, top_p=1.5, rng=jax.random.key(0)), "top_p"),
    ((PROMPTS, 4), dict(temperature=1.0, top_k=0, rng=jax.random.key(0)), "top_k: expected an integer >= 1"),
    ((PROMPTS, 4), dict(temperature=1.0), "rng: expected a jax.random key"),
    ((PROMPTS, 4), dict(eos_id=VOCAB), r"eos_id: .*\[0, 264\)"),
], ids=["empty_prompt", "1d_prompt", "id_too_large", "negative_id", "float_ids", "no_new_tokens",
        "negative_temperature", "top_p_zero", "top_p_above_one", "top_k_zero", "sampling_without_rng",
        "eos_outside_vocab"])
def test_bad_input_raises_naming_the_argument(args, kw, match):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4)
    with pytest.raises(ValueError, match=match):
        gen.generate(config, None, *args, **kw)


@pytest.mark.parametrize("rope", [None, {"rope_type": "longrope", "original_max_position_embeddings": 40,
                                         "short_factor": [1.0] * 4, "long_factor": [3.0] * 4}])
def test_blockwise_prefill_generates_what_the_dense_cache_path_does(rope):
    """A prefill (and the LongRoPE re-prefill at the switch) attends with the blockwise kernel, O(T x chunk),
    instead of densely over every cache slot: tokens and logits must not change."""
    base = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, rope_scaling=rope, initializer_range=0.3)
    params = init_params(base, jax.random.key(3))
    prompts = np.random.default_rng(0).integers(0, 97, (2, 32)).astype(np.int32)
    dense = gen.generate(base, params, prompts, 17, temperature=0.0)  # 32 + 17 - 1 = 48 slots: a multiple of 16
    blockwise = dataclasses.replace(base, attention="blockwise", attention_chunk=16)
    np.testing.assert_array_equal(np.asarray(gen.generate(blockwise, params, prompts, 17, temperature=0.0)),
                                  np.asarray(dense))
    logits_dense, _ = gen.prefill(base, params, prompts, 48)
    logits_block, _ = gen.prefill(blockwise, params, prompts, 48)
    np.testing.assert_allclose(np.asarray(logits_block), np.asarray(logits_dense), rtol=1e-5, atol=1e-5)
