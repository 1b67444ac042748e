"""The evolution loop: it keeps its best, finds a known optimum, is deterministic, resumes exactly
(against an uninterrupted run), and writes outputs that rope.py and the trainer load."""

import itertools
import json

import numpy as np
import pytest

from longrope_jax.io.artifacts import read_factors
from longrope_jax.rope import START_TOKEN_CHOICES, RopeScaling
from longrope_jax.search import evolution
from longrope_jax.search import space as genome
from longrope_jax.train import config as config_lib
from tests.search.tiny_search import D_HALF, ORIG, Quadratic, long_config, outputs, search_model_config, seeds


def test_two_iteration_search_keeps_or_lowers_the_best_perplexity(evaluator, tmp_path):
    config = long_config(search_start_tokens=True)
    result = evolution.run_search(config, evaluator, tmp_path, seeds=seeds(), progress=False)
    best = [h["best_perplexity"] for h in result["history"]]
    assert len(best) == 3
    assert result["evaluated"] == 12 + 2 * 8  # P, then N1 + N2 new candidates per iteration
    state = json.loads((tmp_path / "long" / "state.json").read_text())
    # The loop keeps the best: the top-k parents survive each generation, so the last generation still holds
    # the k best candidates ever evaluated (the per-iteration bests are a running minimum, monotone anyway).
    k, history = config.parents, sorted(v for _, v in state["history"])
    assert sorted(state["scores"])[:k] == history[:k] and history[0] == result["perplexity"]
    seed_keys = {genome.key(long_config().space(D_HALF).snap(v)) for v in seeds().values()}
    assert any(tuple(c) not in seed_keys for c, _ in state["history"])
    # The reported best is what the evaluator gives for the reported factors and n̂.
    again = evaluator(np.asarray([result["factors"]]), np.asarray([result["start_tokens"]]))[0]
    assert again == pytest.approx(result["perplexity"], rel=1e-6)


class Bowl:
    """A cheap fitness on 4 factors and n̂ with one optimum on a coarse grid, not separable (a cross term)."""

    d_half = 4
    target = np.array([1.3, 2.2, 2.9, 4.6])

    def __call__(self, factors, start_tokens):
        f, n = np.asarray(factors), np.asarray(start_tokens, np.float64)
        return (1.0 + ((f - self.target) ** 2).sum(1) + 0.5 * (f[:, 1] - 2.0) * (f[:, 2] - 3.5)
                + 0.02 * (np.log1p(n) - 1.5) ** 2)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_search_reaches_the_brute_force_optimum_of_a_tiny_space(tmp_path, seed):
    """λ on a 0.5 grid in [1, 5] and n̂ searched: 6930 candidates, each scored here; the search evaluates
    156 of them and must end on the best of all."""
    config = long_config(population=12, mutations=6, crossovers=6, parents=6, iterations=12, max_factor=5.0,
                         step=0.5, search_start_tokens=True, seed=seed)
    space, fitness = config.space(Bowl.d_half), Bowl()
    every = [np.array([n, *k]) for n in range(len(START_TOKEN_CHOICES))
             for k in itertools.combinations_with_replacement(range(space.top + 1), Bowl.d_half)]
    scores = fitness(np.stack([space.factors(c) for c in every]), np.array([space.start_tokens(c) for c in every]))
    optimum = every[int(np.argmin(scores))]
    start = {"pi": np.full(4, 4.0), "ntk": np.array([1.0, 1.6, 2.5, 4.0]), "yarn": np.array([1.0, 1.0, 3.0, 4.0])}
    result = evolution.run_search(config, fitness, tmp_path, seeds=start, progress=False)
    assert result["evaluated"] < 0.05 * len(every)  # a search, not an enumeration
    assert min(result["seeds"].values()) > scores.min()  # the seeds alone do not hold the optimum
    assert result["perplexity"] == scores.min()
    assert result["factors"] == space.factors(optimum).tolist()
    assert result["start_tokens"] == space.start_tokens(optimum)


def test_search_finds_better_factors_than_the_seeds_on_a_known_fitness(tmp_path):
    result = evolution.run_search(long_config(iterations=6), Quadratic(), tmp_path, seeds=seeds(), progress=False)
    assert result["perplexity"] < 0.5 * min(result["seeds"].values())


def test_search_is_deterministic_given_the_seed(tmp_path):
    runs = [evolution.run_search(long_config(seed=s), Quadratic(), tmp_path / f"{i}", seeds=seeds(), progress=False)
            for i, s in enumerate((3, 3, 4))]
    assert runs[0]["history"] == runs[1]["history"] and runs[0]["factors"] == runs[1]["factors"]
    state = [json.loads((tmp_path / f"{i}" / "long" / "state.json").read_text())["history"] for i in range(3)]
    assert state[0] == state[1] != state[2]


def test_resume_after_kill_equals_the_uninterrupted_search(evaluator, tmp_path):
    config = long_config(search_start_tokens=True)
    full = evolution.run_search(config, evaluator, tmp_path / "full", seeds=seeds(), progress=False)
    part = evolution.run_search(config, evaluator, tmp_path / "cut", seeds=seeds(), progress=False,
                                max_iterations_this_run=1)
    assert part["iterations_completed"] == 1 and not part["complete"]
    resumed = evolution.run_search(config, evaluator, tmp_path / "cut", seeds=seeds(), progress=False)
    assert resumed == full
    assert outputs(tmp_path / "cut") == outputs(tmp_path / "full")


def test_resume_after_a_crash_mid_generation_reevaluates_nothing_and_matches(tmp_path):
    config = long_config(iterations=3, candidates_per_call=3)
    full = evolution.run_search(config, Quadratic(), tmp_path / "full", seeds=seeds(), progress=False)

    class Crash(Quadratic):
        def __call__(self, factors, start_tokens):
            if self.calls == 9:  # 4 calls for the initial population, 3 per iteration: iteration 2's last
                raise KeyboardInterrupt
            return super().__call__(factors, start_tokens)

    crashing = Crash()
    with pytest.raises(KeyboardInterrupt):
        evolution.run_search(config, crashing, tmp_path / "cut", seeds=seeds(), progress=False)
    rest = Quadratic()
    resumed = evolution.run_search(config, rest, tmp_path / "cut", seeds=seeds(), progress=False)
    assert resumed == full and outputs(tmp_path / "cut") == outputs(tmp_path / "full")
    assert not set(crashing.seen) & set(rest.seen)  # finished chunks were not evaluated again


def test_resume_with_different_settings_is_refused_but_more_iterations_continue(tmp_path):
    evolution.run_search(long_config(), Quadratic(), tmp_path, seeds=seeds(), progress=False)
    with pytest.raises(ValueError, match=r"was started with population=12, now 16"):
        evolution.run_search(long_config(population=16), Quadratic(), tmp_path, seeds=seeds(), progress=False)
    more = evolution.run_search(long_config(iterations=3), Quadratic(), tmp_path, seeds=seeds(), progress=False)
    direct = evolution.run_search(long_config(iterations=3), Quadratic(), tmp_path / "x", seeds=seeds(), progress=False)
    assert more["history"] == direct["history"] and more["iterations_completed"] == 3


def test_outputs_parse_and_rope_scaling_loads_in_rope_py_and_the_trainer(tmp_path):
    result = evolution.run_search(long_config(search_start_tokens=True), Quadratic(), tmp_path, seeds=seeds(),
                                  progress=False)
    csv = (tmp_path / "long" / "factors.csv").read_text().splitlines()
    assert [float(x) for x in csv] == result["factors"] and len(csv) == D_HALF
    np.testing.assert_array_equal(read_factors(tmp_path / "long" / "factors.csv", D_HALF), result["factors"])
    assert json.loads((tmp_path / "long" / "result.json").read_text()) == result
    d = json.loads((tmp_path / "rope_scaling.json").read_text())
    assert d["long_factor"] == result["factors"] and d["short_factor"] == [1.0] * D_HALF
    assert d["original_max_position_embeddings"] == ORIG and d.get("start_tokens", 0) == result["start_tokens"]
    scaling = RopeScaling.from_hf(d)
    scaling.validate(search_model_config().head_dim)
    assert list(scaling.long_factor) == result["factors"]
    c = config_lib.default_config()
    c.rope.update(type="longrope", factors_file=str(tmp_path / "rope_scaling.json"))
    trained = config_lib.rope_scaling(c, RopeScaling())
    assert trained.long_factor == scaling.long_factor and trained.original_max_position_embeddings == ORIG
