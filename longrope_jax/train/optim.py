"""AdamW with linear warmup, cosine or linear decay, and global-norm clipping."""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate(opt, steps: int) -> optax.Schedule:
    if opt.schedule not in SCHEDULES:
        raise ValueError(f"config.optimizer.schedule: expected one of {SCHEDULES}, got {opt.schedule!r}")
    warmup = min(opt.warmup_steps, steps)
    decay_steps = max(steps - warmup, 1)
    end = opt.lr * opt.end_lr_ratio
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(opt.lr, decay_steps, alpha=opt.end_lr_ratio)
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(opt.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(opt.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup), decay], [warmup])


def _decay_mask(params):
    # Matrices decay; norms' scales and biases do not.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = learning_rate(opt, steps)
    tx = optax.chain(
        optax.clip_by_global_norm(opt.clip_norm) if opt.clip_norm else optax.identity(),
        optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=_decay_mask),
    )
    return tx, lr
