"""Evaluation of RoPE settings, swept over lengths: sliding-window perplexity and passkey retrieval.

    longrope-jax eval --model jax:DIR --workdir runs/eval --lengths 256,512,1024 --stride 128 \
        --method pi=linear:4 --method yarn=yarn:4 --method ours=longrope:runs/search/rope_scaling.json \
        --passkey-lengths 512,1024

Pieces:
  evaluate.py    method specs, passkey retrieval, `run_eval()` (checkpoint + data -> workdir), the CLI
  perplexity.py  the PI/YaRN sliding-window protocol, batched and padded (one compile per method x length)
  report.py      eval.json, perplexity.png, passkey.png, summary.md

Passkey retrieval uses the landmark-attention template (`passkey.py`, token-exact lengths) on a
length x depth grid: the trials of a cell go through one greedy `generate` call of 10 tokens, and a
hit is a completion whose first integer equals the key. Keys come from a numpy Generator seeded by
(seed, length, depth), so every method sees the same keys.
"""

from __future__ import annotations


import numpy as np
from tqdm import tqdm

from longrope_jax import passkey
from longrope_jax.fsutil import read_json_object
from longrope_jax.model import LlamaConfig
from longrope_jax.perplexity import ATTENTIONS, check_int, evaluate_perplexity, select_documents
from longrope_jax.report import markdown_tables, plot_passkey, plot_perplexity, write_results  # noqa: F401
from longrope_jax.rope import RopeScaling

METHOD_KINDS = ("none", "default", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
LLAMA3_BANDS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}  # Llama 3.1's published values
PASSKEY_NEW_TOKENS = 10  # as the landmark / YaRN / LongRoPE scripts


# ---- method specs ---------------------------------------------------------------------------------


def parse_method(spec: str, config: LlamaConfig, original_length: int | None = None) -> RopeScaling:
    """A RopeScaling from `none` (the model's own), `default`, `KIND:FACTOR` (linear, ntk, dynamic,
    yarn, llama3) or `longrope:FILE` (a rope_scaling JSON from `longrope-jax search`, or a HF
    config.json). yarn and llama3 scale from `original_length` (default: the model's
    max_position_embeddings); dynamic NTK, as in HF, from max_position_embeddings."""
    kind, sep, arg = str(spec).partition(":")
    original = config.max_position_embeddings if original_length is None else original_length
    if kind not in METHOD_KINDS:
        raise ValueError(f"method spec {spec!r}: unknown kind {kind!r}; expected none, default, linear:F, ntk:F, "
                         f"dynamic:F, yarn:F, llama3:F or longrope:FILE")
    if kind == "none":
        if sep:
            raise ValueError(f"method spec {spec!r}: 'none' takes no argument")
        return config.rope_scaling
    if kind == "default":
        if sep:
            raise ValueError(f"method spec {spec!r}: 'default' takes no argument")
        d = {"rope_type": "default"}
    elif kind == "longrope":
        if not arg:
            raise ValueError(f"method spec {spec!r}: expected longrope:FILE (a rope_scaling JSON)")
        d = read_rope_file(arg, original)
    else:
        try:
            factor = float(arg)
        except ValueError:
            raise ValueError(f"method spec {spec!r}: expected {kind}:FACTOR with a number, got {arg!r}") from None
        d = {"rope_type": kind, "factor": factor}
        if kind in ("yarn", "llama3"):
            d["original_max_position_embeddings"] = original
        if kind == "llama3":
            d.update(LLAMA3_BANDS)
    # The rotary dimension belongs to the model, whatever the method.
    if config.rope_scaling.partial_rotary_factor != 1.0:
        d.setdefault("partial_rotary_factor", config.rope_scaling.partial_rotary_factor)
    try:
        scaling = RopeScaling.from_hf(d)
        scaling.validate(config.head_dim)
    except ValueError as e:
        raise ValueError(f"method spec {spec!r}: {e}") from None
    return scaling


def read_rope_file(path, original_length: int) -> dict:
    """The LongRoPE rope_scaling dict of a JSON file: the dict itself (`OUT/rope_scaling.json`) or a HF
    config.json's `rope_parameters`/`rope_scaling` (a top-level original_max_position_embeddings wins,
    as in HF). A missing original length is `original_length`."""
    d = read_json_object(path, "longrope method", "a rope_scaling JSON object")
    if "rope_parameters" in d or "rope_scaling" in d:  # a HF config.json
        top = d
        d = dict(top.get("rope_parameters") or top.get("rope_scaling") or {})
        d.pop("rope_theta", None)  # the base is the model's
        if top.get("original_max_position_embeddings") is not None:
            d["original_max_position_embeddings"] = top["original_max_position_embeddings"]
    kind = d.get("rope_type", d.get("type"))
    if kind not in ("longrope", "su"):
        raise ValueError(f"longrope method: {path} has rope_type {kind!r}; expected a 'longrope' rope_scaling "
                         f"with short_factor and long_factor")
    d.setdefault("original_max_position_embeddings", original_length)
    return d


def parse_methods(specs, config: LlamaConfig, original_length: int | None = None) -> tuple[dict, dict]:
    """({name: RopeScaling}, {name: spec}) from `NAME=SPEC` or bare `SPEC` strings (named by the spec).
    No specs: the model's own RoPE, named `model`."""
    specs = list(specs or ["model=none"])
    methods, names = {}, {}
    for item in specs:
        name, sep, spec = str(item).partition("=")
        if not sep:
            name, spec = item, item
        if not name or not spec:
            raise ValueError(f"--method {item!r}: expected NAME=SPEC (e.g. yarn4=yarn:4) or SPEC")
        if name in methods:
            raise ValueError(f"--method {item!r}: the name {name!r} is used twice")
        methods[name], names[name] = parse_method(spec, config, original_length), spec
    return methods, names


def hf_methods(methods: dict, config: LlamaConfig) -> dict:
    """{name: HF rope_scaling dict or None}: what eval.json records."""
    return {name: s.to_hf(rope_theta=config.rope_theta, head_dim=config.head_dim) for name, s in methods.items()}


# ---- passkey --------------------------------------------------------------------------------------


def depth_grid(depths) -> list:
    """A count n gives linspace(0, 1, n) (n = 1: the middle); a sequence is taken as given."""
    if isinstance(depths, (int, np.integer)) and not isinstance(depths, bool):
        check_int("passkey depths", depths, 1)
        return [0.5] if depths == 1 else [float(x) for x in np.linspace(0.0, 1.0, int(depths))]
    return [float(x) for x in depths]


def passkey_cells(tokenizer, *, lengths, depths, trials: int, seed: int = 0) -> list:
    """[(length, depth, keys[T], prompts int32 [T, length])] for the grid; every prompt is built here, so a
    bad length fails before anything compiles."""
    check_int("passkey trials", trials, 1)
    cells = []
    for length in lengths:
        check_int("passkey length", length, 2)
        for depth in depth_grid(depths):
            # Seeded by the cell, not its place in the grid: the same keys whatever else is asked for.
            rng = np.random.default_rng([seed, length, round(depth * 1e6)])
            keys = passkey.draw_keys(rng, trials)
            prompts = np.asarray([passkey.build_prompt(tokenizer, length, depth, int(k)) for k in keys], np.int32)
            cells.append((length, depth, keys, prompts))
    return cells


def score_passkey(completions, keys) -> list:
    """Hits: the first integer of each completion equals its key (no digits is a miss)."""
    return [passkey.first_integer(c) == int(k) for c, k in zip(completions, keys, strict=True)]


def evaluate_passkey(config: LlamaConfig, params, tokenizer, *, lengths, depths=5, trials: int = 10, methods=None,
                     seed: int = 0, max_new_tokens: int = PASSKEY_NEW_TOKENS, samples: int = 3,
                     progress: bool = False, generate_fn=None) -> list:
    """Rows {method, length, depth, trials, correct, accuracy, samples} for every method x length x depth.

    The trials of a cell go through one greedy `generate` call; the completion is decoded up to EOS.
    `generate_fn` stands in for `generate.generate` (same signature).
    """
    if generate_fn is None:
        from longrope_jax.generate import generate as generate_fn
    methods = {"model": None} if methods is None else dict(methods)
    cells = passkey_cells(tokenizer, lengths=lengths, depths=depths, trials=trials, seed=seed)
    top = max(int(c[3].max()) for c in cells)
    if top >= config.vocab_size:
        raise ValueError(f"passkey prompts: token ids reach {top}; expected ids below the model's vocab_size "
                         f"{config.vocab_size} (wrong tokenizer?)")
    eos = tokenizer.eos_id
    rows = []
    with tqdm(total=len(methods) * len(cells), desc="passkey", disable=not progress) as bar:
        for name, scaling in methods.items():
            for length, depth, keys, prompts in cells:
                out = np.asarray(generate_fn(config, params, prompts, max_new_tokens, rope_scaling=scaling,
                                             temperature=0.0, eos_id=eos))
                completions = [tokenizer.decode(_until(row, eos)) for row in out]
                hits = score_passkey(completions, keys)
                shown = [{"key": int(k), "completion": c} for k, c in zip(keys[:samples], completions)]
                rows.append({"method": name, "length": int(length), "depth": float(depth), "trials": len(keys),
                             "correct": int(sum(hits)), "accuracy": float(np.mean(hits)), "samples": shown})
                bar.update(1)
    return rows


def _until(ids, eos_id) -> list:
    ids = [int(i) for i in ids]
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


# ---- from a checkpoint ----------------------------------------------------------------------------


def run_eval(model: str, workdir, *, lengths=(), methods=None, original_length: int | None = None,
             data: str = "kjv", split: str = "validation", data_dir=None, tokenizer: str | None = None,
             stride: int | None = None, truncate: bool = False, docs: int = 5, min_tokens: int | None = None,
             max_tokens: int | None = None, batch_size: int | None = None, passkey_lengths=(), passkey_depths=5,
             passkey_trials: int = 10, attention: str = "dense", attention_chunk: int | None = None,
             mesh_shape=None, seed: int = 0, progress: bool = True) -> dict:
    """Load `model` (`hf:DIR`/`jax:DIR`), evaluate perplexity on `data`'s `split` at `lengths` and passkey
    retrieval at `passkey_lengths`, for every method spec (`NAME=SPEC`, see `parse_method`), and write
    the results to `workdir`. Documents: the first `docs` with at least `min_tokens` (default: the
    longest length) tokens. `mesh_shape` (data, fsdp, seq, tensor) runs perplexity under a mesh.
    Returns {"perplexity": rows, "passkey": rows, "paths": {kind: path}}."""
    from longrope_jax import data as data_lib
    from longrope_jax import parallel
    from longrope_jax.search import default_tokenizer, load_model

    lengths, passkey_lengths = list(lengths or ()), list(passkey_lengths or ())
    if not lengths and not passkey_lengths:
        raise ValueError("eval: nothing to do; give perplexity --lengths and/or --passkey-lengths")
    for n in lengths:
        check_int("perplexity length", n, 2)
    if original_length is not None:
        check_int("original_length", original_length, 1)
    config, params = load_model(model)
    tokenizer = tokenizer or default_tokenizer(model)
    tok = data_lib.build_tokenizer(tokenizer)
    scalings, specs = parse_methods(methods, config, original_length)
    for n in passkey_lengths:  # fail on a too-short passkey length before anything runs
        check_int("passkey length", n, 2)
        passkey.build_prompt(tok, n, 0.5, passkey.KEY_RANGE[1])
    mesh = None if mesh_shape is None else parallel.make_mesh(*mesh_shape)
    settings = {"model": str(model), "data": data, "split": split, "tokenizer": tokenizer, "method_specs": specs,
                "original_length": original_length, "lengths": lengths, "stride": stride, "truncate": truncate,
                "docs": docs, "min_tokens": min_tokens or (max(lengths) if lengths else None),
                "max_tokens": max_tokens, "batch_size": batch_size, "attention": attention,
                "attention_chunk": attention_chunk, "mesh": None if mesh is None else dict(mesh.shape),
                "passkey_lengths": passkey_lengths, "passkey_depths": depth_grid(passkey_depths),
                "passkey_trials": passkey_trials, "seed": seed}
    out = {"perplexity": [], "passkey": []}

    def save():  # after each part, so a failure in the next one keeps what is done
        return write_results(workdir, config=config, methods=hf_methods(scalings, config), settings=settings,
                             perplexity_rows=out["perplexity"], passkey_rows=out["passkey"],
                             trained_length=config.max_position_embeddings)

    if lengths:
        documents = select_documents(data_lib.open_source(data, split, data_dir=data_dir), tok, docs=docs,
                                     min_tokens=settings["min_tokens"], max_tokens=max_tokens)
        out["perplexity"] = evaluate_perplexity(
            config, params, documents, lengths=lengths, methods=scalings, stride=stride, truncate=truncate,
            bos_id=tok.bos_id, batch_size=batch_size, attention=attention, attention_chunk=attention_chunk,
            mesh=mesh, progress=progress)
        out["paths"] = save()
    if passkey_lengths:
        out["passkey"] = evaluate_passkey(config, params, tok, lengths=passkey_lengths, depths=passkey_depths,
                                          trials=passkey_trials, methods=scalings, seed=seed, progress=progress)
        out["paths"] = save()
    return out


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
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,SEQ,TENSOR", help="device mesh for perplexity, "
                                                                                  "e.g. 1,1,8,1 (one size may be -1)")
    p.add_argument("--seed", type=int, default=0, help="passkey keys")
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
    result = run_eval(
        args.model, args.workdir, lengths=_int_list(args.lengths, "--lengths"), methods=args.method,
        original_length=args.original_length, data=args.data, split=args.split, data_dir=args.data_dir,
        tokenizer=args.tokenizer, stride=args.stride, truncate=args.truncate, docs=args.docs,
        min_tokens=args.min_tokens, max_tokens=args.max_tokens, batch_size=args.batch_size,
        passkey_lengths=_int_list(args.passkey_lengths, "--passkey-lengths"), passkey_depths=args.passkey_depths,
        passkey_trials=args.passkey_trials, attention=args.attention, attention_chunk=args.attention_chunk,
        mesh_shape=_mesh_shape(args.mesh), seed=args.seed, progress=not args.no_progress)
    print(markdown_tables(result["perplexity"], result["passkey"]), end="")
    print("wrote " + ", ".join(str(p) for p in result["paths"].values()))
    return 0
