"""The evolution loop of LongRoPE's search (paper, Algorithm 1), its resumable state and its outputs.

`run_search(config, evaluator, out_dir, seeds=...)` evaluates the initial population, then each
iteration keeps the top-k (`parents`), adds `mutations` mutants of random parents and `crossovers`
children of two, and evaluates the new ones. It works in `out_dir/<long|short>/`:
  state.json    everything needed to continue (population, scores, history, rng state, iteration,
                per-iteration best), rewritten atomically after every evaluated chunk of candidates
  result.json   best factors, n̂, perplexity, the seeds' perplexities, best perplexity per iteration
  factors.csv   the best factors, one per line (microsoft/LongRoPE's format)
and `out_dir/rope_scaling.json` (both searches combined, see `export_rope_scaling`).

Resuming restores the Generator's state from the start of the unfinished generation, so the same
children are drawn again; chunks of them already evaluated are taken from the saved `pending` scores.
Hence an interrupted and resumed search ends with exactly the uninterrupted search's result.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from longrope_jax.io.files import write_atomic
from longrope_jax.search import space as genome
from longrope_jax.search.space import SearchSpace

STATE_FILE, RESULT_FILE, CSV_FILE, ROPE_SCALING_FILE = "state.json", "result.json", "factors.csv", "rope_scaling.json"
STATE_VERSION = 1
# Settings that may change between a run and its resumption (they do not change which candidates are drawn).
_RESUMABLE_CHANGES = ("iterations", "candidates_per_call")


# ---- state --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _State:
    rng: np.random.Generator
    iteration: int = 0  # evolution iterations completed (the initial population is not one)
    population: list | None = None  # the last finished generation; None before the initial one
    scores: list | None = None
    history: dict = dataclasses.field(default_factory=dict)  # key -> perplexity, in evaluation order
    pending: dict = dataclasses.field(default_factory=dict)  # evaluated in the unfinished generation
    per_iteration: list = dataclasses.field(default_factory=list)
    # The Generator's state when the unfinished generation started: saved instead of the current one, so
    # a resumed run draws that generation's children again.
    rng_start: dict | None = None

    def __post_init__(self):
        if self.rng_start is None:
            self.rng_start = self.rng.bit_generator.state

    def to_json(self, config, d_half: int, context: dict) -> str:
        return json.dumps({
            "version": STATE_VERSION, "config": dataclasses.asdict(config), "context": context, "d_half": d_half,
            "iteration": self.iteration, "rng": self.rng_start,
            "population": None if self.population is None else [list(genome.key(c)) for c in self.population],
            "scores": self.scores, "history": [[list(k), v] for k, v in self.history.items()],
            "pending": [[list(k), v] for k, v in self.pending.items()], "per_iteration": self.per_iteration,
        })

    @classmethod
    def from_json(cls, path: Path, config, d_half: int, context: dict) -> _State:
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"search state {path}: not valid JSON ({e}); delete it to start over") from None
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"search state {path}: version {d.get('version')!r}; expected {STATE_VERSION}")
        # Settings added after a state was written take their defaults (e.g. objective, search_space).
        added = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
        saved = {**added, **d["config"], **{f"context.{k}": v for k, v in d.get("context", {}).items()}, "d_half": d["d_half"]}
        now = {**dataclasses.asdict(config), **{f"context.{k}": v for k, v in context.items()}, "d_half": d_half}
        for name in sorted(set(saved) | set(now)):
            if name not in _RESUMABLE_CHANGES and saved.get(name) != now.get(name):
                raise ValueError(f"search state {path}: was started with {name}={saved.get(name)!r}, now "
                                 f"{now.get(name)!r}; use the same settings to resume, or another output directory")
        rng = np.random.default_rng(0)  # the saved state replaces this seed
        rng.bit_generator.state = d["rng"]
        pop = d["population"]
        return cls(
            rng=rng, iteration=d["iteration"], scores=d["scores"], per_iteration=d["per_iteration"],
            population=None if pop is None else [np.asarray(c, np.int64) for c in pop],
            history={tuple(k): v for k, v in d["history"]}, pending={tuple(k): v for k, v in d["pending"]},
        )


# ---- the search -----------------------------------------------------------------------------------


def run_search(config, evaluator, out_dir, *, seeds: dict, context: dict | None = None,
               max_iterations_this_run: int | None = None, progress: bool = True) -> dict:
    """Run (or continue) the search in `out_dir/<mode>/`; returns the result dict (also in result.json).

    `evaluator(factors_CxD, start_tokens_C) -> perplexity[C]` with a `d_half` attribute (fitness.py's
    PerplexityEvaluator, or anything with that contract). `seeds` maps names to factor vectors (snapped
    onto the grid here). `context` (e.g. model and data names) must match on resume, like `config`.
    `max_iterations_this_run` stops after that many evolution iterations (the state stays resumable).
    """
    d_half, context = evaluator.d_half, dict(context or {})
    space = config.space(d_half)
    run_dir = Path(out_dir) / config.mode
    state_path = run_dir / STATE_FILE
    if state_path.exists():
        state = _State.from_json(state_path, config, d_half, context)
    else:
        state = _State(rng=np.random.default_rng(config.seed))
    seed_cands = {name: space.snap(f, 0) for name, f in seeds.items()}

    def save():
        write_atomic(state_path, state.to_json(config, d_half, context))

    bar = tqdm(total=config.iterations + 1, initial=state.iteration + (state.population is not None),
               desc=f"search {config.mode}", unit="gen", disable=not progress, dynamic_ncols=True)
    try:
        if state.population is None:
            cands = genome.initial_population(space, list(seed_cands.values()), config.population, state.rng,
                                              config.mutation_prob)
            _finish_generation(state, cands, _evaluate(state, cands, space, evaluator, config, save), 0)
            save()
            _write_results(config, space, state, seed_cands, run_dir)
            bar.update(1)
        bar.set_postfix(best=f"{min(state.history.values()):.4g}", evaluated=len(state.history))
        done_now = 0
        while state.iteration < config.iterations:
            if max_iterations_this_run is not None and done_now >= max_iterations_this_run:
                break
            order = np.argsort(np.asarray(state.scores, np.float64), kind="stable")
            parents = [state.population[i] for i in order[: config.parents]]
            children = _children(space, config, parents, state.rng, state.history)
            scores = _evaluate(state, children, space, evaluator, config, save)
            parent_scores = [state.scores[i] for i in order[: config.parents]]
            _finish_generation(state, parents + children, parent_scores + scores, state.iteration + 1,
                               new=len(children))
            state.iteration += 1
            done_now += 1
            save()
            _write_results(config, space, state, seed_cands, run_dir)
            bar.update(1)
            bar.set_postfix(best=f"{state.per_iteration[-1]['best_perplexity']:.4g}", evaluated=len(state.history))
    finally:
        bar.close()
    return _write_results(config, space, state, seed_cands, run_dir)


def _evaluate(state: _State, cands: list, space: SearchSpace, evaluator, config, save) -> list[float]:
    """Perplexities of `cands`, a fixed chunk of `candidates_per_call` at a time; chunks already in
    `state.pending` (evaluated before an interruption) are not evaluated again. Saves after each chunk."""
    c = config.candidates_per_call
    for i in range(0, len(cands), c):
        chunk = cands[i: i + c]
        if all(genome.key(x) in state.pending for x in chunk):
            continue
        ppl = evaluator(np.stack([space.factors(x) for x in chunk]),
                        np.asarray([space.start_tokens(x) for x in chunk], np.int32))
        for x, p in zip(chunk, ppl):
            state.pending[genome.key(x)] = float(p) if math.isfinite(p) else math.inf
        save()
    return [state.pending[genome.key(x)] for x in cands]


def _finish_generation(state: _State, population: list, scores: list, iteration: int, new: int | None = None):
    for x in population:
        k = genome.key(x)
        if k in state.pending:
            state.history[k] = state.pending[k]
    state.pending = {}
    state.rng_start = state.rng.bit_generator.state
    state.population, state.scores = population, [float(s) for s in scores]
    state.per_iteration.append({"iteration": iteration, "best_perplexity": min(state.history.values()),
                                "evaluated": len(population) if new is None else new})


def _children(space: SearchSpace, config, parents: list, rng: np.random.Generator, history) -> list:
    """`mutations` mutants of random parents, then `crossovers` children of two distinct random parents
    (a crossover that finds nothing new within `crossover_tries` becomes a mutation of its first parent)."""
    out, keys = [], set()
    seen = genome.Seen(history, keys)

    def add(child):
        if child is not None:
            out.append(child)
            keys.add(genome.key(child))

    for _ in range(config.mutations):
        add(genome.mutate(space, parents[int(rng.integers(len(parents)))], rng, config.mutation_prob, seen))
    for _ in range(config.crossovers):
        if len(parents) >= 2:
            i, j = (int(x) for x in rng.choice(len(parents), size=2, replace=False))
            child = genome.crossover(space, parents[i], parents[j], rng, seen, config.crossover_tries)
        else:
            i, child = 0, None
        add(child if child is not None else genome.mutate(space, parents[i], rng, config.mutation_prob, seen))
    return out


# ---- outputs --------------------------------------------------------------------------------------


def _write_results(config, space: SearchSpace, state: _State, seed_cands: dict, run_dir: Path) -> dict:
    best_key = min(state.history, key=state.history.get)  # first of the lowest, in evaluation order
    best = np.asarray(best_key, np.int64)
    factors = [float(x) for x in space.factors(best)]
    n_hat = space.start_tokens(best) if config.search_start_tokens else config.start_tokens
    result = {
        "mode": config.mode, "factors": factors, "start_tokens": n_hat, "perplexity": state.history[best_key],
        "original_max_position_embeddings": config.original_length, "target_length": config.target_length,
        "eval_length": config.window, "iterations_completed": state.iteration,
        "complete": state.iteration >= config.iterations, "evaluated": len(state.history),
        "seeds": {name: state.history.get(genome.key(c)) for name, c in seed_cands.items()},
        "history": state.per_iteration, "config": dataclasses.asdict(config),
    }
    write_atomic(run_dir / CSV_FILE, "".join(f"{f!r}\n" for f in factors))
    write_atomic(run_dir / RESULT_FILE, json.dumps(result, indent=1))
    export_rope_scaling(run_dir.parent)
    return result


def export_rope_scaling(out_dir) -> dict:
    """Write `out_dir/rope_scaling.json` from `long/result.json` and `short/result.json` (whichever exist;
    the missing side is all 1.0). The dict is HF's LongRoPE `rope_scaling` (`RopeScaling.from_hf` reads
    it; the trainer's `rope.factors_file` takes it), with `start_tokens` from the long search if nonzero."""
    out_dir = Path(out_dir)
    results = {m: json.loads((out_dir / m / RESULT_FILE).read_text())
               for m in ("long", "short") if (out_dir / m / RESULT_FILE).exists()}
    if not results:
        raise FileNotFoundError(f"{out_dir}: no long/{RESULT_FILE} or short/{RESULT_FILE}; run a search first")
    ref = next(iter(results.values()))
    for r in results.values():
        for name in ("original_max_position_embeddings", "target_length"):
            if r[name] != ref[name] or len(r["factors"]) != len(ref["factors"]):
                raise ValueError(f"{out_dir}: the long and short searches disagree on {name} or the factor count "
                                 f"({r[name]} vs {ref[name]}); search both for the same model and target")
    ones = [1.0] * len(ref["factors"])
    original = ref["original_max_position_embeddings"]
    d = {
        "rope_type": "longrope", "factor": ref["target_length"] / original,
        "original_max_position_embeddings": original,
        "short_factor": results["short"]["factors"] if "short" in results else ones,
        "long_factor": results["long"]["factors"] if "long" in results else ones,
    }
    n_hat = results["long"]["start_tokens"] if "long" in results else 0
    if n_hat:
        d["start_tokens"] = n_hat
    write_atomic(out_dir / ROPE_SCALING_FILE, json.dumps(d, indent=1))
    return d
