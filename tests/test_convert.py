"""HF <-> JAX conversion, checked against `transformers` (torch, fp32) and the `safetensors` library.

Every reference model is a tiny random HF model written by `save_pretrained`; logits come from
`LlamaForCausalLM` / `MistralForCausalLM`, tensors are read back with `safetensors.torch`.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

from longrope_jax import cli
from longrope_jax.io import safetensors as sio
from longrope_jax.io.convert import hf_to_jax, jax_to_hf
from longrope_jax.io.hf import load_hf, parse_size, save_hf
from longrope_jax.io.orbax_params import config_from_json, config_to_json, load_jax, save_jax
from longrope_jax.io.param_map import ConversionError
from longrope_jax.model import Llama, LlamaConfig, init_params
from longrope_jax.rope import RopeScaling

transformers.logging.set_verbosity_error()

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
TOKENS = np.random.RandomState(0).randint(0, 97, size=(2, 13))


# ---- helpers ---------------------------------------------------------------------------------


def make_hf(path: Path, arch: str = "llama", torch_dtype=torch.float32, seed: int = 0, **overrides) -> Path:
    """Save a tiny random HF model (norm scales random too, so a swapped norm shows up)."""
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    model.to(torch_dtype).save_pretrained(path)
    return path


def hf_logits(path: Path, tokens=TOKENS) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def jax_logits(config: LlamaConfig, params, tokens=TOKENS) -> np.ndarray:
    return np.asarray(jax.jit(Llama(config).apply)({"params": params}, jnp.asarray(tokens)))


def assert_rel_close(got, want, rel=1e-4):
    err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
    assert err < rel, f"max error {err:.2e} relative to max |logit|; expected < {rel}"


def shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype).name), tree)


def assert_same_tensors(dir_a: Path, dir_b: Path):
    """Every tensor of two HF directories bit-identical (read with the safetensors library)."""
    a, b = read_all(dir_a), read_all(dir_b)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def read_all(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(st_load(f))
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_hf(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2")
    fast.save_pretrained(d)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=7).save_pretrained(d)
    return d


# ---- load_hf against transformers ---------------------------------------------------------------


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


# ---- save_hf: round trips through transformers -------------------------------------------------


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


# ---- our own format ------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_save_jax_load_jax_round_trip(tmp_path, llama_dir, scan):
    config, params = load_hf(llama_dir, scan_layers=scan, remat_policy="full")
    save_jax(config, params, tmp_path / "ckpt")
    config2, params2 = load_jax(tmp_path / "ckpt")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    assert_rel_close(jax_logits(config2, params2), hf_logits(llama_dir))

    config16, params16 = load_jax(tmp_path / "ckpt", dtype=jnp.bfloat16)
    assert config16.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize(
    "rope",
    [
        RopeScaling(),
        RopeScaling("yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=16.0, truncate=False),
        RopeScaling("llama3", factor=8.0, original_max_position_embeddings=64, low_freq_factor=1.0, high_freq_factor=4.0),
        RopeScaling("longrope", short_factor=[1.0] * 8, long_factor=[1.0 + i for i in range(8)],
                    original_max_position_embeddings=64, start_tokens=4, attention_factor=1.1),
    ],
    ids=lambda r: r.rope_type,
)
def test_config_json_round_trips_every_field(rope):
    config = LlamaConfig(**TINY, rope_scaling=rope, eos_token_id=(2, 5), sliding_window=None, scan_layers=True,
                         remat_policy="dots", param_dtype="bfloat16", dtype="bfloat16", rope_theta=5e5)
    assert config_from_json(config_to_json(config)) == config


# ---- command line --------------------------------------------------------------------------------


def test_cli_round_trip_hf_jax_hf(tmp_path, llama_dir, tokenizer_dir, capsys):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert cli.main(["convert", "hf-to-jax", str(llama_dir), str(ckpt), "--scan-layers"]) == 0
    assert str(ckpt) in capsys.readouterr().out
    assert cli.main(["convert", "jax-to-hf", str(ckpt), str(out), "--max-shard-size", "50KB",
                     "--tokenizer", str(tokenizer_dir)]) == 0
    printed = capsys.readouterr().out
    n_params = sum(t.numel() for t in read_all(llama_dir).values())
    assert str(out) in printed and f"{n_params:,}" in printed
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    assert_same_tensors(llama_dir, out)

    # An existing DST needs --overwrite; without it the CLI exits 2 and names DST.
    assert cli.main(["convert", "hf-to-jax", str(llama_dir), str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "exists" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["convert", "hf-to-jax", str(llama_dir), str(ckpt), "--overwrite"]) == 0
    assert not load_jax(ckpt)[0].scan_layers


def test_python_dash_m_runs_the_cli(tmp_path, llama_dir):
    dst = tmp_path / "ckpt"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "longrope_jax", "convert", "hf-to-jax", str(llama_dir), str(dst), "--dtype", "bfloat16"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert str(dst) in run.stdout
    config, params = load_jax(dst)
    assert config.param_dtype == "bfloat16" and params["norm"]["scale"].dtype == jnp.bfloat16
    want = st_load(llama_dir / "model.safetensors")["model.norm.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(params["norm"]["scale"], np.float32), want)


# ---- bad input: a clear error and DST untouched -------------------------------------------------


def rewrite_tensors(src: Path, edit) -> None:
    tensors = st_load(src / "model.safetensors")
    edit(tensors)
    st_save(tensors, src / "model.safetensors", metadata={"format": "pt"})


def patch_config(src: Path, **changes) -> None:
    d = json.loads((src / "config.json").read_text())
    d.update(changes)
    (src / "config.json").write_text(json.dumps(d))


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def set_header_length(path: Path, n: int) -> None:
    data = path.read_bytes()
    path.write_bytes(n.to_bytes(8, "little") + data[8:])


def break_header_json(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8] = ord("x")  # the opening '{'
    path.write_bytes(bytes(data))


def to_bin_only(src: Path, names=("pytorch_model.bin",)) -> None:
    state = st_load(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    for n in names:
        torch.save(state, src / n)


def shard_and_drop_one(src: Path) -> str:
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    (src / "model.safetensors").unlink()
    model.save_pretrained(src, max_shard_size="40KB")
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    return victim.name


def set_offsets_past_end(path: Path) -> None:
    """Grow one tensor (shape and end offset together) past the end of the data buffer."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    entry = header["model.norm.weight"]
    entry["shape"] = [entry["shape"][0] * 1000]
    entry["data_offsets"][1] = entry["data_offsets"][0] + 4 * entry["shape"][0]
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


BAD_INPUTS = {
    # name: (corrupt(src) -> None, error type, fragments the message must contain)
    "missing-config": (lambda s: (s / "config.json").unlink(), FileNotFoundError, ["config.json"]),
    "not-llama": (lambda s: patch_config(s, model_type="gpt2"), ConversionError, ["config.json", "model_type", "gpt2"]),
    "missing-tensor": (lambda s: rewrite_tensors(s, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       ConversionError, ["missing", "model.layers.1.mlp.up_proj.weight"]),
    "extra-tensor": (lambda s: rewrite_tensors(s, lambda t: t.update({"model.extra.weight": torch.zeros(3)})),
                     ConversionError, ["unexpected", "model.extra.weight"]),
    "shape-mismatch": (lambda s: rewrite_tensors(s, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)})),
                       ConversionError, ["model.layers.0.self_attn.k_proj.weight", "(16, 64)", "(32, 64)"]),
    "truncated": (lambda s: truncate(s / "model.safetensors", -100), ConversionError, ["model.safetensors", "truncated"]),
    "empty-file": (lambda s: truncate(s / "model.safetensors", 0), ConversionError, ["model.safetensors", "0 bytes"]),
    "bad-header-length": (lambda s: set_header_length(s / "model.safetensors", 1 << 40), ConversionError,
                          ["model.safetensors", "header length"]),
    "bad-header-json": (lambda s: break_header_json(s / "model.safetensors"), ConversionError, ["model.safetensors", "JSON"]),
    "offsets-past-end": (lambda s: set_offsets_past_end(s / "model.safetensors"), ConversionError,
                         ["model.norm.weight", "truncated"]),
    "bin-only": (to_bin_only, ConversionError, ["pytorch_model.bin", "save_pretrained", "safe_serialization=True"]),
    "bin-shards-only": (lambda s: to_bin_only(s, ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]),
                        ConversionError, ["pytorch_model-00001-of-00002.bin", "save_pretrained"]),
    "tied-head-differs": (lambda s: patch_config(s, tie_word_embeddings=True), ConversionError,
                          ["lm_head.weight", "tie_word_embeddings"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_hf_input_raises_clear_error_and_leaves_no_dst(tmp_path, llama_dir, case):
    corrupt, error, fragments = BAD_INPUTS[case]
    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    corrupt(src)
    dst = tmp_path / "out" / "ckpt"
    with pytest.raises(error) as info:
        hf_to_jax(src, dst)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, parent or temporary left


def test_index_naming_a_missing_shard_is_a_clear_error(tmp_path, llama_dir):
    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    victim = shard_and_drop_one(src)
    dst = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=victim):
        hf_to_jax(src, dst)
    assert not dst.exists()


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


def test_bad_jax_checkpoint_is_a_clear_error(tmp_path, llama_dir):
    config, params = load_hf(llama_dir)
    ckpt = save_jax(config, params, tmp_path / "ckpt")
    d = json.loads((ckpt / "llama_config.json").read_text())
    (ckpt / "llama_config.json").write_text(json.dumps({**d, "hiden_size": 3}))
    with pytest.raises(ConversionError, match="llama_config.json.*hiden_size"):
        jax_to_hf(ckpt, tmp_path / "out")
    (ckpt / "llama_config.json").write_text(json.dumps(d))
    shutil.rmtree(ckpt / "params")
    (ckpt / "params").mkdir()
    with pytest.raises(ConversionError, match="params.*Orbax"):
        jax_to_hf(ckpt, tmp_path / "out")
    (ckpt / "llama_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="llama_config.json"):
        jax_to_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


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
