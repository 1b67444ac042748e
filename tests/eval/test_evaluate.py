"""`longrope-jax eval` end to end on a tiny checkpoint and KJV, and bad input exiting 2 naming the value."""

import json
import math

import pytest

from longrope_jax import cli


def test_cli_evaluates_methods_and_lengths_end_to_end(tmp_path, kjv_dir, jax_model, capsys):
    work = tmp_path / "eval"
    rc = cli.main(["eval", "--model", f"jax:{jax_model}", "--workdir", str(work), "--data-dir", kjv_dir,
                   "--lengths", "32,64", "--method", "base=none", "--method", "pi=linear:2", "--stride", "16",
                   "--docs", "2", "--max-tokens", "150", "--passkey-lengths", "300", "--passkey-depths", "2",
                   "--passkey-trials", "2", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((work / "eval.json").read_text())
    assert saved["methods"] == {"base": None, "pi": {"rope_type": "linear", "factor": 2.0}}
    assert [(r["method"], r["length"]) for r in saved["perplexity"]] == [
        ("base", 32), ("base", 64), ("pi", 32), ("pi", 64)]
    assert all(r["tokens"] == 300 and math.isfinite(r["ppl_token"]) for r in saved["perplexity"])
    assert (work / "perplexity.png").read_bytes()[:4] == b"\x89PNG"
    assert "| base |" in (work / "summary.md").read_text()
    assert "| method | 32 | 64 |" in capsys.readouterr().out
    assert [(r["method"], r["depth"], r["trials"]) for r in saved["passkey"]] == [
        ("base", 0.0, 2), ("base", 1.0, 2), ("pi", 0.0, 2), ("pi", 1.0, 2)]
    assert saved["settings"]["passkey_depths"] == [0.0, 1.0]
    assert (work / "passkey.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--lengths", "1"], "perplexity length: expected an integer >= 2, got 1"),
    (["--lengths", "32,x"], "--lengths '32,x': expected comma-separated integers"),
    (["--lengths", "32", "--method", "bad=rope:2"], "method spec 'rope:2': unknown kind 'rope'"),
    (["--lengths", "32", "--docs", "50"], "needs 50 documents of >= 32 tokens, found 6"),
    (["--passkey-lengths", "100"], "passkey length 100: the template alone takes"),
    (["--lengths", "32", "--mesh", "1,2"], "--mesh '1,2': expected four sizes data,fsdp,seq,tensor"),
    (["--lengths", "32,64", "--stride", "40"], "stride 40: expected at most L - 1 = 31 for length 32"),
    ([], "nothing to do"),
])
def test_cli_bad_input_exits_2_naming_the_value(tmp_path, kjv_dir, jax_model, capsys, args, message):
    rc = cli.main(["eval", "--model", f"jax:{jax_model}", "--workdir", str(tmp_path / "w"), "--data-dir", kjv_dir,
                   "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and "longrope-jax eval: error:" in err and message in err, err


def test_evaluate_names_a_method_that_is_not_a_rope_scaling(kjv_dir, jax_model):
    from longrope_jax.eval.evaluate import EvalSpec, evaluate

    spec = EvalSpec(lengths=(32,), methods={"pi": "linear:4"}, data_dir=kjv_dir)
    with pytest.raises(ValueError, match="method 'pi': expected a RopeScaling or None, got str"):
        evaluate(f"jax:{jax_model}", spec)
