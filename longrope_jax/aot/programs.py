"""The programs a training config runs, as jitted functions with abstract arguments (shapes, dtypes and
shardings; nothing allocated), ready for `.lower(...).compile()` on any device set, a TPU slice's included.

Each `Program` names the jitted function, its abstract arguments and the tokens one call processes.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longrope_jax.aot.flops import forward_flops, train_flops
from longrope_jax.eval.perplexity import WindowScorer
from longrope_jax.generate import cache_slots, decode_jit, generation_shardings, padded_prompts, prefill_jit
from longrope_jax.model import Llama, LlamaConfig
from longrope_jax.search.fitness import PerplexityEvaluator
from longrope_jax.sharding.init import param_shardings
from longrope_jax.sharding.mesh import batch_sharding
from longrope_jax.train import optim
from longrope_jax.train.steps import TrainState, eval_step, train_step
from longrope_jax.train.trainer import state_shardings

PROGRAMS = ("train", "eval", "perplexity", "search", "prefill", "decode")


@dataclasses.dataclass
class Program:
    name: str
    fn: object  # a jax.jit-wrapped function
    args: tuple  # abstract arguments (ShapeDtypeStruct trees, or static values the jit marks static)
    tokens: int  # tokens one call processes (whole slice)
    model_flops: float  # one call's FLOPs (whole slice), counted from the architecture: see aot.flops
    note: str = ""


def _sds(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_params(model_cfg: LlamaConfig, mesh: Mesh, rules):
    """(ShapeDtypeStruct params with their shardings, the shardings)."""
    shardings = param_shardings(model_cfg, mesh, rules)
    dense = dataclasses.replace(model_cfg, attention="dense")
    shapes = jax.eval_shape(lambda r: nn.meta.unbox(Llama(dense).init(r, jnp.zeros((1, 2), jnp.int32))["params"]),
                            jax.random.key(0))
    return _sds(shapes, shardings), shardings


def _batch(mesh: Mesh, rules, rows: int, length: int) -> dict:
    s = batch_sharding(mesh, rules)
    keys = ("tokens", "positions", "segment_ids")
    return {k: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=s) for k in keys}


def train_program(c, model_cfg: LlamaConfig, mesh: Mesh, rules) -> Program:
    params, p_shardings = abstract_params(model_cfg, mesh, rules)
    tx, lr_fn = optim.make_optimizer(c.optimizer, c.train.steps)
    target = state_shardings(p_shardings, tx, mesh)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    state = _sds(jax.eval_shape(lambda p, r: TrainState.create(p, tx, r), params, rng), target)
    replicated = NamedSharding(mesh, PartitionSpec())
    model = Llama(model_cfg, mesh=mesh, rules=rules)
    fn = jax.jit(functools.partial(train_step, model=model, tx=tx, lr_fn=lr_fn, accum=c.train.grad_accum),
                 in_shardings=(target, batch_sharding(mesh, rules)), out_shardings=(target, replicated),
                 donate_argnums=0)
    return _batch_program("train", fn, state, c, mesh, rules, c.train.batch_size,
                          train_flops(model_cfg, 1, c.train.seq_len), f", grad_accum {c.train.grad_accum}")


def eval_program(c, model_cfg: LlamaConfig, mesh: Mesh, rules) -> Program:
    params, _ = abstract_params(model_cfg, mesh, rules)
    model = Llama(model_cfg, mesh=mesh, rules=rules)
    fn = jax.jit(functools.partial(eval_step, model=model))
    return _batch_program("eval", fn, params, c, mesh, rules, c.eval.batch_size,
                          forward_flops(model_cfg, 1, c.train.seq_len))


def _batch_program(name, fn, first_arg, c, mesh, rules, rows: int, flops_per_token: float, note: str = "") -> Program:
    """A program over one [rows, train.seq_len] batch: fn(first_arg, batch)."""
    tokens = rows * c.train.seq_len
    return Program(name, fn, (first_arg, _batch(mesh, rules, rows, c.train.seq_len)), tokens,
                   tokens * flops_per_token, f"batch {rows} x {c.train.seq_len}{note}")


def perplexity_program(c, model_cfg: LlamaConfig, mesh: Mesh, rules) -> Program:
    """The sliding-window evaluator at the config's length, with the model's own kernel and mesh."""
    params, _ = abstract_params(model_cfg, mesh, rules)
    attention = model_cfg.attention if model_cfg.attention != "splash" else "blockwise"
    scorer = WindowScorer(model_cfg, None, attention=attention, mesh=mesh, rules=rules)
    rows = scorer.batch_multiple
    length = c.train.seq_len
    scorer.check_length(length)
    s = scorer.sharding
    arrays = [jax.ShapeDtypeStruct((rows, length), dt, sharding=s)
              for dt in (jnp.int32, jnp.int32, jnp.int32, jnp.int32, jnp.bool_)]
    return Program("perplexity", scorer.jitted, (params, model_cfg.rope_scaling, *arrays), rows * length,
                   forward_flops(model_cfg, rows * length, length), f"{rows} windows x {length}, attention {attention}")


def search_program(c, model_cfg: LlamaConfig, mesh: Mesh, rules, *, docs: int = 5, candidates: int = 4) -> Program:
    """The LongRoPE search evaluator at the config's length: `candidates` factor vectors over `docs` windows,
    each pair one sequence split over the whole mesh."""
    length = c.train.seq_len
    original = model_cfg.rope_scaling.original_max_position_embeddings or max(length // 2, 1)
    evaluator = PerplexityEvaluator(model_cfg, None, None, original_length=original, target_length=length,
                                    candidates_per_call=candidates, mesh=mesh, rules=rules)
    evaluator.check_length(length)
    params, _ = abstract_params(model_cfg, mesh, evaluator.model.rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    args = (params, jax.ShapeDtypeStruct((candidates, evaluator.d_half), jnp.float32, sharding=replicated),
            jax.ShapeDtypeStruct((candidates,), jnp.int32, sharding=replicated),
            jax.ShapeDtypeStruct((docs, length), jnp.int32, sharding=replicated))
    tokens = candidates * docs * length
    return Program("search", evaluator.jitted, args, tokens, forward_flops(model_cfg, tokens, length),
                   f"{candidates} candidates x {docs} windows x {length}, attention {evaluator.model.config.attention}")


def _generation_args(c, model_cfg, mesh, rules, new_tokens):
    """(params, prompt padded to its fill, its length, cache slots) for one prompt of the config's length."""
    params, _ = abstract_params(model_cfg, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    fill = padded_prompts(model_cfg, jnp.zeros((1, c.train.seq_len), jnp.int32), mesh, rules).shape
    prompt = jax.ShapeDtypeStruct(fill, jnp.int32, sharding=replicated)
    length = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return params, prompt, length, cache_slots(model_cfg, c.train.seq_len, c.train.seq_len + new_tokens - 1, 1, mesh, rules)


def prefill_program(c, model_cfg: LlamaConfig, mesh: Mesh, rules, *, new_tokens: int = 16) -> Program:
    """One prompt of the config's length into a KV cache with room for `new_tokens` more, split over the mesh."""
    params, prompt, length, slots = _generation_args(c, model_cfg, mesh, rules, new_tokens)
    args = (model_cfg, params, prompt, length, slots, model_cfg.rope_scaling, mesh, rules)
    return Program("prefill", prefill_jit, args, c.train.seq_len, forward_flops(model_cfg, c.train.seq_len, c.train.seq_len),
                   f"1 x {c.train.seq_len} prompt, cache of {slots} split over the mesh")


def decode_program(c, model_cfg: LlamaConfig, mesh: Mesh, rules, *, new_tokens: int = 16) -> Program:
    """One decode step with the cache the prefill leaves."""
    params, prompt, length, slots = _generation_args(c, model_cfg, mesh, rules, new_tokens)
    _, state = jax.eval_shape(functools.partial(prefill_jit, model_cfg, max_len=slots, scaling=model_cfg.rope_scaling,
                                                mesh=mesh, rules=rules), params, prompt, length)
    state = _sds(state, generation_shardings(state, mesh, rules))
    token = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    args = (model_cfg, params, state, token, model_cfg.rope_scaling, mesh, rules)
    return Program("decode", decode_jit, args, 1, forward_flops(model_cfg, 1, slots, causal=False),
                   f"1 token, cache of {slots} split over the mesh")


BUILDERS = {"train": train_program, "eval": eval_program, "perplexity": perplexity_program,
            "search": search_program, "prefill": prefill_program, "decode": decode_program}


def programs(c, model_cfg: LlamaConfig, mesh: Mesh, rules, names=PROGRAMS) -> list:
    return [BUILDERS[n](c, model_cfg, mesh, rules) for n in names]
