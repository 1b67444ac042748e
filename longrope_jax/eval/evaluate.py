"""Evaluation of RoPE settings, swept over lengths: sliding-window perplexity and passkey retrieval.

    longrope-jax eval --model jax:DIR --workdir runs/eval --lengths 256,512,1024 --stride 128 \
        --method pi=linear:4 --method yarn=yarn:4 --method ours=longrope:runs/search/rope_scaling.json \
        --passkey-lengths 512,1024 --ruler niah_single_1,vt --ruler-lengths 4096,8192 --ruler-samples 20

Pieces: `methods` (specs -> RopeScaling), `perplexity` (the PI/YaRN sliding-window protocol),
`passkey` (retrieval grid), `ruler_tasks` and `ruler` (RULER's synthetic tasks), `report` (eval.json, plots, summary.md); this module runs them for a
checkpoint and holds the CLI.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from longrope_jax.data import passkey
from longrope_jax.data.sources import open_source
from longrope_jax.data.tokenizer import build_tokenizer, check_fits
from longrope_jax.eval.methods import hf_methods, parse_methods
from longrope_jax.eval.passkey import depth_grid, evaluate_passkey
from longrope_jax.eval.perplexity import ATTENTIONS, check_int, evaluate_perplexity, select_documents
from longrope_jax.eval.report import markdown_tables, write_results
from longrope_jax.eval.ruler import evaluate_ruler, ruler_samples
from longrope_jax.eval.ruler_tasks import TASKS as RULER_TASKS
from longrope_jax.eval.ruler_tasks import essay_words, needs_essay, task_kind
from longrope_jax.io.artifacts import default_tokenizer, load_model
from longrope_jax.rope import RopeScaling
from longrope_jax.sharding.mesh import make_mesh


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """What `evaluate` measures and on what. Empty `lengths` skips perplexity; empty `passkey_lengths`
    skips passkey retrieval.

    `methods`: `NAME=SPEC` strings (see `methods.parse_method`) or {name: RopeScaling | None (the
    model's own)}; None is the model's own RoPE, named `model`. `passkey_methods` defaults to `methods`.
    Documents: the first `docs` (None: all) of `data`'s `split` with at least `min_tokens` (default: the
    longest length) tokens, each cut to `max_tokens`. `tokenizer` defaults to the model directory's.
    `mesh_shape` (data, fsdp, seq, tensor) runs perplexity and passkey under a mesh (passkey prompts and
    their KV caches split over the devices the batch leaves free). `trained_length` marks the
    plot (default: the model's max_position_embeddings).

    RULER: `ruler_tasks` (names of `ruler_tasks.TASKS`, or "all") at `ruler_lengths`, `ruler_samples`
    prompts per task and length, at most `ruler_batch` prompts per generate call, for
    `passkey_methods`' methods; the essay haystack is KJV's train split (in `data_dir`).
    """

    lengths: tuple[int, ...] = ()
    methods: Any = None
    original_length: int | None = None
    data: str = "kjv"
    split: str = "validation"
    data_dir: str | None = None
    tokenizer: str | None = None
    docs: int | None = 5
    min_tokens: int | None = None
    max_tokens: int | None = None
    stride: int | None = None
    truncate: bool = False
    batch_size: int | None = None
    attention: str = "dense"
    attention_chunk: int | None = None
    mesh_shape: tuple[int, ...] | None = None
    passkey_lengths: tuple[int, ...] = ()
    passkey_depths: Any = 5
    passkey_trials: int = 10
    passkey_methods: Any = None
    seed: int = 0
    trained_length: int | None = None
    ruler_tasks: tuple[str, ...] = ()
    ruler_lengths: tuple[int, ...] = ()
    ruler_samples: int = 20
    ruler_batch: int = 8


def _resolve_methods(methods, config, original_length) -> tuple[dict, dict]:
    """({name: RopeScaling}, {name: spec text}) from spec strings or a {name: RopeScaling | None} dict."""
    if isinstance(methods, dict):
        scalings = {k: config.rope_scaling if v is None else v for k, v in methods.items()}
        for name, s in scalings.items():
            if not isinstance(s, RopeScaling):
                raise ValueError(f"method {name!r}: expected a RopeScaling or None, got {type(s).__name__}")
        return scalings, {k: "none" if v is None else v.rope_type for k, v in methods.items()}
    return parse_methods(methods, config, original_length)


def evaluate(model, spec: EvalSpec, workdir=None, *, progress: bool = False) -> dict:
    """Perplexity and passkey retrieval of `model` (`hf:DIR`/`jax:DIR`, or a (LlamaConfig, params) pair)
    as `spec` asks; with `workdir`, eval.json, summary.md and plots are written after each part, so a
    failure in the next one keeps what is done. Returns {"perplexity": rows, "passkey": rows, "paths"}.
    With `ruler_tasks`, "ruler" rows too. The eval CLI, `extend` and the demo all evaluate through here."""
    lengths, passkey_lengths = list(spec.lengths or ()), list(spec.passkey_lengths or ())
    tasks, ruler_lengths = ruler_task_list(spec.ruler_tasks), list(spec.ruler_lengths or ())
    if not lengths and not passkey_lengths and not tasks:
        raise ValueError("eval: nothing to do; give perplexity --lengths, --passkey-lengths and/or --ruler")
    if tasks and not ruler_lengths:
        raise ValueError("--ruler-lengths: empty; expected the RULER prompt lengths in tokens (e.g. 4096,8192)")
    if ruler_lengths and not tasks:
        raise ValueError("--ruler: empty; expected RULER task names with --ruler-lengths (e.g. niah_single_1,vt)")
    for n in ruler_lengths:
        check_int("--ruler-lengths", n, 1)
    if tasks:
        check_int("--ruler-samples", spec.ruler_samples, 1)
        check_int("--ruler-batch", spec.ruler_batch, 1)
    for n in lengths:
        check_int("perplexity length", n, 2)
    if spec.original_length is not None:
        check_int("original_length", spec.original_length, 1)
    if isinstance(model, tuple):
        (config, params), model_name = model, "in memory"
        tokenizer = spec.tokenizer or "byte"
    else:
        config, params = load_model(model, "--model")
        model_name, tokenizer = str(model), spec.tokenizer or default_tokenizer(model)
    tok = build_tokenizer(tokenizer)
    check_fits(tok, config.vocab_size, tokenizer, f"--model {model_name}")
    scalings, specs = _resolve_methods(spec.methods, config, spec.original_length)
    passkey_scalings = scalings if spec.passkey_methods is None else _resolve_methods(
        spec.passkey_methods, config, spec.original_length)[0]
    for n in passkey_lengths:  # fail on a too-short passkey length before anything runs
        check_int("passkey length", n, 2)
        passkey.build_prompt(tok, n, 0.5, passkey.KEY_RANGE[1])
    ruler_cells = None
    if tasks:  # every RULER prompt is built before anything runs: a too-short length fails here
        essay = essay_words(open_source("kjv", "train", data_dir=spec.data_dir)) if needs_essay(tasks) else None
        ruler_cells = ruler_samples(tok, tasks=tasks, lengths=ruler_lengths, samples=spec.ruler_samples,
                                    seed=spec.seed, essay=essay)
    mesh = None if spec.mesh_shape is None else make_mesh(*spec.mesh_shape)
    min_tokens = spec.min_tokens or (max(lengths) if lengths else None)
    settings = {**dataclasses.asdict(spec), "model": model_name, "tokenizer": tokenizer, "methods": None,
                "passkey_methods": None, "method_specs": specs, "min_tokens": min_tokens,
                "mesh": None if mesh is None else dict(mesh.shape), "passkey_depths": depth_grid(spec.passkey_depths)}
    if tasks:
        settings["ruler_tasks"] = tasks
    out = {"perplexity": [], "passkey": [], "ruler": [], "paths": {}}

    def save():
        if workdir is None:
            return {}
        return write_results(workdir, config=config, methods=hf_methods({**passkey_scalings, **scalings}, config),
                             settings=settings, perplexity_rows=out["perplexity"], passkey_rows=out["passkey"],
                             ruler_rows=out["ruler"], trained_length=spec.trained_length or config.max_position_embeddings)

    if lengths:
        documents = select_documents(open_source(spec.data, spec.split, data_dir=spec.data_dir), tok, docs=spec.docs,
                                     min_tokens=min_tokens, max_tokens=spec.max_tokens)
        check_lengths_fit(lengths, documents, spec)
        out["perplexity"] = evaluate_perplexity(
            config, params, documents, lengths=lengths, methods=scalings, stride=spec.stride, truncate=spec.truncate,
            bos_id=tok.bos_id, batch_size=spec.batch_size, attention=spec.attention,
            attention_chunk=spec.attention_chunk, mesh=mesh, progress=progress)
        out["paths"] = save()
    if passkey_lengths:
        out["passkey"] = evaluate_passkey(config, params, tok, lengths=passkey_lengths, depths=spec.passkey_depths,
                                          trials=spec.passkey_trials, methods=passkey_scalings, seed=spec.seed,
                                          mesh=mesh, progress=progress)
        out["paths"] = save()
    if tasks:
        out["ruler"] = evaluate_ruler(config, params, tok, tasks=tasks, lengths=ruler_lengths, methods=passkey_scalings,
                                      batch_size=spec.ruler_batch, mesh=mesh, progress=progress, cells=ruler_cells)
        out["paths"] = save()
    return out


def ruler_task_list(tasks) -> list:
    """RULER task names from a comma-separated string or a sequence ("all": every task), each checked."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks or ())
    if tasks == ["all"]:
        return list(RULER_TASKS)
    for t in tasks:
        task_kind(t)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"--ruler {','.join(tasks)}: a task is named twice; expected each task once")
    return tasks


def check_lengths_fit(lengths, documents, spec: EvalSpec) -> None:
    """A window of length L holds BOS and L - 1 tokens: a length no selected document fills would score
    shorter windows under L's column. A ValueError names the longest document."""
    sizes = [len(d) for d in documents]
    i = max(range(len(sizes)), key=sizes.__getitem__)
    for n in sorted(lengths, reverse=True):
        if n - 1 > sizes[i]:
            cut = f", cut to --max-tokens {spec.max_tokens}" if spec.max_tokens == sizes[i] else ""
            raise ValueError(
                f"perplexity length {n}: longer than every selected document: the longest, document {i} of the "
                f"{len(sizes)} selected from {spec.data} ({spec.split}), has {sizes[i]} tokens{cut}; expected lengths "
                f"<= {sizes[i] + 1} (tokens + BOS), or longer documents (--min-tokens, --max-tokens, --data)")


# ---- CLI ------------------------------------------------------------------------------------------


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity and passkey retrieval across RoPE methods and lengths")
    p.add_argument("--model", required=True, help="hf:DIR or jax:DIR")
    p.add_argument("--workdir", required=True, help="output directory (eval.json, summary.md, *.png)")
    p.add_argument("--data", default="kjv", help="corpus spec (default kjv)")
    p.add_argument("--split", default="validation")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tokenizer", default=None, help="byte | hf:DIR | sentencepiece:FILE (default: the model "
                                                        "directory's tokenizer.json, else byte)")
    p.add_argument("--lengths", default="", help="perplexity window lengths, comma-separated (e.g. 256,512,1024)")
    p.add_argument("--method", action="append", default=None, metavar="NAME=SPEC",
                   help="repeatable; SPEC: none (the model's own RoPE), default, linear:F, ntk:F, dynamic:F, yarn:F, "
                        "llama3:F, longrope:FILE.json (default: model=none)")
    p.add_argument("--original-length", type=int, default=None,
                   help="original context of yarn/llama3/longrope (default: the model's max_position_embeddings)")
    window = p.add_mutually_exclusive_group()
    window.add_argument("--stride", type=int, default=None, help="sliding-window stride (default L - 1: disjoint)")
    window.add_argument("--truncate", action="store_true", help="one window per document (its first L - 1 tokens)")
    p.add_argument("--docs", type=int, default=5, help="documents for perplexity")
    p.add_argument("--min-tokens", type=int, default=None, help="document filter (default: the longest length)")
    p.add_argument("--max-tokens", type=int, default=None, help="cut each document to its first N tokens")
    p.add_argument("--batch-size", type=int, default=None, help="windows per call (default 4, rounded up to the "
                                                                   "mesh's data-parallel size)")
    p.add_argument("--passkey-lengths", default="", help="passkey prompt lengths in tokens, comma-separated")
    p.add_argument("--passkey-depths", type=int, default=5, help="key depths: linspace(0, 1, N)")
    p.add_argument("--passkey-trials", type=int, default=10, help="trials per length x depth cell")
    p.add_argument("--attention", default="dense", choices=ATTENTIONS, help="perplexity kernel")
    p.add_argument("--attention-chunk", type=int, default=None, help="blockwise/ring chunk (default: the model's)")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,SEQ,TENSOR", help="device mesh for perplexity "
                   "and passkey, e.g. 1,1,8,1 (one size may be -1)")
    p.add_argument("--ruler", default="", metavar="TASKS", help="RULER synthetic tasks, comma-separated, or all: "
                   + ", ".join(RULER_TASKS) + " (qa_1/qa_2 are not offered)")
    p.add_argument("--ruler-lengths", default="", help="RULER prompt lengths in tokens, answer included, "
                                                       "comma-separated (e.g. 4096,8192)")
    p.add_argument("--ruler-samples", type=int, default=20, help="RULER prompts per task and length (RULER: 500)")
    p.add_argument("--ruler-batch", type=int, default=8, help="RULER prompts per generate call (equal lengths)")
    p.add_argument("--seed", type=int, default=0, help="passkey keys and RULER samples")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_eval_cli)


def _int_list(text: str, flag: str) -> list:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers (e.g. 256,512,1024)") from None


def _mesh_shape(text: str | None):
    if text is None:
        return None
    sizes = _int_list(text, "--mesh")
    if len(sizes) != 4:
        raise ValueError(f"--mesh {text!r}: expected four sizes data,fsdp,seq,tensor (one may be -1)")
    return tuple(sizes)


def _eval_cli(args) -> int:
    spec = EvalSpec(
        lengths=tuple(_int_list(args.lengths, "--lengths")), methods=args.method, original_length=args.original_length,
        data=args.data, split=args.split, data_dir=args.data_dir, tokenizer=args.tokenizer, stride=args.stride,
        truncate=args.truncate, docs=args.docs, min_tokens=args.min_tokens, max_tokens=args.max_tokens,
        batch_size=args.batch_size, passkey_lengths=tuple(_int_list(args.passkey_lengths, "--passkey-lengths")),
        passkey_depths=args.passkey_depths, passkey_trials=args.passkey_trials, attention=args.attention,
        attention_chunk=args.attention_chunk, mesh_shape=_mesh_shape(args.mesh), seed=args.seed,
        ruler_tasks=tuple(ruler_task_list(args.ruler)),
        ruler_lengths=tuple(_int_list(args.ruler_lengths, "--ruler-lengths")), ruler_samples=args.ruler_samples,
        ruler_batch=args.ruler_batch)
    result = evaluate(args.model, spec, args.workdir, progress=not args.no_progress)
    print(markdown_tables(result["perplexity"], result["passkey"], result["ruler"]), end="")
    print("wrote " + ", ".join(str(p) for p in result["paths"].values()))
    return 0
