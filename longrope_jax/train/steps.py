"""Pure train and eval steps (tests import these directly).

A batch is `{"tokens", "positions", "segment_ids"}` int32 [B, L]; the objective is `loss.sum_nll`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from longrope_jax.loss import sum_nll
from longrope_jax.model import Llama


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array  # consecutive non-finite steps so far
    total_skipped: jax.Array

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        def zero():  # separate buffers, so a donated state never holds one buffer twice
            return jnp.zeros((), jnp.int32)

        return cls(step=zero(), params=params, opt_state=tx.init(params), rng=rng, skipped=zero(),
                   total_skipped=zero())


def _micro_batches(batch, accum: int):
    # Micro-batch a takes rows a, a+accum, ...: every data-parallel shard keeps its own rows.
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(state: TrainState, batch, *, model: Llama, tx: optax.GradientTransformation, lr_fn, accum: int = 1):
    """One optimizer step over `accum` micro-batches; a non-finite loss or gradient skips the update."""
    def grads_of(micro):
        (nll, count), grads = jax.value_and_grad(lambda p: sum_nll(model, p, micro), has_aux=True)(state.params)
        return nll, count, grads

    if accum == 1:
        nll, count, grads = grads_of(batch)
    else:
        def body(carry, micro):
            nll, count, grads = grads_of(micro)
            return jax.tree.map(jnp.add, carry, (nll, count, grads)), None

        zeros = (jnp.zeros(()), jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, state.params))
        (nll, count, grads), _ = jax.lax.scan(body, zeros, _micro_batches(batch, accum))
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    loss = nll / denom
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = functools.partial(jnp.where, finite)
    new_state = state.replace(
        step=state.step + 1,
        params=jax.tree.map(keep, new_params, state.params),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        rng=jax.random.split(state.rng)[0],
        skipped=jnp.where(finite, 0, state.skipped + 1),
        total_skipped=state.total_skipped + (~finite).astype(jnp.int32),
    )
    metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm, "lr": lr_fn(state.step),
               "skipped": new_state.skipped, "total_skipped": new_state.total_skipped}
    return new_state, metrics


def eval_step(params, batch, *, model: Llama):
    nll, count = sum_nll(model, params, batch)
    return {"nll": nll, "tokens": count}
