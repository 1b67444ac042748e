"""The pure train step: gradient accumulation equals one big batch."""

import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax.model import Llama, init_params
from longrope_jax.train import config as config_lib
from tests.tiny import tiny_train_config


def test_grad_accumulation_matches_one_big_batch(kjv_dir):
    import functools

    from longrope_jax.data.loader import make_loader
    from longrope_jax.data.sources import open_source
    from longrope_jax.data.tokenizer import build_tokenizer
    from longrope_jax.train import optim
    from longrope_jax.train.steps import TrainState, train_step

    c = config_lib.resolve(tiny_train_config(kjv_dir))
    model_cfg = config_lib.model_config(c)
    source = open_source("kjv", "train", data_dir=c.data.data_dir)
    batch = next(make_loader(source, build_tokenizer("byte"), seq_len=64, batch_size=8, seed=0))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    tx, lr = optim.make_optimizer(c.optimizer, 10)
    params = init_params(model_cfg, jax.random.key(0))
    results = []
    for accum in (1, 2, 4):
        state = TrainState.create(params, tx, jax.random.key(1))
        step = jax.jit(functools.partial(train_step, model=Llama(model_cfg), tx=tx, lr_fn=lr, accum=accum))
        results.append(step(state, batch))
    (ref_state, ref), others = results[0], results[1:]
    for state, metrics in others:
        np.testing.assert_allclose(metrics["loss"], ref["loss"], rtol=1e-6)
        np.testing.assert_allclose(metrics["grad_norm"], ref["grad_norm"], rtol=1e-5)
        assert int(metrics["tokens"]) == int(ref["tokens"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state.params, ref_state.params)
