"""The evaluation tests' tiny setting: trained length, a LongRoPE scaling, the model config, random documents."""

import numpy as np

from longrope_jax.model import LlamaConfig
from longrope_jax.rope import RopeScaling
from tests.tiny import random_byte_llama

ORIG, D_HALF, BOS = 32, 4, 256
LONGROPE = RopeScaling("longrope", short_factor=(1.0, 1.2, 1.5, 2.0), long_factor=(1.0, 1.5, 3.0, 4.0),
                       original_max_position_embeddings=ORIG, factor=4.0)


def eval_model_config(**kw) -> LlamaConfig:
    """The evaluation tests' random model: 1 layer x 32 with 2 KV heads, trained length ORIG."""
    return random_byte_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1, max_position_embeddings=ORIG,
                             num_key_value_heads=2, **kw)


def random_docs(sizes, vocab=256, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n) for n in sizes]
