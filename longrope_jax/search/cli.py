"""LongRoPE's evolutionary search of per-frequency rescale factors λ (and optionally n̂).

    longrope-jax search --model hf:DIR --target-length 32768 --out runs/search      # long factors
    longrope-jax search --model hf:DIR --target-length 32768 --out runs/search --short  # then short ones

Algorithm 1 of the paper, seeded with PI, NTK and YaRN (computed by rope.py). Pieces:
  search.py     SearchConfig, `search()` (checkpoint + data -> result), the CLI
  genome.py     the search space (integer grid indices), mutation, crossover, seeds, factor files
  fitness.py    perplexity on fixed windows, one compile for the whole search
  evolution.py  the loop, its resumable state and the output files

`OUT/long/` (or `OUT/short/`) holds `state.json`, `result.json` and `factors.csv`;
`OUT/rope_scaling.json` combines both searches into the HF `rope_scaling` dict (a missing side is all
1.0). Re-running the same command continues from `state.json` and ends with exactly the result of an
uninterrupted run. The random draws come from one numpy Generator seeded by `seed`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from longrope_jax.io.artifacts import default_tokenizer, load_model, read_factors
from longrope_jax.search import space as genome
from longrope_jax.search.evolution import RESULT_FILE, ROPE_SCALING_FILE, run_search
from longrope_jax.search.space import LongRoPE2Space, SearchSpace, critical_pair
from longrope_jax.sharding.mesh import make_mesh, parse_mesh_flag

SHORT_MAX_FACTOR = 2.0  # default upper bound of λ when searching short factors
OBJECTIVES = ("ppl", "needle")  # plain document perplexity; LongRoPE2's needle-driven perplexity
SPACES = ("longrope", "longrope2")
# λ <= bound_scale x s by default: the paper's 1.25 for LongRoPE; LongRoPE2's released LLaMA3-8B factors
# reach 26.05 = 1.63 s, so its space defaults to 2 s.
DEFAULT_BOUND_SCALE = {"longrope": 1.25, "longrope2": 2.0}


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Everything that defines a search. Defaults are the paper's (≤256k: P=64, N1=N2=16, T=40, k=32).

    `target_length` is the extended context (it sets s = target/original, the λ bound and the attention
    scale). A long search evaluates windows of `target_length`; a `short` search evaluates windows of
    `eval_length` (default `original_length`) with λ in [1, `max_factor` (default 2.0)]. In a long
    search `max_factor` defaults to `bound_scale * s` (the paper's 1.25 s; the released code uses 1 + s).

    `objective` "needle" scores only the answer tokens of needles placed in the windows (LongRoPE2,
    search/needle.py; `needles` per window), "ppl" every token. `search_space` "longrope2" searches
    λ >= s from a critical pair up (in `critical_pair` +- `critical_window`; `search()` sets
    `critical_pair` from the model) with λ_r^(i/r) below it; its `bound_scale` defaults to 2.
    """

    target_length: int
    original_length: int
    short: bool = False
    eval_length: int | None = None
    population: int = 64
    mutations: int = 16
    crossovers: int = 16
    iterations: int = 40
    parents: int = 32
    mutation_prob: float = 0.3
    crossover_tries: int = 20
    bound_scale: float | None = None  # None: DEFAULT_BOUND_SCALE of the space
    max_factor: float | None = None
    step: float = 0.01
    search_start_tokens: bool = False
    start_tokens: int = 0  # n̂ used when it is not searched
    docs: int = 5
    seed: int = 0
    candidates_per_call: int = 4
    objective: str = "ppl"
    search_space: str = "longrope"
    critical_pair: int | None = None
    critical_window: int = 4
    needles: int = 4

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"search objective {self.objective!r}: expected one of {OBJECTIVES}")
        if self.search_space not in SPACES:
            raise ValueError(f"search search_space {self.search_space!r}: expected one of {SPACES}")
        if self.bound_scale is None:
            object.__setattr__(self, "bound_scale", DEFAULT_BOUND_SCALE[self.search_space])
        for name, low in (("critical_window", 0), ("needles", 1)) + ((("critical_pair", 1),)
                                                                   if self.critical_pair is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"search {name}: expected an integer >= {low}, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.search_space == "longrope2" and (self.short or self.search_start_tokens):
            raise ValueError("search search_space 'longrope2': searches long factors only (no --short, no n̂; "
                             "LongRoPE2's short factors are all 1.0)")
        for name, low in (("target_length", 2), ("original_length", 1), ("population", 1), ("mutations", 0),
                          ("crossovers", 0), ("iterations", 0), ("parents", 1), ("crossover_tries", 1),
                          ("start_tokens", 0), ("docs", 1), ("seed", 0), ("candidates_per_call", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"search {name}: expected an integer >= {low}, got {v!r}")
            object.__setattr__(self, name, int(v))  # plain ints: the config is saved as JSON
        for name in ("mutation_prob", "bound_scale", "step", "max_factor"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                    raise ValueError(f"search {name}: expected a number, got {v!r}")
                object.__setattr__(self, name, float(v))
        if self.target_length <= self.original_length:
            raise ValueError(f"search target_length {self.target_length}: expected more than the original length "
                             f"{self.original_length} (nothing to extend)")
        if self.parents > self.population:
            raise ValueError(f"search parents {self.parents}: expected at most the population ({self.population})")
        if not 0 < self.mutation_prob <= 1:
            raise ValueError(f"search mutation_prob: expected a number in (0, 1], got {self.mutation_prob!r}")
        if not self.step > 0:
            raise ValueError(f"search step: expected a positive number, got {self.step!r}")
        if not self.bound_scale > 0:
            raise ValueError(f"search bound_scale: expected a positive number, got {self.bound_scale!r}")
        if self.upper < 1.0:
            raise ValueError(f"search max_factor: the λ bound is {self.upper}; expected a bound >= 1.0")
        if self.short and self.search_start_tokens:
            raise ValueError("search search_start_tokens: n̂ is searched with the long factors, not in a --short search")
        if self.eval_length is not None:
            v = self.eval_length
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"search eval_length: expected an integer >= 2, got {v!r}")
            if not self.short and v <= self.original_length:
                raise ValueError(f"search eval_length {v}: a long search needs windows longer than the original "
                                 f"length {self.original_length}")
            if v > self.target_length:
                raise ValueError(f"search eval_length {v}: expected at most target_length {self.target_length}")

    @property
    def mode(self) -> str:
        return "short" if self.short else "long"

    @property
    def scale(self) -> float:
        return self.target_length / self.original_length

    @property
    def upper(self) -> float:
        if self.max_factor is not None:
            return float(self.max_factor)
        return SHORT_MAX_FACTOR if self.short else self.bound_scale * self.scale

    @property
    def window(self) -> int:
        if self.eval_length is not None:
            return self.eval_length
        return self.original_length if self.short else self.target_length

    @property
    def seed_scale(self) -> float:
        """Scale of the PI/NTK/YaRN seeds: s for long factors; the λ bound for short ones (plus all-ones)."""
        return min(self.upper, self.scale) if self.short else self.scale

    def space(self, d_half: int) -> SearchSpace | LongRoPE2Space:
        if self.search_space == "longrope2":
            if self.critical_pair is None:
                raise ValueError("search critical_pair: the longrope2 space needs the theoretical critical pair "
                                 "(search() computes it from the model's head_dim, rope_theta and original length)")
            lowest = math.ceil(self.scale / self.step - 1e-9) * self.step  # s, up to the grid
            return LongRoPE2Space(d_half=d_half, max_factor=max(self.upper, lowest), min_factor=round(lowest, 10),
                                  critical=self.critical_pair, window=self.critical_window, step=self.step)
        return SearchSpace(d_half=d_half, max_factor=self.upper, step=self.step,
                           search_start_tokens=self.search_start_tokens)


# ---- from a checkpoint ----------------------------------------------------------------------------


def with_attention(config, attention: str | None, chunk: int | None):
    """`config` with its attention kernel and chunk replaced where given (LlamaConfig validates them)."""
    changes = {k: v for k, v in (("attention", attention), ("attention_chunk", chunk)) if v is not None}
    return dataclasses.replace(config, **changes) if changes else config


def search(model: str, out_dir, *, target_length: int, original_length: int | None = None, data: str = "kjv",
           split: str = "validation", data_dir=None, tokenizer: str | None = None, init_factors=None, max_iterations_this_run=None,
           attention: str | None = None, attention_chunk: int | None = None, mesh_shape=None, progress: bool = True,
           **settings) -> dict:
    """Load `model` (`hf:DIR`/`jax:DIR`), build the evaluation windows from `data`'s `split` and
    run (or resume) the search; `settings` are SearchConfig fields. `original_length` defaults to the
    model's max_position_embeddings. A short search takes n̂ from `out_dir/long/result.json` when there
    is one (n̂ is shared by both factor sets), unless `start_tokens` is given. `init_factors` (a factors
    file, see `io.artifacts.read_factors`) adds a seed. `attention`/`attention_chunk` override the model's kernel
    (blockwise keeps long windows' memory at O(L x chunk) and is faster than dense on CPU). `mesh_shape`
    (data, fsdp, seq, tensor) splits every window over a device mesh and attends with the ring."""
    from longrope_jax.data.sources import open_source
    from longrope_jax.data.tokenizer import build_tokenizer, check_fits
    from longrope_jax.search.fitness import PerplexityEvaluator, eval_windows
    from longrope_jax.search.needle import needle_windows

    model_cfg, params = load_model(model, "--model")
    model_cfg = with_attention(model_cfg, attention, attention_chunk)
    original = model_cfg.max_position_embeddings if original_length is None else original_length
    long_result = Path(out_dir) / "long" / RESULT_FILE
    if settings.get("short") and "start_tokens" not in settings and long_result.exists():
        settings["start_tokens"] = json.loads(long_result.read_text())["start_tokens"]
    d_half = model_cfg.rope_scaling.rotary_dim(model_cfg.head_dim) // 2
    if settings.get("search_space") == "longrope2" and settings.get("critical_pair") is None:
        settings["critical_pair"] = critical_pair(2 * d_half, model_cfg.rope_theta, original)
    config = SearchConfig(target_length=target_length, original_length=original, **settings)
    extra = {} if init_factors is None else {"init": read_factors(init_factors, d_half)}
    tokenizer = tokenizer or default_tokenizer(model)
    tok = build_tokenizer(tokenizer)
    check_fits(tok, model_cfg.vocab_size, tokenizer, f"--model {model}")
    documents = open_source(data, split, data_dir=data_dir)
    score_mask = None
    if config.objective == "needle":
        windows, score_mask = needle_windows(documents, tok, config.window, config.docs, needles=config.needles,
                                             seed=config.seed)
    else:
        windows = eval_windows(documents, tok, config.window, config.docs)
    evaluator = PerplexityEvaluator(model_cfg, params, windows, original_length=original, target_length=target_length,
                                    candidates_per_call=config.candidates_per_call,
                                    search_start_tokens=config.search_start_tokens, start_tokens=config.start_tokens,
                                    mesh=None if mesh_shape is None else make_mesh(*mesh_shape),
                                    score_mask_NxL=score_mask)
    context = {"model": str(model), "data": data, "split": split, "tokenizer": tokenizer,
               "init_factors": None if init_factors is None else str(init_factors)}
    return run_search(config, evaluator, out_dir, seeds={**seeds_for(config, model_cfg), **extra}, context=context,
                      max_iterations_this_run=max_iterations_this_run, progress=progress)


def seeds_for(config: SearchConfig, model_cfg) -> dict:
    """PI, NTK and YaRN factors (betas 32/1) at `config.seed_scale`, from rope.py; a short search adds
    all-ones (the original RoPE) first."""
    d_half = model_cfg.rope_scaling.rotary_dim(model_cfg.head_dim) // 2
    seeds = {"ones": np.ones(d_half)} if config.short else {}
    for kind in genome.SEED_KINDS:
        seeds[kind] = genome.seed_factors(
            kind, scale=config.seed_scale, head_dim=model_cfg.head_dim, theta=model_cfg.rope_theta,
            original_length=config.original_length, partial_rotary_factor=model_cfg.rope_scaling.partial_rotary_factor)
    return seeds


# ---- CLI ------------------------------------------------------------------------------------------


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("search", help="LongRoPE evolutionary search of rescale factors (resumable)")
    p.add_argument("--model", required=True, help="hf:DIR or jax:DIR")
    p.add_argument("--target-length", type=int, required=True, help="extended context length")
    p.add_argument("--original-length", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    p.add_argument("--data", default="kjv", help="corpus spec (default kjv)")
    p.add_argument("--split", default="validation", choices=("train", "validation"),
                   help="split the evaluation documents come from (default validation)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tokenizer", default=None, help="byte | hf:DIR | sentencepiece:FILE (default: the model "
                                                        "directory's tokenizer.json, else byte)")
    p.add_argument("--docs", type=int, default=5, help="evaluation documents (one window each)")
    p.add_argument("--short", action="store_true", help="search short factors (windows of --eval-length)")
    p.add_argument("--eval-length", type=int, default=None, help="window length (default: target, or original with --short)")
    p.add_argument("--population", type=int, default=64)
    p.add_argument("--mutations", type=int, default=16)
    p.add_argument("--crossovers", type=int, default=16)
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--parents", type=int, default=32)
    p.add_argument("--mutation-prob", type=float, default=0.3)
    p.add_argument("--bound-scale", type=float, default=None,
                   help="λ <= bound-scale x s (long search; default 1.25, 2 with --space longrope2)")
    p.add_argument("--objective", default="ppl", choices=("ppl", "needle"),
                   help="ppl: every token of the windows; needle: only the answers of needles placed in them "
                        "(LongRoPE2's needle-driven perplexity)")
    p.add_argument("--needles", type=int, default=4, help="needles per window with --objective needle")
    p.add_argument("--space", default="longrope", choices=("longrope", "longrope2"),
                   help="longrope2: λ >= s searched from a critical pair up, λ_r^(i/r) below it")
    p.add_argument("--critical-pair", type=int, default=None,
                   help="centre of the critical-pair window (default: the theoretical one of the model)")
    p.add_argument("--critical-window", type=int, default=4, help="critical pairs searched: centre +- this")
    p.add_argument("--max-factor", type=float, default=None, help="explicit λ bound (default 1.25 s; 2.0 with --short)")
    p.add_argument("--search-start-tokens", action="store_true", help="also search n̂")
    p.add_argument("--start-tokens", type=int, default=None, help="fixed n̂ when not searched")
    p.add_argument("--init-factors", default=None, help="a factors CSV/JSON added as a seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidates-per-call", type=int, default=4)
    p.add_argument("--attention", default=None, choices=("dense", "blockwise"),
                   help="attention kernel for the evaluation windows (default: the model's)")
    p.add_argument("--attention-chunk", type=int, default=None, help="blockwise chunk (default: the model's)")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,SEQ,TENSOR",
                   help="split each window over a device mesh (ring attention), e.g. 1,1,8,1")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_search_cli)


def _search_cli(args) -> int:
    settings = {k: getattr(args, k) for k in ("docs", "short", "eval_length", "population", "mutations", "crossovers",
                                               "iterations", "parents", "mutation_prob", "bound_scale", "max_factor",
                                               "search_start_tokens", "seed", "candidates_per_call", "objective",
                                               "needles", "critical_pair", "critical_window")}
    settings["search_space"] = args.space
    if args.start_tokens is not None:
        settings["start_tokens"] = args.start_tokens
    result = search(args.model, args.out, target_length=args.target_length, original_length=args.original_length,
                    data=args.data, split=args.split, data_dir=args.data_dir, tokenizer=args.tokenizer, init_factors=args.init_factors,
                    attention=args.attention, attention_chunk=args.attention_chunk,
                    mesh_shape=parse_mesh_flag(args.mesh), progress=not args.no_progress, **settings)
    seeds = ", ".join(f"{k} {v:.4g}" for k, v in result["seeds"].items() if v is not None)
    print(f"{result['mode']} factors: perplexity {result['perplexity']:.4g} (seeds: {seeds}), n̂ {result['start_tokens']}, "
          f"{result['evaluated']} candidates; wrote {Path(args.out) / ROPE_SCALING_FILE}")
    return 0
