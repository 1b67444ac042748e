"""Evaluation outputs: `eval.json`, perplexity and passkey plots (matplotlib, Agg) and a markdown summary.

Rows are those of `perplexity.evaluate_perplexity` ({method, length, ppl_window_mean, ppl_token, ...}),
`evaluate.evaluate_passkey` ({method, length, depth, accuracy, ...}) and `ruler.evaluate_ruler`
({method, task, length, score, ...}; summarized per method with its effective length). Every file is written to a
temporary sibling and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from longrope_jax.eval.ruler import AVERAGE, THRESHOLD, summarize
from longrope_jax.io.files import write_atomic

EVAL_FILE, SUMMARY_FILE = "eval.json", "summary.md"
PERPLEXITY_PLOT, PASSKEY_PLOT, RULER_PLOT = "perplexity.png", "passkey.png", "ruler.png"
PPL_METRICS = ("ppl_window_mean", "ppl_token")


def write_results(workdir, *, config=None, methods=None, perplexity_rows=(), passkey_rows=(), settings=None,
                  trained_length: int | None = None, ruler_rows=()) -> dict:
    """Write `eval.json` ({config, methods, settings, perplexity, passkey}, and with RULER rows `ruler`
    and `ruler_summary`), `summary.md` and the plots of whichever rows there are; returns {kind: path}.
    `config` is a LlamaConfig (saved as its HF dict), `methods` {name: HF rope_scaling dict or None}."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    perplexity_rows, passkey_rows, ruler_rows = list(perplexity_rows), list(passkey_rows), list(ruler_rows)
    result = {"config": None if config is None else config.to_hf(), "methods": methods or {},
              "settings": settings or {}, "perplexity": perplexity_rows, "passkey": passkey_rows}
    if ruler_rows:
        result.update(ruler=ruler_rows, ruler_summary=summarize(ruler_rows))
    paths = {"json": workdir / EVAL_FILE, "summary": workdir / SUMMARY_FILE}
    write_atomic(paths["json"], json.dumps(result, indent=1) + "\n")
    write_atomic(paths["summary"], markdown_tables(perplexity_rows, passkey_rows, ruler_rows))
    if perplexity_rows:
        paths["perplexity_plot"] = plot_perplexity(perplexity_rows, workdir / PERPLEXITY_PLOT, trained_length)
    if passkey_rows:
        paths["passkey_plot"] = plot_passkey(passkey_rows, workdir / PASSKEY_PLOT)
    if ruler_rows:
        paths["ruler_plot"] = plot_ruler(ruler_rows, workdir / RULER_PLOT)
    return paths


def _methods(rows) -> list:
    return list(dict.fromkeys(r["method"] for r in rows))  # first-seen order


def _figure(width: float, height: float):
    # The object API with an Agg canvas: no pyplot, so no global backend is chosen for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def line_styles(methods) -> dict:
    """{method: (colour, line style)}: one colour per method family, the scale as the style, so "PI 4x"
    is solid and "PI 8x" dashed in PI's colour (a name's trailing "Nx" is its scale)."""
    import re

    from matplotlib import colormaps

    family = {m: re.sub(r"\s+\d+(\.\d+)?x$", "", m) for m in methods}
    families = list(dict.fromkeys(family.values()))
    scales = list(dict.fromkeys(m[len(family[m]):].strip() for m in methods if m != family[m]))
    colours, dashes = colormaps["tab10"].colors, ("-", "--", "-.", ":")
    return {m: (colours[families.index(family[m]) % len(colours)],
                dashes[(scales.index(m[len(family[m]):].strip()) if m != family[m] else 0) % len(dashes)])
            for m in methods}


def plot_perplexity(rows, path, trained_length: int | None = None, metric: str = "ppl_window_mean") -> Path:
    """Perplexity vs length, one line per method, log-y (log2-x), the trained length as a dashed line.
    Non-finite values (a diverged method) are left out of its line."""
    if metric not in PPL_METRICS:
        raise ValueError(f"plot_perplexity metric {metric!r}: expected one of {PPL_METRICS}")
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter

    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    styles = line_styles(_methods(rows))
    for method in _methods(rows):
        pts = sorted((r["length"], r[metric]) for r in rows if r["method"] == method and math.isfinite(r[metric]))
        if pts:
            color, dash = styles[method]
            ax.plot(*zip(*pts), marker="o", color=color, linestyle=dash, label=method)
    if trained_length:
        ax.axvline(trained_length, color="gray", linestyle=":", label=f"trained length {trained_length}")
    ax.set_xscale("log", base=2)
    lengths = sorted({r["length"] for r in rows})
    ax.set_xticks(lengths, [str(n) for n in lengths])  # the lengths themselves, not powers of two
    ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 40, not 4x10^1; minor ticks at 2, 3, 5 x 10^k only
    def minor(v, _):  # every minor tick when the range is narrow
        lo, hi = ax.get_ylim()
        return f"{v:g}" if hi / lo < 3 or f"{v:.0e}"[0] in "235" else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity" + (" (token-weighted)" if metric == "ppl_token" else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def passkey_grid(rows, method: str):
    """(lengths, depths, accuracy [depths, lengths] with NaN where a cell is missing) of one method."""
    mine = [r for r in rows if r["method"] == method]
    lengths = sorted({r["length"] for r in mine})
    depths = sorted({r["depth"] for r in mine})
    acc = np.full((len(depths), len(lengths)), np.nan)
    for r in mine:
        acc[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
    return lengths, depths, acc


def plot_passkey(rows, path) -> Path:
    """Passkey accuracy heatmaps, length x depth, one panel per method, each cell annotated."""
    methods = _methods(rows)
    fig = _figure(1.0 + 3.4 * len(methods), 3.6)
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    image = None
    for ax, method in zip(axes, methods):
        lengths, depths, acc = passkey_grid(rows, method)
        image = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("length (tokens)")
        ax.set_title(method)
        for (i, j), v in np.ndenumerate(acc):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    axes[0].set_ylabel("depth of the key")
    fig.colorbar(image, ax=list(axes), label="accuracy")
    return _save(fig, path)


def ruler_grid(rows, method: str):
    """(tasks + ["average"], lengths, scores [tasks + 1, lengths] with NaN where a cell is missing)."""
    mine = [r for r in rows if r["method"] == method]
    tasks = list(dict.fromkeys(r["task"] for r in mine))
    lengths = sorted({r["length"] for r in mine})
    grid = np.full((len(tasks) + 1, len(lengths)), np.nan)
    for r in mine:
        grid[tasks.index(r["task"]), lengths.index(r["length"])] = r["score"]
    average = summarize(mine)[method][AVERAGE]
    grid[-1] = [average[n] for n in lengths]
    return tasks + [AVERAGE], lengths, grid


def plot_ruler(rows, path) -> Path:
    """RULER scores as heatmaps, task (and the average) x length, one panel per method, cells annotated;
    the title gives the effective length at the 85.6 threshold."""
    methods = _methods(rows)
    summary = summarize(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = _figure(1.6 + 3.2 * len(methods), 1.4 + 0.32 * (len(tasks) + 1))
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    image = None
    for ax, method in zip(axes, methods):
        names, lengths, grid = ruler_grid(rows, method)
        image = ax.imshow(grid, vmin=0.0, vmax=100.0, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(names)), names)
        ax.axhline(len(names) - 1.5, color="black", linewidth=1)
        ax.set_xlabel("length (tokens)")
        ax.set_title(f"{method} (effective {summary[method]['effective_length'] or '-'})", fontsize="medium")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=list(axes), label="score")
    return _save(fig, path)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else "inf"


def markdown_tables(perplexity_rows=(), passkey_rows=(), ruler_rows=()) -> str:
    """Markdown: perplexity (rows = methods, columns = lengths; window mean, token-weighted in
    parentheses), passkey accuracy per method x length (mean over depths) and RULER scores per method
    (task x length, the average, the effective length)."""
    parts = []
    if perplexity_rows:
        lengths = sorted({r["length"] for r in perplexity_rows})
        cell = {(r["method"], r["length"]): r for r in perplexity_rows}
        lines = ["## Perplexity", "", "Mean over windows of the window-mean NLL, exponentiated (PI/YaRN); "
                 "token-weighted in parentheses.", "",
                 "| method | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for m in _methods(perplexity_rows):
            vals = [f"{_fmt(cell[m, n]['ppl_window_mean'])} ({_fmt(cell[m, n]['ppl_token'])})" if (m, n) in cell
                    else "" for n in lengths]
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        parts.append("\n".join(lines))
    if passkey_rows:
        lengths = sorted({r["length"] for r in passkey_rows})
        lines = ["## Passkey retrieval", "", "Accuracy over all depths and trials.", "",
                 "| method | " + " | ".join(str(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for m in _methods(passkey_rows):
            vals = []
            for n in lengths:
                cells = [r for r in passkey_rows if r["method"] == m and r["length"] == n]
                hits, trials = sum(r["correct"] for r in cells), sum(r["trials"] for r in cells)
                vals.append(f"{hits / trials:.2f}" if trials else "")
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        parts.append("\n".join(lines))
    if ruler_rows:
        parts.append(_ruler_markdown(list(ruler_rows)))
    return "\n\n".join(parts) + "\n" if parts else "No results.\n"


def _ruler_markdown(rows) -> str:
    summary = summarize(rows)
    lines = ["## RULER", "", ("Scores (string_match_all, %) per task and length; effective length: the longest length "
                              f"up to which the average stays >= {THRESHOLD}."), "",
             "| method | effective length |", "|---|---|"]
    lines += [f"| {m} | {summary[m]['effective_length'] or '-'} |" for m in summary]
    for m in summary:
        names, lengths, grid = ruler_grid(rows, m)
        lines += ["", f"### {m}", "", "| task | " + " | ".join(str(n) for n in lengths) + " |",
                  "|---" * (len(lengths) + 1) + "|"]
        for name, vals in zip(names, grid):
            label = f"**{name}**" if name == AVERAGE else name
            lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" if np.isfinite(v) else "" for v in vals) + " |")
    return "\n".join(lines)
