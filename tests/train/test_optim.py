"""The optimizer's learning-rate schedule: linear warmup, then cosine decay to the end ratio."""

import pytest

from longrope_jax.train import config as config_lib


def test_learning_rate_schedule_warms_up_then_decays():
    from longrope_jax.train import optim

    opt = config_lib.default_config().optimizer
    opt.update(lr=1.0, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1)
    lr = optim.learning_rate(opt, 110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.55, rel=1e-3)  # half way down the cosine to 0.1
    assert float(lr(110)) == pytest.approx(0.1)
