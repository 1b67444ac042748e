"""The evaluation tests' random model (one per module) and its checkpoint for the CLI."""

import jax
import pytest

from longrope_jax.io.orbax_params import save_jax
from longrope_jax.model import init_params
from tests.eval.tiny_eval import eval_model_config


@pytest.fixture(scope="module")
def model():
    cfg = eval_model_config()
    return cfg, jax.jit(lambda rng: init_params(cfg, rng))(jax.random.key(0))  # jitted: eager init is slow


@pytest.fixture(scope="module")
def jax_model(tmp_path_factory, model) -> str:
    cfg, params = model
    return str(save_jax(cfg, params, tmp_path_factory.mktemp("ckpt") / "tiny"))
