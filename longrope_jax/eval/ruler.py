"""RULER runs: greedy decoding of the `ruler_tasks` prompts through the KV cache, RULER's scoring and
its effective length.

Scoring is that of NVIDIA/RULER `scripts/eval/synthetic/constants.py` (string_match_all for niah,
vt, cwe and fwe; string_match_part for qa, offered here but unused since qa is left out), after the
prediction clean-up of `scripts/eval/evaluate.py` (`postprocess_pred`: control characters become
newlines, surrounding white space is stripped). A score is a percentage rounded to 2 decimals. The
effective length is RULER's (its README): the longest length up to which the average over tasks
stays >= 85.6, Llama2-7B's score at 4k.

Prompts of one task and length with the same token count go through one `generate` call (at most
`batch_size` rows), so a method x length x task cell compiles once per distinct prompt length.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from longrope_jax.eval.ruler_tasks import make_samples, task_kind
from longrope_jax.generate import check_ids_fit, place_params
from longrope_jax.model import LlamaConfig

THRESHOLD = 85.6  # RULER's effective-length threshold
AVERAGE = "average"
SHOWN = 2  # predictions kept per cell in eval.json


def postprocess(prediction: str) -> str:
    """RULER's postprocess_pred: strip, control characters to newlines, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of its references found (case-insensitive substring), x100."""
    _check_pairs(predictions, references)
    hits = [sum(r.lower() in p.lower() for r in refs) / len(refs) for p, refs in zip(predictions, references)]
    return round(sum(hits) / len(predictions) * 100, 2)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over samples of whether any of its references is found (case-insensitive substring), x100."""
    _check_pairs(predictions, references)
    hits = [max(float(r.lower() in p.lower()) for r in refs) for p, refs in zip(predictions, references)]
    return round(sum(hits) / len(predictions) * 100, 2)


def _check_pairs(predictions, references) -> None:
    if not predictions or len(predictions) != len(references) or any(len(r) == 0 for r in references):
        raise ValueError(f"ruler scoring: expected one non-empty reference list per prediction, got "
                         f"{len(predictions)} predictions and {len(references)} reference lists")


METRICS = {"niah": string_match_all, "vt": string_match_all, "cwe": string_match_all, "fwe": string_match_all,
           "qa": string_match_part}


def effective_length(average_by_length: dict, threshold: float = THRESHOLD) -> int | None:
    """The longest length L such that every measured length <= L averages >= threshold (None when the
    shortest one already falls below)."""
    best = None
    for length in sorted(average_by_length):
        if average_by_length[length] < threshold:
            break
        best = int(length)
    return best


def ruler_samples(tokenizer, *, tasks, lengths, samples: int, seed: int = 0, essay=None) -> dict:
    """{(task, length): [Sample]}; every prompt is built here, so a bad task or a too-short length fails
    before anything compiles."""
    return {(task, int(length)): make_samples(task, tokenizer, length, samples, seed=seed, essay=essay)
            for task in tasks for length in lengths}


def summarize(rows) -> dict:
    """{method: {"average": {length: mean score over tasks}, "effective_length": L or None}}."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        lengths = sorted({r["length"] for r in mine})
        avg = {n: round(float(np.mean([r["score"] for r in mine if r["length"] == n])), 2) for n in lengths}
        out[method] = {AVERAGE: avg, "effective_length": effective_length(avg)}
    return out


def evaluate_ruler(config: LlamaConfig, params, tokenizer, *, tasks, lengths, samples: int = 10, methods=None,
                   seed: int = 0, essay=None, batch_size: int = 8, progress: bool = False, generate_fn=None,
                   mesh=None, rules=None, cells: dict | None = None) -> list:
    """Rows {method, task, length, samples, score, prompt_tokens, examples} for every method x length x
    task, greedy decoding through `generate.generate` (or `generate_fn`, same signature). `cells`:
    prebuilt `ruler_samples`. On a `mesh` each prompt and its KV cache are split over the devices."""
    if generate_fn is None:
        from longrope_jax.generate import generate as generate_fn
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"--ruler-batch: expected an integer >= 1, got {batch_size!r}")
    methods = {"model": None} if methods is None else dict(methods)
    if cells is None:
        cells = ruler_samples(tokenizer, tasks=tasks, lengths=lengths, samples=samples, seed=seed, essay=essay)
    check_ids_fit(config, max(max(s.ids) for group in cells.values() for s in group), "ruler prompts")
    eos = tokenizer.eos_id
    placement = {} if mesh is None else {"mesh": mesh, "rules": rules}
    params = place_params(config, params, mesh, rules)  # once, not at every call
    order = sorted(cells, key=lambda c: (c[1], list(tasks).index(c[0]) if c[0] in tasks else 0))
    rows = []
    with tqdm(total=len(methods) * len(cells), desc="ruler", disable=not progress) as bar:
        for name, scaling in methods.items():
            for task, length in order:
                group = cells[task, length]
                predictions = [""] * len(group)
                by_size: dict[int, list[int]] = {}
                for i, s in enumerate(group):
                    by_size.setdefault(len(s.ids), []).append(i)
                for size, idx in sorted(by_size.items()):
                    for start in range(0, len(idx), batch_size):
                        chunk = idx[start:start + batch_size]
                        prompts = np.asarray([group[i].ids for i in chunk], np.int32)
                        out = np.asarray(generate_fn(config, params, prompts, group[0].max_new_tokens,
                                                     rope_scaling=scaling, temperature=0.0, eos_id=eos, **placement))
                        for i, row in zip(chunk, out):
                            predictions[i] = postprocess(tokenizer.decode(_until(row, eos)))
                score = METRICS[task_kind(task)](predictions, [s.outputs for s in group])
                shown = [{"outputs": list(s.outputs), "prediction": p} for s, p in zip(group[:SHOWN], predictions)]
                rows.append({"method": name, "task": task, "length": int(length), "samples": len(group),
                             "score": score, "prompt_tokens": float(np.mean([len(s.ids) for s in group])),
                             "examples": shown})
                bar.update(1)
    return rows


def _until(ids, eos_id) -> list:
    ids = [int(i) for i in ids]
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids
