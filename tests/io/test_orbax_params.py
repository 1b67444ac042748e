"""Our own checkpoint format (Orbax params + `llama_config.json`): round trips of params and of every
config field, and clear errors for a broken checkpoint."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax.io.convert import jax_to_hf
from longrope_jax.io.hf import load_hf
from longrope_jax.io.orbax_params import config_from_json, config_to_json, load_jax, save_jax
from longrope_jax.io.param_map import ConversionError
from longrope_jax.model import LlamaConfig
from longrope_jax.rope import RopeScaling
from tests.io.hf_models import TINY, assert_rel_close, hf_logits, jax_logits


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
