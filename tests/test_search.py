"""LongRoPE search: operators, seeds, fitness, the evolution loop, resume, outputs, CLI, bad input.

References nobody here wrote for this module: rope.py's PI/NTK/YaRN frequencies (the seeds), a direct
float64 log-softmax over the model's full logits (perplexity), an uninterrupted run (resume).
"""

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from longrope_jax import cli
from longrope_jax.data.sources import open_source
from longrope_jax.data.tokenizer import build_tokenizer
from longrope_jax.io.artifacts import read_factors
from longrope_jax.io.orbax_params import save_jax
from longrope_jax.model import Llama, LlamaConfig, init_params
from longrope_jax.rope import START_TOKEN_CHOICES, RopeScaling, default_inv_freq, frequencies
from longrope_jax.search import cli as search
from longrope_jax.search import evolution
from longrope_jax.search import space as genome
from longrope_jax.search.fitness import PerplexityEvaluator, eval_windows
from longrope_jax.search.space import SearchSpace
from longrope_jax.train import config as config_lib

ORIG, TARGET, D_HALF = 64, 256, 8
SMALL = dict(population=12, mutations=4, crossovers=4, parents=6, iterations=2)


def tiny_config(**kw) -> LlamaConfig:
    # A large init makes the random model's perplexity depend visibly on the rotary factors.
    return LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=ORIG, bos_token_id=256, eos_token_id=257,
                       initializer_range=0.3, **kw)


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    return cfg, init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def windows(kjv_dir):
    return eval_windows(open_source("kjv", "validation", data_dir=kjv_dir), build_tokenizer("byte"), TARGET, 3)


@pytest.fixture(scope="module")
def evaluator(model, windows):
    """One compiled evaluator (n̂ traced) shared by the tests that run the real model."""
    cfg, params = model
    return PerplexityEvaluator(cfg, params, windows, original_length=ORIG, target_length=TARGET,
                               candidates_per_call=4, search_start_tokens=True)


class Quadratic:
    """A cheap stand-in fitness with a known optimum, for testing the loop's mechanics."""

    d_half = D_HALF

    def __init__(self):
        self.calls, self.seen = 0, []
        self.target = np.linspace(1.5, 4.5, D_HALF)

    def __call__(self, factors, start_tokens):
        self.calls += 1
        self.seen += [(tuple(f), int(n)) for f, n in zip(factors, start_tokens)]
        return 1.0 + ((factors - self.target) ** 2).sum(1) + 0.01 * np.log1p(start_tokens)


def long_config(**kw) -> search.SearchConfig:
    return search.SearchConfig(**{"target_length": TARGET, "original_length": ORIG, **SMALL, **kw})


def seeds(cfg=None, **kw):
    return search.seeds_for(long_config(**kw), cfg or tiny_config())


# ---- operators ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_n_hat", [False, True])
def test_mutation_and_crossover_keep_candidates_monotone_and_on_the_grid(with_n_hat):
    space = SearchSpace(d_half=D_HALF, max_factor=5.0, search_start_tokens=with_n_hat)
    rng = np.random.default_rng(1)
    pool = [space.snap(np.sort(rng.uniform(1, 5, D_HALF)), int(rng.choice(START_TOKEN_CHOICES))) for _ in range(20)]
    made = 0
    for _ in range(1500):
        a, b = pool[rng.integers(len(pool))], pool[rng.integers(len(pool))]
        for child, parent in ((genome.mutate(space, a, rng), a), (genome.crossover(space, a, b, rng), None)):
            if child is None:
                continue
            made += 1
            lam = space.factors(child)
            assert np.all(np.diff(lam) >= 0) and lam.min() >= 1.0 and lam.max() <= 5.0
            np.testing.assert_allclose(lam * 100, np.round(lam * 100), atol=1e-6)  # the 0.01 grid
            assert space.is_valid(child)
            if parent is not None:
                assert not np.array_equal(child, parent)
                assert abs(int(child[0]) - int(parent[0])) <= 1  # n̂ moves to a neighbouring choice
            if not with_n_hat:
                assert child[0] == 0 and space.start_tokens(child) == 0
        if made > 20 and rng.random() < 0.05:
            pool.append(child if child is not None else a)
    assert made > 2000


def test_mutation_resamples_each_gene_within_its_neighbours():
    space = SearchSpace(d_half=D_HALF, max_factor=5.0)
    parent = space.snap([1.0, 1.2, 1.2, 2.0, 3.0, 3.0, 4.0, 4.9])
    rng = np.random.default_rng(0)
    changed = np.zeros(D_HALF)
    pk = parent[1:]
    for _ in range(3000):
        ck = genome.mutate(space, parent, rng, prob=0.3)[1:]
        changed += ck != pk
        for i in range(D_HALF):  # genes go left to right: between the new left and the old right neighbour
            lo = ck[i - 1] if i else 0
            hi = pk[i + 1] if i + 1 < D_HALF else space.top
            assert lo <= ck[i] <= hi
    # Each gene changes in roughly p=0.3 of draws (a bit more: unchanged draws are redrawn).
    assert np.all(changed / 3000 > 0.15) and np.all(changed / 3000 < 0.5)


def test_history_deduplicates_candidates(tmp_path):
    space = SearchSpace(d_half=2, max_factor=1.03)  # grid indices 0..3
    parent = space.snap([1.01, 1.02])
    rng = np.random.default_rng(0)
    seen = {genome.key(parent)}
    while True:
        child = genome.mutate(space, parent, rng, seen=seen, max_tries=500)
        if child is None:
            break
        assert genome.key(child) not in seen
        seen.add(genome.key(child))
    # Reachable from (1, 2): first gene in [0, 2], then the second in [first, 3]: 4 + 3 + 2 candidates,
    # each produced once, then nothing new is left.
    assert seen == {(0, a, b) for a in range(3) for b in range(a, 4)}
    # Exact integer keys: 1.0 + 0.01 * 3 in floats still finds its grid point.
    assert genome.key(space.snap([1.03, 1.03])) == (0, 3, 3)
    fitness = Quadratic()
    evolution.run_search(long_config(iterations=4), fitness, tmp_path, seeds=seeds(), progress=False)
    assert len(fitness.seen) == len(set(fitness.seen)) == 12 + 4 * 8  # no candidate is evaluated twice


# ---- seeds ---------------------------------------------------------------------------------------------


def test_seeds_are_pi_ntk_yarn_from_rope_py_snapped_to_the_grid():
    cfg = tiny_config()
    s = TARGET / ORIG
    base = np.asarray(default_inv_freq(cfg.head_dim, cfg.rope_theta), np.float64)

    def ratio(scaling):
        inv, _ = frequencies(scaling, head_dim=cfg.head_dim, theta=cfg.rope_theta, max_position_embeddings=TARGET)
        return base / np.asarray(inv, np.float64)

    reference = {
        "pi": ratio(RopeScaling("linear", factor=s)),
        "ntk": ratio(RopeScaling("ntk", factor=s)),
        "yarn": ratio(RopeScaling("yarn", factor=s, original_max_position_embeddings=ORIG, beta_fast=32, beta_slow=1)),
    }
    got = seeds(cfg)
    assert list(got) == ["pi", "ntk", "yarn"]
    space = long_config().space(D_HALF)
    pop = genome.initial_population(space, [space.snap(v) for v in got.values()], 12, np.random.default_rng(0))
    for i, (name, ref) in enumerate(reference.items()):
        np.testing.assert_allclose(got[name], ref, rtol=1e-12)
        seed_lam = space.factors(pop[i])  # the population starts with the three seeds, in order
        assert np.all(np.abs(seed_lam - np.clip(ref, 1.0, 5.0)) <= 0.005 + 1e-9)
    # Sanity of the formulas themselves: PI is s everywhere, NTK is s^(2i/(d-2)), YaRN keeps the first pair.
    np.testing.assert_allclose(reference["pi"], s, rtol=1e-6)
    np.testing.assert_allclose(reference["ntk"], s ** (2 * np.arange(D_HALF) / (2 * D_HALF - 2)), rtol=1e-5)
    assert reference["yarn"][0] == pytest.approx(1.0) and reference["yarn"][-1] == pytest.approx(s, rel=1e-6)


def test_seeds_are_clipped_to_the_bound_and_made_monotone():
    space = SearchSpace(d_half=4, max_factor=2.5)
    np.testing.assert_allclose(space.factors(space.snap([0.5, 1.004, 3.0, 2.0])), [1.0, 1.0, 2.5, 2.5])
    assert SearchSpace(d_half=4, max_factor=1.25 * 3.3).top == 312  # bound 4.125 rounds down onto the grid


# ---- fitness -------------------------------------------------------------------------------------------


def test_perplexity_equals_a_direct_log_softmax_computation(model, windows, evaluator):
    cfg, params = model
    lams = [np.full(D_HALF, 4.0), np.linspace(1.0, 5.0, D_HALF), np.linspace(1.0, 2.0, D_HALF)]
    n_hats = [0, 0, 8]
    ours = evaluator(np.stack(lams), np.asarray(n_hats))
    for lam, n_hat, got in zip(lams, n_hats, ours):
        scaling = RopeScaling.from_hf({"rope_type": "longrope", "original_max_position_embeddings": ORIG,
                                       "factor": TARGET / ORIG, "short_factor": [1.0] * D_HALF,
                                       "long_factor": lam.tolist(), "start_tokens": n_hat})
        logits = np.asarray(Llama(dataclasses.replace(cfg, rope_scaling=scaling)).apply({"params": params}, windows),
                            np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))  # full log-softmax
        targets = np.concatenate([windows[:, 1:], np.zeros_like(windows[:, :1])], axis=1)
        mask = np.ones(windows.shape)
        mask[:, -1] = 0  # the last position predicts nothing
        nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
        ref = math.exp((nll * mask).sum() / mask.sum())
        assert got == pytest.approx(ref, rel=2e-5)
    assert len(set(np.round(ours, 3))) == 3  # the factors and n̂ really change the model


def test_eval_windows_are_bos_plus_document_prefixes(kjv_dir, windows):
    tok = build_tokenizer("byte")
    docs = [d for d in open_source("kjv", "validation", data_dir=kjv_dir) if len(tok.encode(d)) >= TARGET]
    assert windows.shape == (3, TARGET) and windows.dtype == np.int32
    for row, doc in zip(windows, docs):
        assert row[0] == tok.bos_id and row[1:].tolist() == tok.encode(doc)[: TARGET - 1]


def test_model_compiles_once_for_many_candidates(evaluator):
    rng = np.random.default_rng(0)
    before = evaluator.traces
    for count in (1, 4, 7, 3):
        lam = np.sort(rng.uniform(1, 5, (count, D_HALF)), axis=1)
        ppl = evaluator(lam, rng.choice(START_TOKEN_CHOICES, count))
        assert ppl.shape == (count,) and np.all(np.isfinite(ppl))
    assert evaluator.traces == 1 and before <= 1


# ---- the loop ------------------------------------------------------------------------------------------


def test_two_iteration_search_keeps_or_lowers_the_best_perplexity(evaluator, tmp_path):
    config = long_config(search_start_tokens=True)
    result = evolution.run_search(config, evaluator, tmp_path, seeds=seeds(), progress=False)
    best = [h["best_perplexity"] for h in result["history"]]
    assert len(best) == 3 and all(b <= a for a, b in zip(best, best[1:]))
    assert result["perplexity"] == best[-1] <= min(result["seeds"].values())
    assert result["evaluated"] == 12 + 2 * 8  # P, then N1 + N2 new candidates per iteration
    state = json.loads((tmp_path / "long" / "state.json").read_text())
    seed_keys = {genome.key(long_config().space(D_HALF).snap(v)) for v in seeds().values()}
    assert any(tuple(c) not in seed_keys for c, _ in state["history"])
    # The reported best is what the evaluator gives for the reported factors and n̂.
    again = evaluator(np.asarray([result["factors"]]), np.asarray([result["start_tokens"]]))[0]
    assert again == pytest.approx(result["perplexity"], rel=1e-6)


def test_search_finds_better_factors_than_the_seeds_on_a_known_fitness(tmp_path):
    result = evolution.run_search(long_config(iterations=6), Quadratic(), tmp_path, seeds=seeds(), progress=False)
    assert result["perplexity"] < 0.5 * min(result["seeds"].values())


def test_search_is_deterministic_given_the_seed(tmp_path):
    runs = [evolution.run_search(long_config(seed=s), Quadratic(), tmp_path / f"{i}", seeds=seeds(), progress=False)
            for i, s in enumerate((3, 3, 4))]
    assert runs[0]["history"] == runs[1]["history"] and runs[0]["factors"] == runs[1]["factors"]
    state = [json.loads((tmp_path / f"{i}" / "long" / "state.json").read_text())["history"] for i in range(3)]
    assert state[0] == state[1] != state[2]


def _outputs(d: Path) -> dict:
    return {name: (d / "long" / name).read_text() for name in ("state.json", "result.json", "factors.csv")}


def test_resume_after_kill_equals_the_uninterrupted_search(evaluator, tmp_path):
    config = long_config(search_start_tokens=True)
    full = evolution.run_search(config, evaluator, tmp_path / "full", seeds=seeds(), progress=False)
    part = evolution.run_search(config, evaluator, tmp_path / "cut", seeds=seeds(), progress=False,
                                max_iterations_this_run=1)
    assert part["iterations_completed"] == 1 and not part["complete"]
    resumed = evolution.run_search(config, evaluator, tmp_path / "cut", seeds=seeds(), progress=False)
    assert resumed == full
    assert _outputs(tmp_path / "cut") == _outputs(tmp_path / "full")


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
    assert resumed == full and _outputs(tmp_path / "cut") == _outputs(tmp_path / "full")
    assert not set(crashing.seen) & set(rest.seen)  # finished chunks were not evaluated again


def test_resume_with_different_settings_is_refused_but_more_iterations_continue(tmp_path):
    evolution.run_search(long_config(), Quadratic(), tmp_path, seeds=seeds(), progress=False)
    with pytest.raises(ValueError, match=r"was started with population=12, now 16"):
        evolution.run_search(long_config(population=16), Quadratic(), tmp_path, seeds=seeds(), progress=False)
    more = evolution.run_search(long_config(iterations=3), Quadratic(), tmp_path, seeds=seeds(), progress=False)
    direct = evolution.run_search(long_config(iterations=3), Quadratic(), tmp_path / "x", seeds=seeds(), progress=False)
    assert more["history"] == direct["history"] and more["iterations_completed"] == 3


# ---- outputs and CLI -----------------------------------------------------------------------------------


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
    scaling.validate(tiny_config().head_dim)
    assert list(scaling.long_factor) == result["factors"]
    c = config_lib.default_config()
    c.rope.update(type="longrope", factors_file=str(tmp_path / "rope_scaling.json"))
    trained = config_lib.rope_scaling(c, RopeScaling())
    assert trained.long_factor == scaling.long_factor and trained.original_max_position_embeddings == ORIG


def test_cli_long_then_short_search_fills_both_factor_sets(model, kjv_dir, tmp_path, capsys):
    cfg, params = model
    save_jax(cfg, params, tmp_path / "model")
    out = tmp_path / "out"
    common = ["search", "--model", f"jax:{tmp_path / 'model'}", "--target-length", str(TARGET), "--out", str(out),
              "--data-dir", kjv_dir, "--docs", "2", "--population", "6", "--mutations", "2", "--crossovers", "2",
              "--parents", "3", "--iterations", "1", "--no-progress"]
    assert cli.main(common) == 0
    assert cli.main(common + ["--short"]) == 0
    assert "short factors: perplexity" in capsys.readouterr().out
    d = json.loads((out / "rope_scaling.json").read_text())
    long_r = json.loads((out / "long" / "result.json").read_text())
    short_r = json.loads((out / "short" / "result.json").read_text())
    assert d["long_factor"] == long_r["factors"] and d["short_factor"] == short_r["factors"]
    assert max(d["short_factor"]) <= 2.0 and short_r["eval_length"] == ORIG and long_r["eval_length"] == TARGET
    assert max(d["long_factor"]) <= 1.25 * TARGET / ORIG
    RopeScaling.from_hf(d).validate(cfg.head_dim)


def test_blockwise_search_scores_the_seeds_as_dense_does(model, kjv_dir, tmp_path):
    cfg, params = model
    save_jax(cfg, params, tmp_path / "model")
    common = dict(target_length=TARGET, data_dir=kjv_dir, docs=2, population=4, mutations=0, crossovers=0, parents=2,
                  iterations=0, progress=False)
    dense = search.search(f"jax:{tmp_path / 'model'}", tmp_path / "dense", **common)
    block = search.search(f"jax:{tmp_path / 'model'}", tmp_path / "block", attention="blockwise", attention_chunk=64,
                          **common)
    assert dense["seeds"].keys() == block["seeds"].keys()
    for k, v in dense["seeds"].items():
        assert block["seeds"][k] == pytest.approx(v, rel=1e-5)
    with pytest.raises(ValueError, match="LlamaConfig.attention_chunk: expected a positive integer"):
        search.search(f"jax:{tmp_path / 'model'}", tmp_path / "bad", attention="blockwise", attention_chunk=0, **common)


# ---- bad input -----------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(model, kjv_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="target_length 64: expected more than the original length 64"):
        long_config(target_length=64)
    with pytest.raises(ValueError, match="parents 8: expected at most the population"):
        long_config(population=6, parents=8)
    with pytest.raises(ValueError, match="n̂ is searched with the long factors"):
        long_config(short=True, search_start_tokens=True)
    docs = open_source("kjv", "validation", data_dir=kjv_dir)
    with pytest.raises(ValueError, match=r"needs 7 documents of >= 256 tokens, found 6"):
        eval_windows(docs, build_tokenizer("byte"), TARGET, 7)
    with pytest.raises(ValueError, match=r"needs 2 documents of >= 50000 tokens, found 1"):
        eval_windows(docs, build_tokenizer("byte"), 50000, 2)
    cfg, params = model
    small_vocab = dataclasses.replace(cfg, vocab_size=200)
    with pytest.raises(ValueError, match="expected ids below the model's vocab_size 200"):
        PerplexityEvaluator(small_vocab, params, np.full((1, 8), 256), original_length=ORIG, target_length=TARGET)

    cases = {"empty.csv": ("", "empty; expected 8 factors"),
             "short.csv": ("1.0\n2.0\n", "has 2 values; expected 8"),
             "down.csv": ("\n".join(["1.0", "2.0", "1.5"] + ["3.0"] * 5), r"not monotone: factor 2 \(1.5\) < factor 1"),
             "layers.csv": ("1,2\n3,4\n", "per-layer factors"),
             "words.csv": ("a\n", "expected numbers"),
             "zero.json": (json.dumps([0.0] * 8), "finite positive"),
             "nokey.json": (json.dumps({"x": [1.0] * 8}), "no 'factors' or 'long_factor' key"),
             "bad.json": ("{", "not valid JSON")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_factors(tmp_path / name, D_HALF)
    np.testing.assert_array_equal(read_factors(tmp_path / "down.csv", D_HALF, monotone=False)[:3], [1, 2, 1.5])
    with pytest.raises(FileNotFoundError):
        read_factors(tmp_path / "missing.csv", D_HALF)

    save_jax(cfg, params, tmp_path / "model")
    argv = ["search", "--model", f"jax:{tmp_path / 'model'}", "--out", str(tmp_path / "o"), "--data-dir", kjv_dir]
    assert cli.main(argv + ["--target-length", "64"]) == 2
    assert "target_length 64: expected more than the original length 64" in capsys.readouterr().err
    assert cli.main(argv + ["--target-length", "256", "--docs", "7"]) == 2
    assert "needs 7 documents of >= 256 tokens, found 6" in capsys.readouterr().err
    assert cli.main(argv + ["--target-length", "256", "--init-factors", str(tmp_path / "down.csv")]) == 2
    assert "not monotone" in capsys.readouterr().err
    assert cli.main(["search", "--model", "pt:x", "--target-length", "256", "--out", str(tmp_path / "o")]) == 2
    assert "expected 'hf:DIR' or 'jax:DIR'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing is written before the inputs check out
