"""`longrope-jax extend`: every stage runs on a tiny model, re-running skips them, the export is right."""

import json
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from longrope_jax import cli, extend
from longrope_jax.io.hf import load_hf, save_hf
from longrope_jax.model import Llama, LlamaConfig, init_params
from tests.tiny import REPO


def test_extend_runs_every_stage_resumes_and_exports_both_factor_sets(tmp_path, kjv_dir, capsys):
    cfg = LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=64, bos_token_id=256, eos_token_id=257)
    save_hf(cfg, init_params(cfg, jax.random.key(0)), tmp_path / "base")
    small = {"population": 4, "mutations": 2, "crossovers": 2, "parents": 2, "iterations": 1, "docs": 2}
    config = tmp_path / "extend_test.py"
    config.write_text(textwrap.dedent(f"""
        def get_config():
            return {{
                "model": "hf:{tmp_path / 'base'}", "stage1_length": 128, "stage2_length": 256,
                "data": {{"source": "kjv", "split": "train", "data_dir": "{kjv_dir}"}},
                "search": {small!r}, "short": {{"enabled": True, "iterations": 1}},
                "finetune": {{"config": "{REPO / 'configs' / 'tiny_cpu.py'}", "overrides": {{
                    "train": {{"steps": 2, "batch_size": 8}}, "data": {{"data_dir": "{kjv_dir}"}},
                    "logging": {{"progress": False}}}}}},
                "eval": {{"lengths": [64, 256], "docs": 2, "passkey_lengths": [256], "passkey_depths": 2,
                          "passkey_trials": 1}},
            }}
        """))
    work = tmp_path / "run"
    assert cli.main(["extend", "--config", str(config), "--workdir", str(work)]) == 0
    stages = json.loads((work / "stages.json").read_text())
    assert list(stages) == ["search_s1", "finetune", "search_s2", "short", "evaluate", "export"]

    hf = json.loads((work / "hf" / "config.json").read_text())
    scaling = hf.get("rope_parameters") or hf["rope_scaling"]
    final = json.loads((work / "search_s2" / "rope_scaling.json").read_text())
    assert scaling["rope_type"] == "longrope" and hf["max_position_embeddings"] == 256
    assert scaling["original_max_position_embeddings"] == 64
    assert scaling["long_factor"] == final["long_factor"] == json.loads(
        (work / "search_s2" / "long" / "result.json").read_text())["factors"]
    assert scaling["short_factor"] == json.loads((work / "search_s2" / "short" / "result.json").read_text())["factors"]
    seed = json.loads((work / "search_s2_seed.json").read_text())["factors"]
    s1 = json.loads((work / "search_s1" / "long" / "result.json").read_text())["factors"]
    np.testing.assert_allclose(seed, np.asarray(s1) * 2)  # stage-1 factors stretched by s2/s1 seed stage 2

    # The export holds the fine-tuned weights (not the base ones) under the final factors.
    ft_cfg, ft_params = load_hf(work / "finetune" / "hf")
    out_cfg, out_params = load_hf(work / "hf")
    jax.tree.map(np.testing.assert_array_equal, out_params, ft_params)
    tokens = np.arange(1, 201)[None] % 250
    ours = Llama(out_cfg).apply({"params": out_params}, tokens)
    expected = Llama(extend.Pipeline(extend.resolve(_config(config)), work).final_model()[0]).apply(
        {"params": ft_params}, tokens)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    rows = json.loads((work / "eval" / "eval.json").read_text())
    assert {r["length"] for r in rows["perplexity"]} == {64, 256} and len(rows["passkey"]) == 2

    capsys.readouterr()
    assert cli.main(["extend", "--config", str(config), "--workdir", str(work)]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped") == 6  # a re-run does nothing


def _config(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("c", path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m.get_config()


def test_extend_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="config.model: required"):
        extend.resolve({"stage1_length": 128, "stage2_length": 256, "finetune": {"config": "x.py"}})
    with pytest.raises(ValueError, match="stage1_length 512, stage2_length 256"):
        extend.resolve({"model": "hf:x", "stage1_length": 512, "stage2_length": 256, "finetune": {"config": "x.py"}})
    with pytest.raises(ValueError, match="config.serach: unknown key"):
        extend.resolve({"model": "hf:x", "serach": {}})


def test_shipped_extend_config_resolves():
    c = extend.resolve(_config(REPO / "configs" / "extend_tiny.py"))
    assert c.original_length == 0 and c.stage1_length < c.stage2_length
    assert (REPO / c.finetune.config).is_file()
