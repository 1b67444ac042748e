"""LongRoPE2's search space: the critical pair, the rule below it, and the released LLaMA3-8B factors
(microsoft/nnscaler, examples/longrope2/llama3_8b_longrope2_config.json at commit
1585c15d4ca99e23a410c90f9bad2664125524d4, copied as data into tests/search/data/longrope2_llama3_8b.json)
reproduced by a candidate of the space to the 0.01 grid."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from longrope_jax.search import space as genome
from longrope_jax.search.cli import SearchConfig
from longrope_jax.search.space import LongRoPE2Space, critical_pair

PUBLISHED = json.loads((Path(__file__).parent / "data" / "longrope2_llama3_8b.json").read_text())


def llama3_space(window: int = 4) -> LongRoPE2Space:
    p = PUBLISHED
    config = SearchConfig(target_length=p["max_position_embeddings"], original_length=p["original_max_position_embeddings"],
                          search_space="longrope2", critical_pair=critical_pair(p["head_dim"], p["rope_theta"],
                                                                                 p["original_max_position_embeddings"]),
                          critical_window=window)
    return config.space(p["head_dim"] // 2)


def test_theoretical_critical_pair_of_llama3_8b_is_35():
    # d_tcd = 2 ceil((d/2) log_b(L / 2π)) = 70 for d 128, b 5e5, L 8192: pair index 35.
    assert critical_pair(128, 500000.0, 8192) == 35
    # The same formula by hand, for another model (LLaMA2-7B: b 1e4, L 4096).
    assert critical_pair(128, 10000.0, 4096) == math.ceil(64 * math.log(4096 / (2 * math.pi)) / math.log(10000.0))


def test_published_llama3_8b_long_factors_are_a_candidate_of_the_space():
    space = llama3_space()
    published = np.asarray(PUBLISHED["long_factor"], np.float64)
    assert space.min_factor == 16.0 and 33 in space.critical_choices  # s = 128k / 8k
    cand = space.snap(published)
    assert space.is_valid(cand)
    assert space.live_from(cand) == 33  # the released factors' real critical pair (theory: 35)
    lam = space.factors(cand)
    err = np.abs(lam - published)
    assert err[33:].max() < 1e-9  # searched part: exactly on the grid
    assert err[:33].max() < 1e-6  # rule part: λ_i = λ_33^(i/33), to the published 9 decimals
    # Only r = 33 reproduces them exactly (neighbours 32 and 34 come within half a grid step, others not).
    for r in space.critical_choices:
        if r != 33:
            other = space.factors(space.snap(published, critical=r))
            assert np.abs(other - published).max() > 1e-3


def test_longrope2_operators_keep_the_rule_below_and_monotone_factors_above():
    space = llama3_space(window=2)
    rng = np.random.default_rng(0)
    parent = space.snap(np.asarray(PUBLISHED["long_factor"]))
    pool, rs = [parent], set()
    for _ in range(1000):
        a, b = pool[rng.integers(len(pool))], pool[rng.integers(len(pool))]
        for child in (genome.mutate(space, a, rng, 0.3), genome.crossover(space, a, b, rng)):
            if child is None:
                continue
            assert space.is_valid(child)
            r = space.live_from(child)
            rs.add(r)
            lam = space.factors(child)
            assert np.all(lam[r:] >= 16.0 - 1e-9) and np.all(np.diff(lam[r:]) >= -1e-9)
            np.testing.assert_allclose(lam[r:] * 100, np.round(lam[r:] * 100), atol=1e-6)
            np.testing.assert_allclose(lam[:r], lam[r] ** (np.arange(r) / r))
            pool.append(child)
    assert rs == set(space.critical_choices)  # the search explores the whole window around d_tcd


def test_longrope2_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="search_space"):
        SearchConfig(target_length=64, original_length=16, search_space="longrope3")
    with pytest.raises(ValueError, match="objective"):
        SearchConfig(target_length=64, original_length=16, objective="bleu")
    with pytest.raises(ValueError, match="short"):
        SearchConfig(target_length=64, original_length=16, search_space="longrope2", short=True)
    with pytest.raises(ValueError, match="critical_pair"):
        SearchConfig(target_length=64, original_length=16, search_space="longrope2").space(8)


def test_a_state_written_before_the_longrope2_settings_still_resumes(tmp_path):
    from longrope_jax.search import evolution
    from tests.search.tiny_search import Quadratic, long_config, seeds

    cfg = long_config(iterations=1)
    evolution.run_search(cfg, Quadratic(), tmp_path, seeds=seeds(), max_iterations_this_run=0, progress=False)
    state = tmp_path / "long" / evolution.STATE_FILE
    d = json.loads(state.read_text())
    for name in ("objective", "search_space", "critical_pair", "critical_window", "needles"):
        del d["config"][name]
    state.write_text(json.dumps(d))
    r = evolution.run_search(cfg, Quadratic(), tmp_path, seeds=seeds(), progress=False)
    assert r["complete"]
