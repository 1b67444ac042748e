"""The demo's report: findings and discussion on hand-made rows where each claim holds and where it fails;
`demo --compare` on hand-made runs."""

import json
import subprocess
import sys

import pytest

from longrope_jax.demo.plan import Plan


def _ppl_rows(model, values):
    return [{"model": model, "method": m, "length": n, "ppl_window_mean": v} for (m, n), v in values.items()]


def _pk_rows(model, method, acc):
    return [{"model": model, "method": method, "length": n, "depth": 0.5, "trials": 10, "correct": round(10 * a)}
            for n, a in acc.items()]


@pytest.mark.parametrize("blows_up", [True, False])
def test_findings_and_discussion_follow_the_numbers(blows_up):
    from longrope_jax.demo import report as demo_report

    plan = Plan.full()
    far = 40.0 if blows_up else 7.0
    values = {("none", 256): 6.0, ("none", 512): 6.5, ("none", 1024): far, ("none", 2048): 2 * far}
    for s, n in ((4, 1024), (8, 2048)):
        values.update({(f"PI {s}x", n): 20.0, (f"NTK {s}x", n): 7.0, (f"YaRN {s}x", n): 6.8,
                       (f"LongRoPE {s}x", n): 6.6 if blows_up else 7.2})
    base = _ppl_rows("base", values)
    tuned = [r for m in ("pi", "yarn", "longrope") for r in _ppl_rows(f"{m} fine-tuned", {("own", 256): 6.3})]
    base_pk = _pk_rows("base", "none", {256: 1.0 if blows_up else 0.0})
    tuned_pk = [r for m in ("pi", "yarn", "longrope")
                for r in _pk_rows(f"{m} fine-tuned", "own", {1024: 0.9 if blows_up else 0.1})]
    held = [f["held"] for f in demo_report.findings(plan, base, tuned, tuned_pk)]
    assert held == [blows_up, blows_up, blows_up, blows_up, True]  # 6.3 / 6.0 = 1.05 <= 1.10
    text = " ".join(demo_report.discussion(plan, base, base_pk, tuned, tuned_pk))
    assert ("grows only" in text) != blows_up and ("did not form the retrieval skill" in text) != blows_up
    assert "PI divides every frequency by s" in text  # PI is last at both scales
    assert "passkey accuracy at 1024 is pi 90%" in text if blows_up else "pi 10%" in text


@pytest.mark.parametrize("two_wins", [True, False])
def test_longrope2_finding_and_discussion_follow_the_numbers(two_wins):
    from longrope_jax.demo import report as demo_report

    plan = Plan.full()
    base = _ppl_rows("base", {("none", 256): 6.0, ("none", 1024): 7.0, ("LongRoPE 4x", 1024): 6.9,
                              ("LongRoPE2 4x", 1024): 6.8 if two_wins else 7.1})
    two = (5.5, 5.9) if two_wins else (5.8, 6.2)
    tuned = (_ppl_rows("longrope fine-tuned", {("own", 256): 5.9, ("own", 1024): 5.6})
             + _ppl_rows("longrope2 fine-tuned", {("own", 256): two[1], ("own", 1024): two[0]}))
    facts = {f["claim"][:40]: f for f in demo_report.findings(plan, base, tuned, [])}
    f = next(v for k, v in facts.items() if "LongRoPE2" in k)
    assert f["held"] is two_wins and f"LongRoPE2 {two[0]:.3g} vs LongRoPE 5.6" in f["measured"]
    text = " ".join(demo_report.longrope2_discussion(plan, base, tuned))
    word = "lower" if two_wins else "higher"
    assert f"without fine-tuning LongRoPE2 {6.8 if two_wins else 7.1} is {word} than LongRoPE 6.9" in text
    assert f"after fine-tuning LongRoPE2 {two[0]:.3g} is {word} than LongRoPE 5.6" in text


def test_check_table_puts_search_check_and_validation_books_side_by_side():
    from longrope_jax.demo import report as demo_report

    rows = [{"name": "ntk seed", "search": 7.0, "check": 7.1, "validation": 7.2},
            {"name": "LongRoPE #1", "search": 6.8, "check": 7.3, "validation": 7.4},
            {"name": "LongRoPE #2", "search": 6.9, "check": 7.0, "validation": 7.1},
            {"name": "LongRoPE2 best", "search": 7.5, "check": 7.6, "validation": 7.7}]
    check = {"scales": {"4": {"rows": rows, "selected": "LongRoPE #2",
                              "windows": {"search": 5, "check": 5, "validation": 6}}}}
    lines = demo_report.check_table(check)
    assert lines[0] == "| scale | factors | search books (5) | check books (5) | validation books (6) |"
    assert "| 4x | NTK (seed) | 7 | 7.1 | 7.2 |" in lines
    assert "| 4x | **LongRoPE #2 (selected)** | 6.9 | 7 | 7.1 |" in lines
    text = " ".join(demo_report.check_discussion(check))
    # the search's best beats the seed on its own books, loses on the unseen ones
    assert "below the best seed on the search books (-0.2)" in text
    assert "at or above on the check books (+0.2)" in text and "at or above on the validation books (+0.2)" in text


def test_compare_runs_finds_each_changed_number_and_ignores_timings(tmp_path):
    from longrope_jax.demo.compare import compare_runs

    for run, (ppl, seconds) in {"a": (6.5, 10.0), "b": (6.5, 99.0)}.items():
        (tmp_path / run / "eval").mkdir(parents=True)
        (tmp_path / run / "stages.json").write_text(json.dumps({"pretrain": {"seconds": seconds, "loss": 1.25}}))
        (tmp_path / run / "eval" / "eval.json").write_text(json.dumps({"perplexity": [{"method": "PI", "ppl": ppl}],
                                                                       "model": f"hf:{tmp_path / run}/pretrain/hf"}))
    assert compare_runs(tmp_path / "a", tmp_path / "b") == (2, [])  # paths inside each run compare as WORKDIR/...
    (tmp_path / "b" / "eval" / "eval.json").write_text(json.dumps({"perplexity": [{"method": "PI", "ppl": 6.6}],
                                                                   "model": f"hf:{tmp_path / 'b'}/pretrain/hf"}))
    (tmp_path / "b" / "extra.json").write_text("{}")
    files, diffs = compare_runs(tmp_path / "a", tmp_path / "b")
    assert diffs == ["extra.json: only in " + str(tmp_path / "b"), "eval/eval.json.perplexity[0].ppl: 6.5 vs 6.6"]
    assert compare_runs(tmp_path / "a", tmp_path / "b", rel=0.02)[1] == ["extra.json: only in " + str(tmp_path / "b")]
    with pytest.raises(ValueError, match="holds no demo run"):
        compare_runs(tmp_path / "a", tmp_path / "eval")


def test_demo_compare_cli_exits_1_on_a_difference_and_2_on_a_missing_run(tmp_path):
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "stages.json").write_text(json.dumps({"x": {"seconds": 1, "v": run}}))
    cmd = [sys.executable, "-m", "longrope_jax", "demo", "--workdir", str(tmp_path / "a"), "--compare"]
    run = subprocess.run([*cmd, str(tmp_path / "b")], capture_output=True, text=True, check=False)
    assert run.returncode == 1 and 'stages.json.x.v: "a" vs "b"' in run.stdout
    run = subprocess.run([*cmd, str(tmp_path / "nothing")], capture_output=True, text=True, check=False)
    assert run.returncode == 2 and "holds no demo run" in run.stderr and "Traceback" not in run.stderr
