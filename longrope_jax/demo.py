"""`longrope-jax demo`: the end-to-end context-extension study on the bundled KJV corpus.

Stages (each writes its outputs under WORKDIR and is skipped when re-run once finished):

  prepare      the KJV TFDS corpus (array_record), validation books held out
  pretrain     tiny_cpu byte-level LLaMA at L=256, with a few passkey-format documents in the mix
  search_4x    LongRoPE evolutionary search of λ at 4L, on training books (validation stays held out)
  search_8x    the same at 8L
  eval_base    perplexity at L..8L for no scaling, PI, NTK, YaRN (4x and 8x), dynamic NTK and LongRoPE,
               all without fine-tuning; passkey accuracy of the base model
  finetune_*   a short fine-tune at 4L with PI, YaRN and the searched LongRoPE factors
  eval_tuned   perplexity and passkey (length x depth) of the fine-tuned models
  export       the LongRoPE model as a HF directory; its logits checked in `transformers` when installed
  report       WORKDIR/report.md with tables, plots, stage times and the findings checked against the papers
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from longrope_jax.evolution import write_atomic

STAGES_FILE = "stages.json"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of every stage. `full()` is the README's study (<= 20 min on 2 cores); `quick()` a smoke run."""

    context: int = 256
    pretrain_steps: int = 600
    pretrain_batch: int = 16
    passkey_fraction: float = 0.2
    eval_lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    eval_doc_tokens: int = 4096  # per validation book: the first this many tokens
    attention_chunk: int = 256  # blockwise attention in search and evaluation
    search_scales: tuple[int, ...] = (4, 8)
    search: dict = dataclasses.field(default_factory=lambda: {
        "population": 16, "mutations": 8, "crossovers": 8, "parents": 8, "iterations": 6, "docs": 5, "candidates_per_call": 4})
    finetune_scale: int = 4
    finetune_steps: int = 72
    finetune_batch: int = 4
    finetune_lr: float = 1e-3
    passkey_lengths: tuple[int, ...] = (256, 512, 1024)
    passkey_depths: int = 5
    passkey_trials: int = 10
    expected_s: dict = dataclasses.field(default_factory=lambda: {
        "prepare": 1, "pretrain": 366, "search_4x": 43, "search_8x": 132, "eval_base": 178, "finetune_pi": 117,
        "finetune_yarn": 115, "finetune_longrope": 113, "eval_tuned": 90, "export": 13, "report": 5})

    @classmethod
    def full(cls) -> Plan:
        return cls()

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            pretrain_steps=40, eval_lengths=(256, 1024), eval_doc_tokens=2048, search_scales=(4,),
            search={"population": 4, "mutations": 2, "crossovers": 2, "parents": 2, "iterations": 1, "docs": 2,
                        "candidates_per_call": 4},
            finetune_steps=6, finetune_batch=2, passkey_lengths=(1024,), passkey_depths=2, passkey_trials=2,
            expected_s={"prepare": 5, "pretrain": 30, "search_4x": 15, "eval_base": 20, "finetune_pi": 15, "finetune_yarn": 15,
                            "finetune_longrope": 15, "eval_tuned": 20, "export": 10, "report": 2},
        )

    @property
    def finetune_length(self) -> int:
        return self.context * self.finetune_scale


class Stages:
    """Runs stages in order, records their wall time in WORKDIR/stages.json and skips finished ones."""

    def __init__(self, workdir: Path, expected_s: dict | None = None, out=None):
        """`expected_s`: planned seconds per stage, for the ETA (none: no ETA)."""
        self.workdir, self.expected, self.out = workdir, expected_s or {}, out
        self.path = workdir / STAGES_FILE
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, stages: list[tuple[str, callable]]) -> dict:
        names = [n for n, _ in stages]
        start = time.perf_counter()
        for i, (name, fn) in enumerate(stages):
            if name in self.done:
                self._say(f"[{i + 1}/{len(stages)}] {name}: done ({self.done[name]['seconds']:.0f} s), skipped")
                continue
            self._say(f"[{i + 1}/{len(stages)}] {name}: running; {self._eta(names[i:], start)}")
            t0 = time.perf_counter()
            info = fn() or {}
            self.done[name] = {"seconds": round(time.perf_counter() - t0, 1), **info}
            write_atomic(self.path, json.dumps(self.done, indent=1))
        return self.done

    def _eta(self, remaining: list[str], start: float) -> str:
        # Scale the planned times by how fast this machine ran the stages measured so far.
        exp = self.expected
        if not exp:
            return f"elapsed {_clock(time.perf_counter() - start)}"
        # Stages planned under 30 s (preparing data, writing the report) say little about speed.
        measured = [n for n in self.done if exp.get(n, 0) >= 30 and "seconds" in self.done[n]]
        speed = (sum(self.done[n]["seconds"] for n in measured) / max(sum(exp[n] for n in measured), 1e-9)
                 if measured else 1.0)
        left = speed * sum(exp.get(n, 0) for n in remaining)
        elapsed = time.perf_counter() - start
        return f"elapsed {_clock(elapsed)}, ETA {_clock(left)}"

    def _say(self, msg: str) -> None:
        print(f"demo {msg}", file=self.out or sys.stderr, flush=True)  # looked up now: capture may replace it


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}:{s:02d}"


def run_demo(workdir, *, quick: bool = False, out=None) -> dict:
    from longrope_jax import demo_stages

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    plan = Plan.quick() if quick else Plan.full()
    saved = workdir / "plan.json"
    plan_json = json.dumps(dataclasses.asdict(plan), indent=1, sort_keys=True)
    if saved.exists() and saved.read_text() != plan_json:
        raise ValueError(f"demo workdir {workdir} holds a study made with another plan (plan.json differs); "
                         f"use another --workdir or delete it")
    write_atomic(saved, plan_json)
    study = demo_stages.Study(workdir, plan)
    times = Stages(workdir, plan.expected_s, out).run(study.stages())
    total = sum(v["seconds"] for v in times.values())
    print(f"demo: finished in {_clock(total)} of stage time; report: {workdir / 'report.md'}", file=out or sys.stderr,
          flush=True)
    return times


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="end-to-end context-extension study on the bundled corpus (resumable)")
    p.add_argument("--workdir", default="runs/demo", help="output directory (re-run to resume; default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a ~3-minute smoke run of every stage, at toy sizes")
    p.set_defaults(func=lambda args: (run_demo(args.workdir, quick=args.quick), 0)[1])
