"""The demo study's stages (see `demo`): each reads earlier stages' outputs from the workdir."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

from longrope_jax.io.artifacts import read_rope_scaling
from longrope_jax.rope import RopeScaling

FINETUNES = ("pi", "yarn", "longrope")
CONFIG_FILE = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.py"


def tiny_config():
    """configs/tiny_cpu.py's get_config() (the demo runs from a source checkout, as `make demo` does)."""
    if not CONFIG_FILE.is_file():
        raise FileNotFoundError(f"demo: {CONFIG_FILE} not found; run the demo from a source checkout (make demo)")
    spec = importlib.util.spec_from_file_location("tiny_cpu", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


class Study:
    def __init__(self, workdir: Path, plan):
        self.workdir, self.plan = workdir, plan

    def stages(self):
        p = self.plan
        out = [("prepare", self.prepare), ("pretrain", self.pretrain)]
        out += [(f"search_{s}x", lambda s=s: self.search(s)) for s in p.search_scales]
        out += [("eval_base", self.eval_base)]
        out += [(f"finetune_{m}", lambda m=m: self.finetune(m)) for m in FINETUNES]
        out += [("eval_tuned", self.eval_tuned), ("export", self.export), ("report", self.report)]
        return out

    # ---- paths -------------------------------------------------------------------------------------

    def model_dir(self, name: str) -> Path:
        return self.workdir / name / "hf"

    def factors_file(self, scale: int) -> Path:
        from longrope_jax.search.evolution import ROPE_SCALING_FILE

        return self.workdir / f"search_{scale}x" / ROPE_SCALING_FILE

    # ---- stages ------------------------------------------------------------------------------------

    def prepare(self):
        from longrope_jax.data import sources

        sources.prepare("kjv")
        return {"train_docs": len(sources.open_source("kjv", "train")),
                "validation_docs": len(sources.open_source("kjv", "validation"))}

    def pretrain(self):
        from longrope_jax.train.trainer import train

        p = self.plan
        c = tiny_config()
        c.train.update(steps=p.pretrain_steps, batch_size=p.pretrain_batch, seq_len=p.context)
        c.data.update(passkey_fraction=p.passkey_fraction, pack="fit")
        c.eval.every_steps = max(p.pretrain_steps // 3, 1)
        c.checkpoint.every_steps = max(p.pretrain_steps // 3, 1)
        c.export_hf = True
        summary = train(c, self.workdir / "pretrain")
        return {"loss": (summary.get("last") or {}).get("loss"), "eval": summary.get("eval")}

    def search(self, scale: int):
        from longrope_jax.search.cli import search

        p = self.plan
        result = search(f"hf:{self.model_dir('pretrain')}", self.workdir / f"search_{scale}x",
                        target_length=p.context * scale, split="train", attention="blockwise",
                        attention_chunk=p.attention_chunk, **p.search)
        return {"perplexity": result["perplexity"], "seeds": result["seeds"], "evaluated": result["evaluated"]}

    def max_length(self, scaling: RopeScaling | None) -> int:
        """A method scaled s times is evaluated up to s L (its target); the model's own RoPE (None),
        unscaled and dynamic ones at every length."""
        if scaling is None or not scaling.fixed_factor:
            return max(self.plan.eval_lengths)
        return round(scaling.fixed_factor * self.plan.context)

    def base_methods(self) -> dict:
        p = self.plan
        methods = {"none": RopeScaling()}
        for s in p.search_scales:
            f = float(s)
            methods[f"PI {s}x"] = RopeScaling("linear", factor=f)
            methods[f"NTK {s}x"] = RopeScaling("ntk", factor=f)
            methods[f"YaRN {s}x"] = RopeScaling("yarn", factor=f, original_max_position_embeddings=p.context)
            methods[f"LongRoPE {s}x"] = RopeScaling.from_hf(read_rope_scaling(self.factors_file(s), f"search_{s}x"))
        methods["dynamic NTK"] = RopeScaling("dynamic", factor=1.0)
        return methods

    def eval_base(self):
        methods = self.base_methods()
        # Retrieval of the base model as it is; the extended ones are measured after fine-tuning.
        passkey_methods = {"none": methods["none"]}
        return self._evaluate("eval_base", {"base": (self.model_dir("pretrain"), methods, passkey_methods)})

    def finetune(self, method: str):
        from longrope_jax.train.trainer import train

        p = self.plan
        c = tiny_config()
        c.init_from = f"hf:{self.model_dir('pretrain')}"
        length = p.finetune_length
        c.model.max_position_embeddings = length
        c.train.update(steps=p.finetune_steps, batch_size=p.finetune_batch, seq_len=length)
        c.optimizer.update(lr=p.finetune_lr, warmup_steps=max(p.finetune_steps // 10, 1))
        c.data.update(passkey_fraction=p.passkey_fraction, pack="fit")
        c.eval.update(every_steps=p.finetune_steps, batch_size=p.finetune_batch)
        c.checkpoint.every_steps = p.finetune_steps
        c.export_hf = True
        if method == "pi":
            c.rope.update(type="linear", factor=float(p.finetune_scale))
        elif method == "yarn":
            c.rope.update(type="yarn", factor=float(p.finetune_scale), original_max_position_embeddings=p.context)
        else:
            c.rope.update(type="longrope", factors_file=str(self.factors_file(p.finetune_scale)))
        summary = train(c, self.workdir / f"finetune_{method}")
        return {"loss": (summary.get("last") or {}).get("loss"), "eval": summary.get("eval")}

    def eval_tuned(self):
        models = {f"{m} fine-tuned": (self.model_dir(f"finetune_{m}"), {"own": None}, {"own": None})
                  for m in FINETUNES}
        return self._evaluate("eval_tuned", models)

    def _evaluate(self, name: str, models: dict):
        """Perplexity over eval_lengths and passkey over passkey_lengths x depths for each model."""
        from longrope_jax.eval.evaluate import EvalSpec, evaluate
        from longrope_jax.io.hf import load_hf

        p = self.plan
        # Every validation book, cut to its first eval_doc_tokens; blockwise with small batches is ~3x faster
        # than dense on CPU at 2048 (fewer scores in memory).
        base = EvalSpec(tokenizer="byte", docs=None, min_tokens=1, max_tokens=p.eval_doc_tokens, attention="blockwise",
                        attention_chunk=p.attention_chunk, seed=0)
        ppl_rows, passkey_rows = [], []
        for model_name, (path, methods, passkey_methods) in models.items():
            model = load_hf(path)
            for n in p.eval_lengths:  # stride L/2: every token scored once, with at least L/2 context
                here = {k: v for k, v in methods.items() if n <= self.max_length(v)}
                spec = dataclasses.replace(base, lengths=(n,), methods=here, stride=n // 2, batch_size=max(1, 4096 // n))
                ppl_rows += [{"model": model_name, **r} for r in evaluate(model, spec)["perplexity"]]
            spec = dataclasses.replace(base, methods=passkey_methods, passkey_lengths=tuple(p.passkey_lengths),
                                       passkey_depths=p.passkey_depths, passkey_trials=p.passkey_trials)
            passkey_rows += [{"model": model_name, **r} for r in evaluate(model, spec)["passkey"]]
        out = self.workdir / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "perplexity.json").write_text(json.dumps(ppl_rows, indent=1))
        (out / "passkey.json").write_text(json.dumps(passkey_rows, indent=1))
        return {"rows": len(ppl_rows) + len(passkey_rows)}

    def export(self):
        from longrope_jax.demo import export as demo_export

        return demo_export.check_export(self.model_dir("finetune_longrope"), self.workdir / "export", self.plan)

    def report(self):
        from longrope_jax.demo import report as demo_report

        return demo_report.write_report(self.workdir, self.plan)
