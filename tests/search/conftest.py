"""The search tests' random model, its evaluation windows from KJV, and one compiled evaluator."""

import jax
import pytest

from longrope_jax.data.sources import open_source
from longrope_jax.data.tokenizer import build_tokenizer
from longrope_jax.model import init_params
from longrope_jax.search.fitness import PerplexityEvaluator, eval_windows
from tests.search.tiny_search import ORIG, TARGET, search_model_config


@pytest.fixture(scope="module")
def model():
    cfg = search_model_config()
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
