"""The search space and its operators: monotone candidates on the grid, mutation within neighbours,
deduplication, and seeds equal to rope.py's PI/NTK/YaRN frequencies."""

import numpy as np
import pytest

from longrope_jax.rope import START_TOKEN_CHOICES, RopeScaling, default_inv_freq, frequencies
from longrope_jax.search import evolution
from longrope_jax.search import space as genome
from longrope_jax.search.space import SearchSpace
from tests.search.tiny_search import D_HALF, ORIG, TARGET, Quadratic, long_config, search_model_config, seeds


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


def test_seeds_are_pi_ntk_yarn_from_rope_py_snapped_to_the_grid():
    cfg = search_model_config()
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
