"""Evaluation outputs: `eval.json`, the plots and the markdown tables."""

import json
import math

from longrope_jax.eval import report
from tests.eval.tiny_eval import ORIG, eval_model_config


def test_write_results_writes_json_plots_and_tables(tmp_path):
    ppl = [{"method": m, "length": n, "ppl_window_mean": v, "ppl_token": v * 1.1, "tokens": 10, "windows": 1}
           for m, base in (("pi", 5.0), ("yarn", 4.0)) for n, v in ((64, base), (128, base * 2))]
    ppl[-1]["ppl_window_mean"] = math.inf  # a diverged method must not break the plot
    pk = [{"method": m, "length": n, "depth": d, "trials": 4, "correct": c, "accuracy": c / 4, "samples": []}
          for m in ("pi", "yarn") for n in (300, 400) for d, c in ((0.0, 4), (1.0, 1))]
    paths = report.write_results(tmp_path / "out", config=eval_model_config(), methods={"pi": {"rope_type": "linear"}},
                                 perplexity_rows=ppl, passkey_rows=pk, trained_length=ORIG)
    saved = json.loads(paths["json"].read_text())
    assert saved["perplexity"][:3] == ppl[:3] and saved["passkey"] == pk and saved["config"]["vocab_size"] == 264
    for key in ("perplexity_plot", "passkey_plot"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = paths["summary"].read_text()
    assert "| method | 64 | 128 |" in summary and "| pi | 5 (5.5) | 10 (11) |" in summary
    assert "| yarn | 4 (4.4) | inf (8.8) |" in summary
    assert "| method | 300 | 400 |" in summary and "| pi | 0.62 | 0.62 |" in summary
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary left


def test_plot_styles_give_one_colour_per_method_and_a_style_per_scale():
    styles = report.line_styles(["none", "PI 4x", "PI 8x", "YaRN 4x", "YaRN 8x", "dynamic NTK"])
    assert styles["PI 4x"][0] == styles["PI 8x"][0] != styles["YaRN 4x"][0]
    assert styles["PI 4x"][1] == styles["YaRN 4x"][1] == "-" and styles["PI 8x"][1] == styles["YaRN 8x"][1] == "--"
    assert len({styles[m][0] for m in ("none", "PI 4x", "YaRN 4x", "dynamic NTK")}) == 4
