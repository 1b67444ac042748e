"""The search tests' tiny setting: lengths, the model config, a cheap stand-in fitness, configs and seeds."""

from pathlib import Path

import numpy as np

from longrope_jax.model import LlamaConfig
from longrope_jax.search import cli as search
from tests.tiny import random_byte_llama

ORIG, TARGET, D_HALF = 64, 256, 8
SMALL = dict(population=12, mutations=4, crossovers=4, parents=6, iterations=2)


def search_model_config(**kw) -> LlamaConfig:
    """The search tests' random model: 2 layers x 64, trained length ORIG."""
    return random_byte_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=ORIG,
                             **kw)


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
    return search.seeds_for(long_config(**kw), cfg or search_model_config())


def outputs(d: Path) -> dict:
    return {name: (d / "long" / name).read_text() for name in ("state.json", "result.json", "factors.csv")}
