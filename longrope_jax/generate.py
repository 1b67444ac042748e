"""Greedy and sampled decoding with a KV cache.

The cache (`model.init_cache`) has a fixed size, prompt length + max_new_tokens - 1 slots (the last
token is never fed back) rounded up by `cache_slots`, so everything compiles once, and prompts whose
lengths round to the same fill (`fill_length`, padding in segment 0) share the compiles. The prompt is
prefilled in one forward, then a jitted `decode_step`, called from a Python loop, feeds one token at a
time and writes its keys/values at the next slot (the same compiled step for every token; the loop
stops once all rows hit EOS). On a mesh, see `prefill`: the prompt and cache are split over devices.
A prefill (and a re-prefill) fills an empty cache, so its tokens attend to each other with the
config's kernel (blockwise, O(T x chunk), unless the config is dense); a decode step attends densely
over the cache, [1, T + max_new_tokens] scores per head.

Keys are cached after RoPE, so a cached step equals a forward over the whole sequence so far (the
reference semantics) only while the RoPE frequencies stay the same. Two variants change them with the
length (seq_len = max(position) + 1, as in `rope.rope_cos_sin`):

- LongRoPE switches from short to long factors once seq_len > original_max_position_embeddings. At
  that one step we *re-prefill*: recompute the whole cache from all tokens so far with the long
  factors. After that the factors stay long and the cache stays valid.
- Dynamic NTK grows its base at every step beyond max_position_embeddings. Rotating cached pre-RoPE
  keys would not be exact (the hidden states of every layer past the first depend on the base too), so
  we re-prefill at *every* step beyond max_position_embeddings: exact, but each such step costs a full
  forward over the cache.

A re-prefill runs the model over the whole token buffer; slots not yet written get segment id 0 and
position 0, so real tokens never see them and seq_len is that of the tokens so far. Every other rope
type has fixed frequencies and never re-prefills.

After `eos_id` a row keeps emitting `eos_id`; the loop stops early once every row has emitted it.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from longrope_jax import attention as attn_lib
from longrope_jax.model import Llama, LlamaConfig, fit_length, init_cache
from longrope_jax.rope import RopeScaling
from longrope_jax.sharding.init import param_shardings
from longrope_jax.sharding.rules import DEFAULT_RULES, sequence_rules


def _check_int(name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {v!r}")
    return int(v)


def check_prompts(config: LlamaConfig, prompts_BxT) -> np.ndarray:
    """int32 [B, T] with T >= 1 and every id in [0, vocab_size), else ValueError."""
    p = np.asarray(prompts_BxT)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 1:
        raise ValueError(
            f"prompts_BxT: expected a non-empty 2-D [batch, length] array of token ids, got shape {p.shape}"
        )
    if not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"prompts_BxT: expected integer token ids, got dtype {p.dtype}")
    bad = (p < 0) | (p >= config.vocab_size)
    if bad.any():
        raise ValueError(
            f"prompts_BxT: token id {int(p[bad][0])} is outside the vocabulary; "
            f"expected ids in [0, {config.vocab_size})"
        )
    return p.astype(np.int32)


# ---- cached forward passes ------------------------------------------------------------------------


def _scaling(config: LlamaConfig, rope_scaling: RopeScaling | None) -> RopeScaling:
    return rope_scaling if rope_scaling is not None else config.rope_scaling


def _forward(model, params, tokens_BxL, positions, segment_ids, cache, scaling, logits_at, fresh: bool = True):
    """Cached forward -> (logits [B, V] of token `logits_at`, new cache). `fresh`: the cache is empty and
    these tokens fill it from slot 0, attending to each other with the config's memory-efficient kernel."""
    logits_Bx1xV, cache = model.apply(
        {"params": params}, tokens_BxL, positions, segment_ids, scaling, cache=cache, logits_at=logits_at,
        fresh_cache=fresh,
    )
    return logits_Bx1xV[:, 0], cache


def _models(config, mesh, rules, rows: int):
    """(model for whole-buffer fills, model for one-token steps). On a mesh both split the cache's slots over
    the axes the batch cannot use (`sequence_rules`); the fill splits its tokens the same way."""
    if mesh is None:
        return Llama(config), Llama(config)
    rules = rules or DEFAULT_RULES
    return (Llama(config, mesh=mesh, rules=sequence_rules(rules, mesh.shape, rows)),
            Llama(config, mesh=mesh, rules=sequence_rules(rules, mesh.shape, rows, decode=True)))


BUCKET = 128  # fills and caches round up to this (or to whole attention chunks): nearby lengths share a compile


def fill_length(config: LlamaConfig, fill, length: int) -> int:
    """Tokens a fill runs over: `length` rounded up so that every device (of the mesh the fill splits the
    sequence over; one without a mesh) gets the same number, a multiple of `BUCKET` up to one attention
    chunk and of whole chunks beyond. The rest is padding in segment 0, which no real token sees."""
    shards = attn_lib.seq_shards(fill.mesh, fill.rules) if fill.mesh is not None else 1
    chunk = config.attention_chunk
    local = _round_up(-(-length // shards), min(BUCKET, chunk))
    if local > chunk:
        local = _round_up(local, chunk)
    return local * shards


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def cache_slots(config: LlamaConfig, prompt_len: int, max_len: int, rows: int, mesh=None, rules=None) -> int:
    """Slots of the cache: at least `max_len` and the prompt's fill, rounded up to a multiple of `BUCKET`
    (at most a chunk) that every device holds the same number of."""
    fill = _models(config, mesh, rules, rows)[0]
    shards = attn_lib.seq_shards(mesh, fill.rules) if mesh is not None else 1
    unit = math.lcm(shards, min(BUCKET, config.attention_chunk))
    return _round_up(max(max_len, fill_length(config, fill, prompt_len)), unit)


def _state_names(state):
    names = {"k": ("layers", "batch", "cache_length", "kv_heads", "head_dim"), "index": ()}
    names["v"] = names["k"]
    cache = {k: names.get(k, ("batch", "cache_length")) for k in state["cache"]}
    return {"cache": cache, "tokens": ("batch", "cache_length")}


def generation_shardings(state, mesh, rules=None):
    """NamedShardings of a generation state on `mesh` (what `prefill` returns and `decode_step` takes)."""
    rows = state["tokens"].shape[0]
    step_rules = sequence_rules(rules or DEFAULT_RULES, mesh.shape, rows, decode=True)
    specs = jax.tree.map(lambda n: nn.logical_to_mesh_axes(n, step_rules), _state_names(state),
                         is_leaf=lambda x: isinstance(x, tuple))
    return jax.tree.map(lambda p: NamedSharding(mesh, p), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _place(state, model):
    """Pin the state's sharding (a no-op without a mesh), so prefill and decode agree on it."""
    if model.mesh is None:
        return state
    return jax.tree.map(lambda x, n: nn.with_logical_constraint(x, n, rules=model.rules, mesh=model.mesh),
                        state, _state_names(state), is_leaf=lambda x: isinstance(x, tuple))


def _prefill(config, params, prompts_BxP, length, max_len, scaling, mesh=None, rules=None):
    """`prompts_BxP` is padded to a fill length; the first `length` (traced) tokens are the prompt."""
    b, p = prompts_BxP.shape
    fill, _ = _models(config, mesh, rules, b)
    s = cache_slots(config, p, max_len, b, mesh, rules)
    logits_BxV, cache = _forward(fill, params, *_padded_fill(prompts_BxP, length, p), init_cache(config, b, s), scaling,
                                 length - 1)
    state = {"cache": {**cache, "index": jnp.asarray(length, jnp.int32)}, "tokens": fit_length(prompts_BxP, s)}
    return logits_BxV, _place(state, fill)


def _padded_fill(tokens_BxL, count, length):
    """(tokens, positions, segment ids) of a fill over `length` slots of which the first `count` are real;
    `count` may be traced. The rest sit at position 0 in segment 0, where no real token looks."""
    tokens_BxF = fit_length(tokens_BxL, length)
    valid_F = jnp.arange(length) < count
    return tokens_BxF, jnp.where(valid_F, jnp.arange(length, dtype=jnp.int32), 0), valid_F.astype(jnp.int32)


def _refill_needed(config: LlamaConfig, scaling: RopeScaling, pos):
    """Traced bool: do the frequencies for the token at `pos` differ from the last forward's?
    None when they never change (no re-prefill code is compiled)."""
    return scaling.frequencies_change(pos, config.max_position_embeddings)


def _decode(config, params, state, tok_B, scaling, mesh=None, rules=None):
    cache, tokens_BxS = state["cache"], state["tokens"]
    fill, one = _models(config, mesh, rules, tok_B.shape[0])
    pos = cache["index"]
    tokens_BxS = lax.dynamic_update_slice_in_dim(tokens_BxS, tok_B[:, None], pos, axis=1)

    def step(cache):
        return _forward(one, params, tok_B[:, None], None, None, cache, scaling, 0, fresh=False)

    def refill(cache):
        # The whole buffer again from slot 0; unwritten slots are segment 0 at position 0.
        f = fill_length(config, fill, tokens_BxS.shape[1])
        logits_BxV, cache = _forward(fill, params, *_padded_fill(tokens_BxS, pos + 1, f),
                                     {**cache, "index": jnp.zeros((), jnp.int32)}, scaling, pos)
        return logits_BxV, {**cache, "index": pos + 1}

    needed = _refill_needed(config, scaling, pos)
    logits_BxV, cache = step(cache) if needed is None else lax.cond(needed, refill, step, cache)
    return logits_BxV, _place({"cache": cache, "tokens": tokens_BxS}, one)


@functools.partial(jax.jit, static_argnames=("config", "max_len", "scaling", "mesh", "rules"))
def prefill_jit(config, params, prompts_BxP, length, max_len, scaling, mesh=None, rules=None):
    return _prefill(config, params, prompts_BxP, length, max_len, scaling, mesh, rules)


def padded_prompts(config: LlamaConfig, prompts_BxT, mesh=None, rules=None) -> np.ndarray:
    """The prompts zero-padded on the right to their fill length (what `prefill_jit` takes)."""
    b, t = prompts_BxT.shape
    p = fill_length(config, _models(config, mesh, rules, b)[0], t)
    return np.pad(np.asarray(prompts_BxT, np.int32), ((0, 0), (0, p - t)))


# The old state is donated: the cache is updated in place rather than copied at every token.
@functools.partial(jax.jit, static_argnames=("config", "scaling", "mesh", "rules"), donate_argnames=("state",))
def decode_jit(config, params, state, tok_B, scaling, mesh=None, rules=None):
    return _decode(config, params, state, tok_B, scaling, mesh, rules)


def prefill(config: LlamaConfig, params, prompts_BxT, max_len: int, *, rope_scaling: RopeScaling | None = None,
            mesh=None, rules=None):
    """Run the prompt into a fresh cache of at least `max_len` slots -> (next-token logits [B, V] float32, state).

    `state` is {"cache": model cache, "tokens": [B, slots] tokens so far (for re-prefills)}. On a `mesh`
    (params placed with `sharding.init.param_shardings`) the cache's slots are split over the devices the
    batch leaves free and rounded up by `cache_slots`; pass the same mesh and rules to `decode_step`.
    """
    p = check_prompts(config, prompts_BxT)
    if _check_int("max_len", max_len, 1) < p.shape[1]:
        raise ValueError(f"max_len: expected at least the prompt length {p.shape[1]}, got {max_len}")
    return prefill_jit(config, params, padded_prompts(config, p, mesh, rules), np.int32(p.shape[1]), int(max_len),
                       _scaling(config, rope_scaling), mesh, rules)


def decode_step(config: LlamaConfig, params, state: dict, tokens_B, *, rope_scaling: RopeScaling | None = None,
                mesh=None, rules=None):
    """Feed one token per row at the next position -> (next-token logits [B, V] float32, new state).

    Re-prefills the cache when the RoPE frequencies change (see the module docstring). `state` is
    donated (do not reuse it); feed no more tokens than the cache has slots.
    """
    tok_B = jnp.asarray(tokens_B, jnp.int32).reshape(-1)
    return decode_jit(config, params, state, tok_B, _scaling(config, rope_scaling), mesh, rules)


# ---- sampling -------------------------------------------------------------------------------------


def _pick(logits_BxV, key, temperature, top_p, *, greedy: bool, top_k: int | None, use_top_p: bool):
    """Next tokens [B] int32: argmax, or a sample from softmax(logits / temperature) cut to top_k / top_p."""
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    x_BxV = logits_BxV / temperature
    if top_k is not None:
        kth_Bx1 = lax.top_k(x_BxV, min(top_k, x_BxV.shape[-1]))[0][:, -1:]
        x_BxV = jnp.where(x_BxV < kth_Bx1, -jnp.inf, x_BxV)
    if use_top_p:
        # Nucleus: the smallest set of most likely tokens whose mass reaches top_p (at least one).
        sorted_BxV = -jnp.sort(-x_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        keep_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p
        cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        x_BxV = jnp.where(x_BxV < cutoff_Bx1, -jnp.inf, x_BxV)
    return jax.random.categorical(key, x_BxV, axis=-1).astype(jnp.int32)


_pick_jit = jax.jit(_pick, static_argnames=("greedy", "top_k", "use_top_p"))


def check_ids_fit(config: LlamaConfig, top: int, what: str) -> None:
    """ValueError unless the largest token id of `what` is below the model's vocabulary."""
    if top >= config.vocab_size:
        raise ValueError(f"{what}: token ids reach {top}; expected ids below the model's vocab_size "
                         f"{config.vocab_size} (wrong tokenizer?)")


def place_params(config: LlamaConfig, params, mesh=None, rules=None):
    """`params` sharded by their logical names on `mesh` (as they are without one): place them once
    before many `generate` calls."""
    if mesh is None:
        return params
    return jax.device_put(params, param_shardings(config, mesh, rules or DEFAULT_RULES))


def generate(config: LlamaConfig, params, prompts_BxT, max_new_tokens: int, *, rope_scaling: RopeScaling | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, rng: jax.Array | None = None,
             eos_id: int | None = None, mesh=None, rules=None) -> np.ndarray:
    """Continue each prompt (all of length T) by `max_new_tokens` tokens -> int32 [B, max_new_tokens].

    temperature 0 is greedy (top_k/top_p ignored); otherwise sample from softmax(logits / temperature)
    restricted to the top_k most likely tokens and then to the top_p nucleus, with `rng` (required; the
    same rng gives the same tokens). After `eos_id` a row keeps emitting `eos_id`.
    `rope_scaling` overrides the config's. The prefill compiles once per (config, scaling, B, fill length,
    cache slots), the decode step once per (config, scaling, B, cache slots): lengths are rounded up to
    `BUCKET` tokens, so nearby prompt lengths share both; temperature and top_p are traced, top_k is static. With a `mesh` the parameters are placed by their logical names and
    the prompt and cache are split over the devices (see `prefill`).
    """
    p = check_prompts(config, prompts_BxT)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) \
            or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None:
        top_k = _check_int("top_k", top_k, 1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
    if eos_id is not None:
        eos_id = _check_int("eos_id", eos_id, 0)
        if eos_id >= config.vocab_size:
            raise ValueError(f"eos_id: expected None or an id in [0, {config.vocab_size}), got {eos_id}")
    greedy = temperature == 0
    if rng is None:
        if not greedy:
            raise ValueError("rng: expected a jax.random key when temperature > 0 (sampling), got None")
        rng = jax.random.key(0)  # unused by greedy decoding
    elif not isinstance(rng, jax.Array):
        raise ValueError(f"rng: expected a jax.random key, got {type(rng).__name__}")
    elif not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)  # a raw uint32 key from jax.random.PRNGKey
    scaling = _scaling(config, rope_scaling)
    params = place_params(config, params, mesh, rules)
    pick = functools.partial(
        _pick_jit, temperature=jnp.float32(temperature or 1.0), top_p=jnp.float32(top_p or 1.0), greedy=greedy,
        top_k=None if greedy else top_k, use_top_p=not greedy and top_p is not None and top_p < 1,
    )
    b, t = p.shape
    out_BxN = np.full((b, max_new_tokens), 0 if eos_id is None else eos_id, np.int32)
    done_B = np.zeros((b,), bool)
    # A jitted step called from Python: compiled once, shared with prefill/decode_step.
    slots = cache_slots(config, t, t + max_new_tokens - 1, b, mesh, rules)  # the same for nearby prompt lengths
    logits_BxV, state = prefill_jit(config, params, padded_prompts(config, p, mesh, rules), np.int32(t), slots,
                                    scaling, mesh, rules)
    for i in range(max_new_tokens):
        tok_B = np.asarray(pick(logits_BxV, jax.random.fold_in(rng, i)))
        out_BxN[:, i] = np.where(done_B, out_BxN[:, i], tok_B)
        if eos_id is not None:
            done_B |= tok_B == eos_id
            if done_B.all():
                break
        if i + 1 < max_new_tokens:
            logits_BxV, state = decode_jit(config, params, state, jnp.asarray(out_BxN[:, i]), scaling, mesh, rules)
    return out_BxN


def generate_text(config: LlamaConfig, params, tokenizer, prompts: list[str], max_new_tokens: int, **kw) -> list[str]:
    """Decode continuations of text prompts (each BOS + tokenizer.encode(text)).

    Prompts of equal token length run as one batch. `eos_id` defaults to the tokenizer's; the text
    stops before it. Other keywords go to `generate`.
    """
    if isinstance(prompts, str) or not all(isinstance(x, str) for x in prompts):
        raise ValueError("prompts: expected a list of strings")
    eos_id = kw.setdefault("eos_id", getattr(tokenizer, "eos_id", None))
    bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
    ids = [bos + list(tokenizer.encode(text)) for text in prompts]
    by_length: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        by_length.setdefault(len(x), []).append(i)
    texts = [""] * len(prompts)
    for rows in by_length.values():
        out_BxN = generate(config, params, np.array([ids[i] for i in rows], np.int32), max_new_tokens, **kw)
        for i, row in zip(rows, out_BxN):
            row = list(row)
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id)]
            texts[i] = tokenizer.decode(row)
    return texts
