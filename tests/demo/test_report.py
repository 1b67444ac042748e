"""The demo's report: findings and discussion on hand-made rows where each claim holds and where it fails."""

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
