"""`longrope-jax search`: long then short searches from the command line, blockwise scoring equal to
dense, and bad inputs failing with clear errors before anything is written."""

import dataclasses
import json

import numpy as np
import pytest

from longrope_jax import cli
from longrope_jax.data.sources import open_source
from longrope_jax.data.tokenizer import build_tokenizer
from longrope_jax.io.artifacts import read_factors
from longrope_jax.io.orbax_params import save_jax
from longrope_jax.rope import RopeScaling
from longrope_jax.search import cli as search
from longrope_jax.search.fitness import PerplexityEvaluator, eval_windows
from tests.search.tiny_search import (
    D_HALF,
    ORIG,
    TARGET,
    long_config,
)


def test_cli_long_then_short_search_fills_both_factor_sets(model, kjv_dir, tmp_path, capsys):
    cfg, params = model
    save_jax(cfg, params, tmp_path / "model")
    out = tmp_path / "out"
    common = ["search", "--model", f"jax:{tmp_path / 'model'}", "--target-length", str(TARGET), "--out", str(out),
              "--data-dir", kjv_dir, "--docs", "2", "--population", "6", "--mutations", "2", "--crossovers", "2",
              "--parents", "3", "--iterations", "1", "--no-progress"]
    assert cli.main(common) == 0
    assert cli.main(common + ["--short"]) == 0
    assert "short factors: perplexity" in capsys.readouterr().out
    d = json.loads((out / "rope_scaling.json").read_text())
    long_r = json.loads((out / "long" / "result.json").read_text())
    short_r = json.loads((out / "short" / "result.json").read_text())
    assert d["long_factor"] == long_r["factors"] and d["short_factor"] == short_r["factors"]
    assert max(d["short_factor"]) <= 2.0 and short_r["eval_length"] == ORIG and long_r["eval_length"] == TARGET
    assert max(d["long_factor"]) <= 1.25 * TARGET / ORIG
    RopeScaling.from_hf(d).validate(cfg.head_dim)


def test_blockwise_and_mesh_search_score_the_seeds_as_dense_does(model, kjv_dir, tmp_path):
    cfg, params = model
    save_jax(cfg, params, tmp_path / "model")
    common = dict(target_length=TARGET, data_dir=kjv_dir, docs=2, population=4, mutations=0, crossovers=0, parents=2,
                  iterations=0, progress=False)
    dense = search.search(f"jax:{tmp_path / 'model'}", tmp_path / "dense", **common)
    block = search.search(f"jax:{tmp_path / 'model'}", tmp_path / "block", attention="blockwise", attention_chunk=64,
                          **common)
    assert dense["seeds"].keys() == block["seeds"].keys()
    for k, v in dense["seeds"].items():
        assert block["seeds"][k] == pytest.approx(v, rel=1e-5)
    ring = search.search(f"jax:{tmp_path / 'model'}", tmp_path / "ring", attention="blockwise", attention_chunk=32,
                         mesh_shape=(1, 2, 4, 1), **common)  # each window split over 8 devices
    for k, v in dense["seeds"].items():
        assert ring["seeds"][k] == pytest.approx(v, rel=1e-5)
    with pytest.raises(ValueError, match="--mesh '1,2': expected four integers"):
        search.parse_mesh_flag("1,2")
    with pytest.raises(ValueError, match="LlamaConfig.attention_chunk: expected a positive integer"):
        search.search(f"jax:{tmp_path / 'model'}", tmp_path / "bad", attention="blockwise", attention_chunk=0, **common)


def test_bad_inputs_raise_clear_errors(model, kjv_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="target_length 64: expected more than the original length 64"):
        long_config(target_length=64)
    with pytest.raises(ValueError, match="parents 8: expected at most the population"):
        long_config(population=6, parents=8)
    with pytest.raises(ValueError, match="n̂ is searched with the long factors"):
        long_config(short=True, search_start_tokens=True)
    docs = open_source("kjv", "validation", data_dir=kjv_dir)
    with pytest.raises(ValueError, match=r"needs 7 documents of >= 256 tokens, found 6"):
        eval_windows(docs, build_tokenizer("byte"), TARGET, 7)
    with pytest.raises(ValueError, match=r"needs 2 documents of >= 50000 tokens, found 1"):
        eval_windows(docs, build_tokenizer("byte"), 50000, 2)
    cfg, params = model
    small_vocab = dataclasses.replace(cfg, vocab_size=200)
    with pytest.raises(ValueError, match="expected ids below the model's vocab_size 200"):
        PerplexityEvaluator(small_vocab, params, np.full((1, 8), 256), original_length=ORIG, target_length=TARGET)

    cases = {"empty.csv": ("", "empty; expected 8 factors"),
             "short.csv": ("1.0\n2.0\n", "has 2 values; expected 8"),
             "down.csv": ("\n".join(["1.0", "2.0", "1.5"] + ["3.0"] * 5), r"not monotone: factor 2 \(1.5\) < factor 1"),
             "layers.csv": ("1,2\n3,4\n", "per-layer factors"),
             "words.csv": ("a\n", "expected numbers"),
             "zero.json": (json.dumps([0.0] * 8), "finite positive"),
             "nokey.json": (json.dumps({"x": [1.0] * 8}), "no 'factors' or 'long_factor' key"),
             "bad.json": ("{", "not valid JSON")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_factors(tmp_path / name, D_HALF)
    np.testing.assert_array_equal(read_factors(tmp_path / "down.csv", D_HALF, monotone=False)[:3], [1, 2, 1.5])
    with pytest.raises(FileNotFoundError):
        read_factors(tmp_path / "missing.csv", D_HALF)

    save_jax(cfg, params, tmp_path / "model")
    argv = ["search", "--model", f"jax:{tmp_path / 'model'}", "--out", str(tmp_path / "o"), "--data-dir", kjv_dir]
    assert cli.main(argv + ["--target-length", "64"]) == 2
    assert "target_length 64: expected more than the original length 64" in capsys.readouterr().err
    assert cli.main(argv + ["--target-length", "256", "--docs", "7"]) == 2
    assert "needs 7 documents of >= 256 tokens, found 6" in capsys.readouterr().err
    assert cli.main(argv + ["--target-length", "256", "--init-factors", str(tmp_path / "down.csv")]) == 2
    assert "not monotone" in capsys.readouterr().err
    assert cli.main(["search", "--model", "pt:x", "--target-length", "256", "--out", str(tmp_path / "o")]) == 2
    assert "expected 'hf:DIR' or 'jax:DIR'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing is written before the inputs check out
