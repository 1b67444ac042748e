"""Sharded initialization: parameters created directly in their shards from the model's logical names."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from longrope_jax.model import Llama
from longrope_jax.sharding.mesh import axes_size, batch_sharding, shardings_for
from longrope_jax.sharding.rules import DEFAULT_RULES


def _init_tokens_shape(mesh: Mesh, rules, length: int | None) -> tuple[int, int]:
    # A batch the mesh divides, so the model's activation constraints (and a shard_map over 'seq')
    # see the shapes training will; under jit XLA drops the forward pass since only params are kept.
    spec = tuple(batch_sharding(mesh, rules).spec)
    batch_axes, length_axes = spec + (None,) * (2 - len(spec))
    n_len = axes_size(mesh, length_axes)
    length = 2 * n_len if length is None else length  # 2 chunks per device: zig-zag ring layouts
    if length % n_len:
        raise ValueError(f"init length {length}: expected a multiple of the mesh axes {length_axes!r} ({n_len})")
    return axes_size(mesh, batch_axes), length


def _init_fn(config, mesh, rules, length):
    """rng -> boxed params of `Llama(config, mesh, rules)`. Traced with dense attention: the parameters do
    not depend on the kernel, and a kernel with shape rules (splash) must not see the tiny init batch."""
    model = Llama(dataclasses.replace(config, attention="dense"), mesh=mesh, rules=rules)
    shape = _init_tokens_shape(mesh, rules, length)
    return lambda rng: model.init(rng, jnp.zeros(shape, jnp.int32))["params"]


def param_shardings(config, mesh: Mesh, rules=DEFAULT_RULES, length: int | None = None):
    """NamedShardings for `Llama(config)` params (same tree as `init_params`), from the logical names."""
    init = _init_fn(config, mesh, rules, length)
    return shardings_for(jax.eval_shape(init, jax.random.key(0)), mesh, rules)


def init_sharded(config, mesh: Mesh, rng: jax.Array, rules=DEFAULT_RULES, length: int | None = None):
    """Unboxed params created directly in their shards: no device ever holds the whole model.

    `rng` and `length` as for `model.init_params` (length defaults to two chunks per 'length'
    shard). Values equal `jax.jit` of the unsharded init with the same rng (threefry is
    partitionable); eager `model.init_params` may differ in the last float32 bit.
    """
    init = _init_fn(config, mesh, rules, length)
    shardings = shardings_for(jax.eval_shape(init, rng), mesh, rules)
    return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
