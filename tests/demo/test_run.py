"""`longrope-jax demo --quick`: every stage of the study runs end to end, and a re-run skips them all."""

import json
import os
import subprocess
import sys

import pytest

from longrope_jax.demo.plan import Plan
from longrope_jax.demo.run import run_demo


def test_quick_demo_runs_every_stage_writes_the_report_and_resumes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as `make demo` runs
    cmd = [sys.executable, "-m", "longrope_jax", "demo", "--quick", "--workdir", str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    stages = json.loads((tmp_path / "stages.json").read_text())
    plan = Plan.quick()
    assert list(stages) == [name for name in plan.expected_s]
    report = (tmp_path / "report.md").read_text()
    for section in ("## Findings", "## Without fine-tuning", "## After fine-tuning", "## Export", "## Stage times"):
        assert section in report
    # LongRoPE2 next to LongRoPE: searched factors without fine-tuning, and its mixed-window fine-tune
    assert "| LongRoPE2 4x |" in report and "| longrope2 fine-tuned |" in report
    assert stages["search_longrope2"]["critical_pair"] == 9  # head_dim 32, rope_theta 823.4, L=256
    # the side-by-side table: search books, check books, validation books for seeds and searched factors
    assert "| scale | factors | search books (2) | check books (2) | validation books (6) |" in report
    for name in ("PI (seed)", "NTK (seed)", "YaRN (seed)", "LongRoPE #1", "LongRoPE2 best"):
        assert f"| 4x | {name} |" in report or f"| 4x | **{name} (selected)** |" in report
    check = json.loads((tmp_path / "search_check" / "check.json").read_text())["scales"]["4"]
    seeds = {r["name"]: r["search"] for r in check["rows"] if r["name"].endswith(" seed")}
    for k, v in check["search_seeds"].items():  # the check re-scores the search's own windows: same numbers
        assert seeds[f"{k} seed"] == pytest.approx(v, rel=1e-5)
    books = json.loads((tmp_path / "books" / "books.json").read_text())
    assert not set(books["search"]) & set(books["check"])
    for png in ("perplexity_base.png", "perplexity_tuned.png", "passkey.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    check = json.loads((tmp_path / "export" / "check.json").read_text())
    assert check["rope_scaling"]["rope_type"] == "longrope"
    assert check.get("ok") is True, check  # transformers loads the export and its logits match ours

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped") == len(stages)


def test_demo_refuses_a_workdir_holding_the_other_plan(tmp_path):
    (tmp_path / "plan.json").write_text("{}")
    with pytest.raises(ValueError, match="plan.json differs"):
        run_demo(tmp_path, quick=True)
