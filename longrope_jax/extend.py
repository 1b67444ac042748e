"""`longrope-jax extend`: LongRoPE's progressive extension (paper §3.3) as one resumable, config-driven run.

    longrope-jax extend --config configs/extend_tiny.py --workdir DIR [--config.a.b=value ...]

Stages, each skipped when its output already exists in DIR (re-run the same command to resume):

  search_s1   λ (and n̂) at stage1_length on the base model            DIR/search_s1/rope_scaling.json
  finetune    the trainer at stage1_length with those factors          DIR/finetune/hf
  search_s2   λ at stage2_length on the fine-tuned model, seeded also
              with the stage-1 factors stretched by s2/s1               DIR/search_s2/long
  short       short factors at the original length (lower λ bound)     DIR/search_s2/short
  evaluate    perplexity and passkey of the final model                 DIR/eval
  export      HF directory: fine-tuned weights, rope_scaling with the
              final short and long factors, max_position_embeddings s2  DIR/hf

Every length counts from the base model's original context (`original_length`, default its
max_position_embeddings): factors are always relative to the RoPE the model was pretrained with.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections
import numpy as np

from longrope_jax.io.files import first_line, write_atomic
from longrope_jax.train import config as config_lib

SEARCH_KEYS = ("population", "mutations", "crossovers", "iterations", "parents", "mutation_prob", "bound_scale",
               "docs", "seed", "candidates_per_call", "search_start_tokens")


def default_extend_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ""  # hf:DIR or jax:DIR, the base model
    c.tokenizer = ""  # default: the model directory's tokenizer.json, else byte
    c.original_length = 0  # 0: the model's max_position_embeddings
    c.stage1_length = 0
    c.stage2_length = 0
    c.data = dict(source="kjv", split="validation", data_dir="")  # the search's fitness documents
    c.search = dict(population=64, mutations=16, crossovers=16, iterations=40, parents=32, mutation_prob=0.3,
                    bound_scale=1.25, docs=5, seed=0, candidates_per_call=4, search_start_tokens=False)
    c.short = dict(enabled=True, max_factor=0.0, iterations=0)  # 0: defaults (λ <= 2.0; search.iterations)
    # The fine-tune: a trainer config file plus overrides; init_from, rope, seq_len and
    # max_position_embeddings are set by the pipeline.
    c.finetune = dict(config="", overrides=ml_collections.ConfigDict())
    c.eval = dict(lengths=[], stride=0, docs=5, passkey_lengths=[], passkey_depths=5, passkey_trials=10)
    return c


def resolve(user) -> ml_collections.ConfigDict:
    c = default_extend_config()
    with c.unlocked():
        config_lib.merge(c, user, open_keys=("overrides",))
    for key in ("model", "finetune.config"):
        section, _, name = key.rpartition(".")
        if not (c[section][name] if section else c[name]):
            raise ValueError(f"config.{key}: required")
    if not 0 < (c.original_length or 1) < c.stage1_length < c.stage2_length:
        raise ValueError(f"config.stage1_length {c.stage1_length}, stage2_length {c.stage2_length}: expected "
                         f"original_length < stage1_length < stage2_length")
    return c


class Pipeline:
    def __init__(self, c: ml_collections.ConfigDict, workdir: Path):
        from longrope_jax.io.artifacts import read_model_config

        self.c, self.workdir = c, Path(workdir)
        base = read_model_config(c.model, "config.model")
        self.original = c.original_length or base.max_position_embeddings
        if c.stage1_length <= self.original:
            raise ValueError(f"config.stage1_length {c.stage1_length}: expected more than the original length "
                             f"{self.original}")
        self.tokenizer = c.tokenizer or None
        self.finetune_config()  # a broken fine-tune config fails now, not after the first search

    def finetune_config(self) -> ml_collections.ConfigDict:
        """The trainer config of the fine-tune stage, numbers checked (`config.validate`)."""
        c = self.c
        t = config_lib.resolve(_load_config_file(c.finetune.config))
        with t.unlocked():
            config_lib.merge(t, c.finetune.overrides, "config.finetune.overrides")
        t.init_from = c.model
        t.model.max_position_embeddings = c.stage1_length
        t.train.seq_len = c.stage1_length
        t.rope.update(type="longrope", factors_file=str(self.workdir / "search_s1" / "rope_scaling.json"))
        t.export_hf = True
        config_lib.validate(t)
        return t

    def stages(self):
        out = [("search_s1", self.search_s1), ("finetune", self.finetune), ("search_s2", self.search_s2)]
        if self.c.short.enabled:
            out.append(("short", self.short))
        return out + [("evaluate", self.evaluate), ("export", self.export)]

    def _search(self, model: str, out: Path, target: int, **extra) -> dict:
        from longrope_jax.search.cli import search

        c = self.c
        settings = {**{k: c.search[k] for k in SEARCH_KEYS}, **extra}
        return search(model, out, target_length=target, original_length=self.original, data=c.data.source,
                      split=c.data.split, data_dir=c.data.data_dir or None, tokenizer=self.tokenizer, **settings)

    @property
    def tuned(self) -> str:
        return f"hf:{self.workdir / 'finetune' / 'hf'}"

    def search_s1(self):
        r = self._search(self.c.model, self.workdir / "search_s1", self.c.stage1_length)
        return {"perplexity": r["perplexity"], "start_tokens": r["start_tokens"]}

    def finetune(self):
        from longrope_jax.train import trainer as train_lib

        summary = train_lib.train(self.finetune_config(), self.workdir / "finetune")
        return {"loss": (summary.get("last") or {}).get("loss")}

    def search_s2(self):
        from longrope_jax.search.evolution import RESULT_FILE

        s1 = json.loads((self.workdir / "search_s1" / "long" / RESULT_FILE).read_text())
        stretched = np.asarray(s1["factors"]) * self.c.stage2_length / self.c.stage1_length
        seed = self.workdir / "search_s2_seed.json"
        write_atomic(seed, json.dumps({"factors": stretched.tolist()}))
        r = self._search(self.tuned, self.workdir / "search_s2", self.c.stage2_length, init_factors=seed)
        return {"perplexity": r["perplexity"]}

    def short(self):
        c = self.c
        extra = {"short": True, "search_start_tokens": False}  # n̂ comes from the long search
        if c.short.max_factor:
            extra["max_factor"] = c.short.max_factor
        if c.short.iterations:
            extra["iterations"] = c.short.iterations
        r = self._search(self.tuned, self.workdir / "search_s2", self.c.stage2_length, **extra)
        return {"perplexity": r["perplexity"]}

    def final_model(self):
        """(config, params): the fine-tuned weights with the final factors and context."""
        from longrope_jax.io.artifacts import load_model, read_rope_scaling
        from longrope_jax.rope import RopeScaling

        config, params = load_model(self.tuned, "fine-tuned model")
        scaling = RopeScaling.from_hf(read_rope_scaling(self.workdir / "search_s2" / "rope_scaling.json", "search_s2"))
        config = dataclasses.replace(config, rope_scaling=scaling, max_position_embeddings=self.c.stage2_length)
        return config, params

    def evaluate(self):
        from longrope_jax.eval.evaluate import EvalSpec, evaluate
        from longrope_jax.io.artifacts import default_tokenizer

        c = self.c
        spec = EvalSpec(lengths=tuple(c.eval.lengths), data=c.data.source, data_dir=c.data.data_dir or None,
                        tokenizer=self.tokenizer or default_tokenizer(self.tuned), docs=c.eval.docs,
                        stride=c.eval.stride or None, passkey_lengths=tuple(c.eval.passkey_lengths),
                        passkey_depths=c.eval.passkey_depths, passkey_trials=c.eval.passkey_trials,
                        trained_length=c.stage1_length)
        if not spec.lengths and not spec.passkey_lengths:
            return {"perplexity": []}
        result = evaluate(self.final_model(), spec, self.workdir / "eval", progress=True)
        return {"perplexity": [r["ppl_window_mean"] for r in result["perplexity"]]}

    def export(self):
        from longrope_jax.io.artifacts import tokenizer_dir
        from longrope_jax.io.hf import save_hf

        config, params = self.final_model()
        tok_dir = tokenizer_dir(self.c.model)
        save_hf(config, params, self.workdir / "hf", tokenizer_source=tok_dir, overwrite=True)
        return {"hf_dir": str(self.workdir / "hf")}


def _load_config_file(path: str) -> ml_collections.ConfigDict:
    import importlib.util

    file = Path(path)
    config_lib.check_config_file(file, "config.finetune.config")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception as e:  # noqa: BLE001 (whatever the file does wrong: name it)
        raise ValueError(f"config.finetune.config {file}: get_config() failed ({type(e).__name__}: "
                         f"{first_line(e)})") from None


def extend(config, workdir) -> dict:
    from longrope_jax.stages import Stages

    c = resolve(config)
    workdir = Path(workdir)
    pipeline = Pipeline(c, workdir)  # checks the model and the fine-tune config before anything is written
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(workdir / "extend_config.json", json.dumps(c.to_dict(), indent=1, default=str))
    return Stages(workdir).run(pipeline.stages())


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("extend", help="progressive LongRoPE extension: search, fine-tune, search, short "
                                             "factors, evaluate, export (resumable)", add_help=False,
                              description="longrope-jax extend --config FILE --workdir DIR [--config.a.b=value ...]")
    p.add_argument("argv", nargs="*")
    p.set_defaults(func=_extend_cli, passthrough=True)


def _extend_cli(args) -> int:
    from longrope_jax.train.trainer import parse_train_args

    argv = list(args.argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    config, workdir = parse_train_args(argv, command="extend")
    extend(config, workdir)
    print(f"longrope-jax extend: done; HF model in {Path(workdir) / 'hf'}")
    return 0
