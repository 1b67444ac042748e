"""Hugging Face directories <-> `Llama` parameters (`load_hf`, `save_hf`), checked against `transformers`
(torch, fp32) and the `safetensors` library on tiny random models written by `save_pretrained`."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

from longrope_jax.io import safetensors as sio
from longrope_jax.io.hf import load_hf, parse_size, save_hf
from longrope_jax.io.orbax_params import save_jax
from longrope_jax.io.param_map import ConversionError
from longrope_jax.model import LlamaConfig, init_params
from longrope_jax.rope import RopeScaling
from tests.io.hf_models import (
    TOKENS,
    assert_rel_close,
    assert_same_tensors,
    hf_logits,
    jax_logits,
    make_hf,
    read_all,
    shapes,
)


@pytest.mark.parametrize(
    "tied, kv_heads, scan, bias",
    [(False, 2, False, False), (False, 2, True, False), (True, 4, False, False), (True, 4, True, False),
     (False, 2, True, True)],
    ids=["untied-gqa", "untied-gqa-scan", "tied-mha", "tied-mha-scan", "bias-scan"],
)
def test_load_hf_logits_match_transformers(tmp_path, tied, kv_heads, scan, bias):
    src = make_hf(tmp_path / "m", tie_word_embeddings=tied, num_key_value_heads=kv_heads,
                  attention_bias=bias, mlp_bias=bias)
    config, params = load_hf(src, scan_layers=scan)
    assert (config.tie_word_embeddings, config.num_key_value_heads, config.scan_layers) == (tied, kv_heads, scan)
    assert shapes(params) == shapes(init_params(config, jax.random.key(0)))
    assert_rel_close(jax_logits(config, params), hf_logits(src))


@pytest.mark.parametrize("torch_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision_checkpoint_loads(tmp_path, torch_dtype):
    src = make_hf(tmp_path / "m", torch_dtype=torch_dtype)
    config, params = load_hf(src)  # upcast to float32, as transformers does with dtype=float32
    assert_rel_close(jax_logits(config, params), hf_logits(src))

    config16, params16 = load_hf(src, dtype={torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16}[torch_dtype])
    assert config16.param_dtype == params16["embed_tokens"]["embedding"].dtype.name
    want = st_load(src / "model.safetensors")["model.layers.1.mlp.down_proj.weight"].float().numpy()
    got = np.asarray(params16["layers_1"]["mlp"]["down_proj"]["kernel"]).astype(np.float32)
    np.testing.assert_array_equal(got, want.T)


def test_tied_checkpoint_with_equal_lm_head_loads(tmp_path):
    src = make_hf(tmp_path / "m", tie_word_embeddings=True)
    tensors = st_load(src / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    st_save(tensors, src / "model.safetensors", metadata={"format": "pt"})
    config, params = load_hf(src)
    assert "lm_head" not in params
    assert_rel_close(jax_logits(config, params), hf_logits(src))


def test_sharded_checkpoint_written_by_transformers_loads(tmp_path, llama_dir):
    src = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(llama_dir).save_pretrained(src, max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").is_file() and not (src / "model.safetensors").exists()
    config, params = load_hf(src)
    assert_rel_close(jax_logits(config, params), hf_logits(llama_dir))


def test_mistral_checkpoint_matches_transformers_and_round_trips(tmp_path):
    src = make_hf(tmp_path / "mistral", arch="mistral", sliding_window=5)
    config, params = load_hf(src)
    assert (config.model_type, config.sliding_window) == ("mistral", 5)
    want = hf_logits(src)  # 13 tokens > window 5, so the window matters
    assert_rel_close(jax_logits(config, params), want)

    out = save_hf(config, params, tmp_path / "out")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MistralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_tensors(src, out)


def write_phi3_style(path: Path, **overrides) -> Path:
    """A llama model_type config with Phi-3's top-level original_max_position_embeddings."""
    make_hf(path)
    d = json.loads((path / "config.json").read_text())
    d.pop("rope_parameters", None)
    d.update(
        max_position_embeddings=128, original_max_position_embeddings=32, rope_theta=10000.0,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                      "long_factor": [1.5 + 0.4 * i for i in range(8)]},
        **overrides,
    )
    (path / "config.json").write_text(json.dumps(d))
    return path


def test_phi3_style_longrope_config_matches_transformers_past_original_length(tmp_path):
    src = write_phi3_style(tmp_path / "phi")
    config, params = load_hf(src)
    assert config.rope_scaling.rope_type == "longrope"
    assert config.rope_scaling.original_max_position_embeddings == 32
    long_tokens = np.random.RandomState(1).randint(0, 97, size=(1, 40))  # 40 > 32: long factors
    for tokens in (TOKENS, long_tokens):
        assert_rel_close(jax_logits(config, params, tokens), hf_logits(src, tokens))

    out = save_hf(config, params, tmp_path / "out")  # rope_scaling must survive export
    assert_rel_close(hf_logits(out, long_tokens), hf_logits(src, long_tokens))


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_jax_hf_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, scan, tied):
    src = make_hf(tmp_path / "src", tie_word_embeddings=tied)
    config, params = load_hf(src, scan_layers=scan)
    out = save_hf(config, params, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_tensors(src, out)

    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "float32"
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = transformers.AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        assert torch.equal(model(torch.tensor(TOKENS)).logits, original(torch.tensor(TOKENS)).logits)


def test_sharded_save_writes_index_and_loads_in_transformers(tmp_path, llama_dir):
    config, params = load_hf(llama_dir, scan_layers=True)
    out = save_hf(config, params, tmp_path / "out", max_shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    tensors = read_all(out)
    assert index["weight_map"].keys() == tensors.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert_same_tensors(llama_dir, out)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_rel_close(hf_logits(out), hf_logits(llama_dir), rel=1e-7)


def test_save_hf_in_bfloat16_matches_torch_cast(tmp_path, llama_dir):
    config, params = load_hf(llama_dir)
    out = save_hf(config, params, tmp_path / "out", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    want = {k: v.to(torch.bfloat16) for k, v in read_all(llama_dir).items()}
    got = read_all(out)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("size", ["5GB", "500MB", "30KB", "2GiB", "7MiB", "3KiB", 12345])
def test_max_shard_size_reads_like_transformers(size):
    from transformers.utils.hub import convert_file_size_to_int

    assert parse_size(size) == convert_file_size_to_int(size)


def test_tokenizer_files_are_copied(tmp_path, llama_dir, tokenizer_dir):
    config, params = load_hf(llama_dir)
    out = save_hf(config, params, tmp_path / "out", tokenizer_source=tokenizer_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("w3 w5 w96").input_ids == transformers.AutoTokenizer.from_pretrained(tokenizer_dir)("w3 w5 w96").input_ids
    assert transformers.GenerationConfig.from_pretrained(out).max_new_tokens == 7


def test_failure_during_write_leaves_existing_dst_unchanged(tmp_path, llama_dir, monkeypatch):
    config, params = load_hf(llama_dir)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match=str(dst)):
        save_hf(config, params, dst)
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        save_hf(config, params, dst, tokenizer_source=tmp_path / "no-such-tokenizer", overwrite=True)

    # The disk "fills up" on the third shard, after two were written: nothing may reach DST.
    real_write, calls = sio.write_file, []

    def failing_write(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(sio, "write_file", failing_write)
    with pytest.raises(OSError, match="No space left"):
        save_hf(config, params, dst, max_shard_size="30KB", overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]  # no temporary directory left behind
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "old"

    # And a successful overwrite replaces it whole.
    save_hf(config, params, dst, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]


def test_bad_params_for_save_name_the_leaf(tmp_path, llama_dir):
    config, params = load_hf(llama_dir)
    bad = jax.tree.map(lambda x: x, params)
    bad["layers_1"]["mlp"]["up_proj"]["kernel"] = jnp.zeros((64, 95))
    with pytest.raises(ConversionError, match=r"layers_1/mlp/up_proj/kernel.*\(64, 95\).*\(64, 96\)"):
        save_hf(config, bad, tmp_path / "a")
    del bad["layers_0"]["self_attn"]["q_proj"]
    with pytest.raises(ConversionError, match="missing.*layers_0/self_attn/q_proj/kernel"):
        save_jax(config, bad, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # save_jax insists on the layout the config names (load_jax rebuilds the module from it).
    with pytest.raises(ConversionError, match="missing.*'layers/"):
        save_jax(dataclasses.replace(config, scan_layers=True), params, tmp_path / "c")


def test_unknown_config_override_is_a_clear_error(llama_dir):
    with pytest.raises(ConversionError, match="hiden_size"):
        load_hf(llama_dir, hiden_size=3)


def test_save_hf_refuses_partial_rotary_and_warns_about_start_tokens(tmp_path):
    base = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    partial = LlamaConfig(**base, rope_scaling=RopeScaling("linear", factor=2.0, partial_rotary_factor=0.5))
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        save_hf(partial, init_params(partial, jax.random.key(0)), tmp_path / "partial")
    assert not (tmp_path / "partial").exists()
    n_hat = LlamaConfig(**base, rope_scaling=RopeScaling(
        "longrope", short_factor=(1.0,) * 8, long_factor=(2.0,) * 8, original_max_position_embeddings=16, start_tokens=4))
    with pytest.warns(UserWarning, match="start_tokens=4"):
        save_hf(n_hat, init_params(n_hat, jax.random.key(0)), tmp_path / "nhat")
    assert (tmp_path / "nhat" / "config.json").is_file()
