"""The demo study's stages (see `demo`): each reads earlier stages' outputs from the workdir."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np

from longrope_jax.io.artifacts import read_rope_scaling
from longrope_jax.io.files import write_atomic
from longrope_jax.rope import RopeScaling

FINETUNES = ("pi", "yarn", "longrope", "longrope2")
BOOKS_DIR = "books"  # WORKDIR/books/{search,check}.jsonl: the training books the searches and the check read
CHECK_FILE = "check.json"  # WORKDIR/search_check/check.json
SELECTED_FILE = "selected_rope_scaling.json"  # WORKDIR/search_Sx/: the factors the check selected
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
        out += [("search_longrope2", self.search_longrope2), ("search_check", self.search_check)]
        out += [("eval_base", self.eval_base)]
        out += [(f"finetune_{m}", lambda m=m: self.finetune(m)) for m in FINETUNES]
        out += [("eval_tuned", self.eval_tuned), ("export", self.export), ("report", self.report)]
        return out

    # ---- paths -------------------------------------------------------------------------------------

    def model_dir(self, name: str) -> Path:
        return self.workdir / name / "hf"

    def factors_file(self, scale: int) -> Path:
        """The LongRoPE factors used downstream: the search candidate that the held-out check selected."""
        return self.workdir / f"search_{scale}x" / SELECTED_FILE

    def longrope2_factors_file(self) -> Path:
        from longrope_jax.search.evolution import ROPE_SCALING_FILE

        return self.workdir / "search_longrope2" / ROPE_SCALING_FILE

    def books(self) -> dict:
        """{"search": [...], "check": [...]}: training books (indices into the train split) spread evenly over
        the corpus, disjoint, each long enough for the longest search window; written once as jsonl files.

        The searches used to read the first books (Genesis..Deuteronomy: the law, one register), and their best
        candidate beat NTK there but lost on the held-out books; books from every part (law, history, poetry,
        prophets, gospels, letters) are what the validation books are like. The search file is ordered so
        that any prefix of it is spread too (LongRoPE reads its first `docs`, LongRoPE2 more)."""
        from longrope_jax.data.sources import open_source
        from longrope_jax.data.tokenizer import build_tokenizer

        p, out = self.plan, self.workdir / BOOKS_DIR
        index_file = out / "books.json"
        if index_file.exists():
            return json.loads(index_file.read_text())
        docs, tok = open_source("kjv", "train"), build_tokenizer("byte")
        need = p.context * max(p.search_scales)
        eligible = [i for i in range(len(docs)) if len(tok.encode(docs[i])) >= need]
        n_search = max(p.search["docs"], p.search_longrope2["docs"])
        total = n_search + p.check_docs
        if len(eligible) < total:
            raise ValueError(f"demo: {total} training books of >= {need} tokens needed for the searches and the "
                             f"check, found {len(eligible)}")
        picks = [eligible[round(k * (len(eligible) - 1) / (total - 1))] for k in range(total)] if total > 1 else eligible[:1]
        check = picks[1::2][: p.check_docs]
        search = [i for i in picks if i not in check]
        search = search[0::2] + search[1::2]  # any prefix spread over the corpus
        out.mkdir(parents=True, exist_ok=True)
        for name, idx in (("search", search), ("check", check)):
            write_atomic(out / f"{name}.jsonl", "".join(json.dumps({"text": docs[i]}) + "\n" for i in idx))
        books = {"search": search, "check": check,
                 "titles": {str(i): docs[i].split("\n", 1)[0].strip()[:40] for i in search + check}}
        write_atomic(index_file, json.dumps(books, indent=1))
        return books

    def books_spec(self, name: str) -> str:
        self.books()
        return f"files:{self.workdir / BOOKS_DIR / name}.jsonl"

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
                        target_length=p.context * scale, data=self.books_spec("search"), split="train",
                        attention="blockwise", attention_chunk=p.attention_chunk, **p.search)
        return {"perplexity": result["perplexity"], "seeds": result["seeds"], "evaluated": result["evaluated"]}

    def search_longrope2(self):
        """LongRoPE2's search at finetune_scale: needle-driven perplexity (only the answers of needles placed in
        the windows are scored) over its critical-pair space. The critical pair comes from the model
        (search.space.critical_pair): tiny_cpu's head_dim 32, rope_theta 823.4 and L=256 give pair 9 (d_tcd 18;
        its wavelength 274 tokens is the first past 256), so the window 9 +- 4 fits in the 16 pairs."""
        from longrope_jax.search.cli import search

        p = self.plan
        result = search(f"hf:{self.model_dir('pretrain')}", self.workdir / "search_longrope2",
                        target_length=p.finetune_length, data=self.books_spec("search"), split="train",
                        attention="blockwise", attention_chunk=p.attention_chunk, objective="needle",
                        search_space="longrope2", **p.search_longrope2)
        return {"needle_perplexity": result["perplexity"], "seeds": result["seeds"], "evaluated": result["evaluated"],
                "critical_pair": result["config"]["critical_pair"]}

    def search_check(self):
        """The held-out check of the searches, one compile per scale: the seeds (PI, NTK, YaRN factors), the top
        `check_top` candidates of the LongRoPE search and (at finetune_scale) LongRoPE2's best are scored by
        plain perplexity on one window (BOS + first n - 1 tokens) of each search book, each check book (other
        training books) and each validation book. The LongRoPE factors used downstream are the candidate with
        the lowest perplexity on the check books, so the search's winner must also win on books it never saw."""
        from longrope_jax.data.sources import open_source
        from longrope_jax.data.tokenizer import build_tokenizer
        from longrope_jax.io.artifacts import load_model
        from longrope_jax.search.cli import SearchConfig, seeds_for, with_attention
        from longrope_jax.search.evolution import RESULT_FILE, ROPE_SCALING_FILE, STATE_FILE
        from longrope_jax.search.fitness import PerplexityEvaluator, eval_windows

        p = self.plan
        model_cfg, params = load_model(f"hf:{self.model_dir('pretrain')}", "demo pretrain")
        model_cfg = with_attention(model_cfg, "blockwise", p.attention_chunk)
        tok = build_tokenizer("byte")
        sets = {"search": (open_source(self.books_spec("search"), "train"), p.search["docs"]),
                "check": (open_source(self.books_spec("check"), "train"), p.check_docs),
                "validation": (open_source("kjv", "validation"), None)}
        out = {"books": self.books(), "scales": {}}
        for s in p.search_scales:
            n = p.context * s
            run = self.workdir / f"search_{s}x"
            result = json.loads((run / "long" / RESULT_FILE).read_text())
            config = SearchConfig(**result["config"])
            space = config.space(len(result["factors"]))
            cands = {f"{k} seed": space.factors(space.snap(f, 0)) for k, f in seeds_for(config, model_cfg).items()}
            history = json.loads((run / "long" / STATE_FILE).read_text())["history"]
            ranked = sorted(range(len(history)), key=lambda i: history[i][1])  # stable: evaluation order on ties
            top = []  # the best check_top candidates other than the seeds (listed already)
            for i in ranked:
                f = space.factors(np.asarray(history[i][0], np.int64))
                if len(top) < p.check_top and not any(np.array_equal(f, g) for g in list(cands.values()) + top):
                    top.append(f)
            cands.update({f"LongRoPE #{rank + 1}": f for rank, f in enumerate(top)})
            if s == p.finetune_scale and (self.workdir / "search_longrope2" / "long" / RESULT_FILE).exists():
                r2 = json.loads((self.workdir / "search_longrope2" / "long" / RESULT_FILE).read_text())
                cands["LongRoPE2 best"] = np.asarray(r2["factors"])
            windows, parts = [], {}
            for name, (docs, count) in sets.items():
                w = eval_windows(docs, tok, n, count if count is not None else len(docs))
                parts[name] = (len(windows), len(windows) + len(w))
                windows += list(w)
            ev = PerplexityEvaluator(model_cfg, params, np.asarray(windows), original_length=p.context,
                                     target_length=n, candidates_per_call=p.search["candidates_per_call"])
            sums_NxC = ev.window_sums(np.stack(list(cands.values())))
            rows = []
            for c, name in enumerate(cands):
                row = {"name": name, **{k: float(np.exp(sums_NxC[a:b, c].sum() / ((b - a) * (n - 1))))
                                        for k, (a, b) in parts.items()}}
                rows.append(row)
            pool = [r for r in rows if not r["name"].startswith("LongRoPE2")]
            chosen = min(pool, key=lambda r: r["check"])
            scaling = json.loads((run / ROPE_SCALING_FILE).read_text())
            scaling["long_factor"] = [float(x) for x in cands[chosen["name"]]]
            write_atomic(run / SELECTED_FILE, json.dumps(scaling, indent=1))
            out["scales"][str(s)] = {"length": n, "rows": rows, "selected": chosen["name"],
                                     "windows": {k: b - a for k, (a, b) in parts.items()},
                                     "search_best": result["perplexity"], "search_seeds": result["seeds"]}
        target = self.workdir / "search_check"
        target.mkdir(parents=True, exist_ok=True)
        write_atomic(target / CHECK_FILE, json.dumps(out, indent=1))
        return {str(s): v["selected"] for s, v in out["scales"].items()}

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
            if s == p.finetune_scale:
                methods[f"LongRoPE2 {s}x"] = RopeScaling.from_hf(
                    read_rope_scaling(self.longrope2_factors_file(), "search_longrope2"))
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
        elif method == "longrope":
            c.rope.update(type="longrope", factors_file=str(self.factors_file(p.finetune_scale)))
        else:
            # LongRoPE2's mixed context window training: every packed document takes the short factors (all 1.0,
            # the original RoPE) when it is at most L long and the searched long factors otherwise. That needs
            # rows holding several documents of both kinds: pack="concat" lays documents end to end and cuts
            # rows anywhere, so a row holds book pieces of any length next to passkey documents (0..4L-2
            # characters); "fit" pads a row rather than cut a short document (a long book still fills whole
            # rows alone), and "document" gives one document per row.
            c.rope.update(type="longrope", factors_file=str(self.longrope2_factors_file()), mixed_window=True)
            c.data.pack = "concat"
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

