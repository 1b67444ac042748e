"""`longrope-jax convert`: the CLI both ways (in process and as `python -m`), and every bad HF input
failing with a clear error that leaves no DST behind."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

from longrope_jax import cli
from longrope_jax.io.convert import hf_to_jax
from longrope_jax.io.orbax_params import load_jax
from longrope_jax.io.param_map import ConversionError
from tests.io.hf_models import assert_same_tensors, read_all


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


def test_jax_to_hf_attaches_searched_longrope_factors(tmp_path, llama_dir, capsys):
    """`--rope-scaling` exports a search's rope_scaling.json with the weights; transformers reads it back."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert cli.main(["convert", "hf-to-jax", str(llama_dir), str(ckpt)]) == 0
    config = load_jax(ckpt)[0]
    d_half = config.head_dim // 2
    factors = {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": config.max_position_embeddings,
               "short_factor": [1.0] * d_half, "long_factor": [1.0 + i / d_half for i in range(d_half)]}
    (tmp_path / "rope_scaling.json").write_text(json.dumps(factors))
    assert cli.main(["convert", "jax-to-hf", str(ckpt), str(out), "--rope-scaling", str(tmp_path / "rope_scaling.json")]) == 0
    hf = transformers.AutoConfig.from_pretrained(out)
    rope = getattr(hf, "rope_parameters", None) or hf.rope_scaling
    assert rope["rope_type"] == "longrope" and rope["long_factor"] == factors["long_factor"]
    assert hf.max_position_embeddings == 4 * config.max_position_embeddings
    assert_same_tensors(llama_dir, out)

    (tmp_path / "short.json").write_text(json.dumps({**factors, "long_factor": [2.0] * (d_half + 1)}))
    capsys.readouterr()
    assert cli.main(["convert", "jax-to-hf", str(ckpt), str(tmp_path / "out2"), "--rope-scaling",
                     str(tmp_path / "short.json")]) == 2
    err = capsys.readouterr().err
    assert "--rope-scaling" in err and "short.json" in err and not (tmp_path / "out2").exists()
