"""Flax linen LLaMA, numerically the same as `transformers.LlamaForCausalLM` (HF rotate_half layout).

Parameters carry logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv_heads`, `head_dim`,
`layers`) and activations use `batch`, `length`; sharding rules map them to mesh axes elsewhere.

KV cache (for decoding, see `generate.py`): `init_cache` builds a fixed-size cache and
`Llama.__call__(..., cache=cache)` writes the new tokens' keys/values at `cache["index"]` and returns
`(logits, new_cache)`. Keys are cached after RoPE; when the frequencies change (LongRoPE's switch,
dynamic NTK) the caller must recompute the cache (generate.py does).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from longrope_jax import attention as attn_lib
from longrope_jax.rope import RopeScaling, apply_rotary, rope_cos_sin
from longrope_jax.sharding.rules import DEFAULT_RULES

HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = ("float32", "bfloat16", "float16")
RING_BLOCKS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: MHA
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    rope_scaling: RopeScaling = RopeScaling()
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral v0.1
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"  # HF architecture written on export: llama or mistral
    # JAX-side settings (not part of the HF config)
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; softmax, norms and RoPE stay float32
    scan_layers: bool = False
    remat_policy: str = "none"
    attention: str = "dense"  # dense | blockwise | ring | splash (TPU)
    attention_chunk: int = 512  # query/key chunk of blockwise and ring attention
    ring_zigzag: bool = True  # load-balanced causal layout for ring attention
    ring_blocks: str = "auto"  # the ring's per-step kernel: auto (Pallas flash on TPU where it fits) | xla | pallas
    loss_chunk: int = 1024  # tokens per sequence shard whose logits the loss holds at once (see loss.py)
    # LongRoPE2's mixed context window: each packed document takes LongRoPE's short or long factors (dynamic
    # NTK: its base) by its own length, not the row's (rope.document_lengths); uncached calls only.
    mixed_window: bool = False

    def __post_init__(self):
        set_ = object.__setattr__
        if self.num_key_value_heads is None:
            set_(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            set_(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, dict) or self.rope_scaling is None:
            set_(self, "rope_scaling", RopeScaling.from_hf(self.rope_scaling))
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LlamaConfig.{key}: expected a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig.num_key_value_heads: {self.num_key_value_heads} must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.model_type not in HF_MODEL_TYPES:
            raise ValueError(f"LlamaConfig.model_type: expected one of {sorted(HF_MODEL_TYPES)}, got {self.model_type!r}")
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"LlamaConfig.{key}: expected one of {DTYPES}, got {getattr(self, key)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"LlamaConfig.remat_policy: expected one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
        if self.attention not in attn_lib.ATTENTION_IMPLS:
            raise ValueError(f"LlamaConfig.attention: expected one of {attn_lib.ATTENTION_IMPLS}, got {self.attention!r}")
        if isinstance(self.attention_chunk, bool) or not isinstance(self.attention_chunk, int) or self.attention_chunk < 1:
            raise ValueError(f"LlamaConfig.attention_chunk: expected a positive integer, got {self.attention_chunk!r}")
        if isinstance(self.loss_chunk, bool) or not isinstance(self.loss_chunk, int) or self.loss_chunk < 1:
            raise ValueError(f"LlamaConfig.loss_chunk: expected a positive integer, got {self.loss_chunk!r}")
        if not isinstance(self.mixed_window, bool):
            raise ValueError(f"LlamaConfig.mixed_window: expected true or false, got {self.mixed_window!r}")
        if self.ring_blocks not in RING_BLOCKS:
            raise ValueError(f"LlamaConfig.ring_blocks: expected one of {RING_BLOCKS}, got {self.ring_blocks!r}")
        if self.attention == "splash" and self.sliding_window is not None:
            raise ValueError("LlamaConfig.sliding_window: not supported with attention='splash'; use blockwise or ring")
        if self.rope_theta <= 0:
            raise ValueError(f"LlamaConfig.rope_theta: expected a positive number, got {self.rope_theta!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"LlamaConfig.sliding_window: expected None or a positive integer, got {self.sliding_window!r}")
        self.rope_scaling.validate(self.head_dim)

    # ---- HF mapping ------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: dict, **overrides: Any) -> "LlamaConfig":
        """From a HF config dict (`config.json` or `transformers.LlamaConfig.to_dict()`).

        Reads `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (4.x). As HF
        does, a top-level `original_max_position_embeddings` (Phi-3 style) wins over the one in the
        rope dict, and `max_position_embeddings` fills it when both are absent.
        `overrides` sets the JAX-side fields (dtype, scan_layers, ...).
        """
        model_type = d.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(
                f"config.json model_type: expected a LLaMA-shaped model {sorted(HF_MODEL_TYPES)}, got {model_type!r}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act: expected 'silu', got {act!r}")
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        rope = dict(rope) if rope else {}
        theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
        if d.get("partial_rotary_factor") is not None:
            rope.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in ("llama3", "yarn", "longrope", "su"):
            if d.get("original_max_position_embeddings") is not None:
                rope["original_max_position_embeddings"] = d["original_max_position_embeddings"]
            else:
                rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
        hf_only = ("rope_scaling", "rope_theta", "model_type", "dtype", "param_dtype", "scan_layers", "remat_policy",
                   "attention", "attention_chunk", "ring_zigzag", "ring_blocks", "loss_chunk", "mixed_window")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and f.name not in hf_only}
        kw.update(
            model_type=model_type, rope_theta=float(theta), rope_scaling=RopeScaling.from_hf(rope or None),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )
        return cls(**{**kw, **overrides})

    def to_hf(self) -> dict:
        """A config dict `transformers` loads: `rope_parameters` (5.x) plus `rope_theta`/`rope_scaling` (4.x)."""
        scaling = self.rope_scaling.to_hf(rope_theta=self.rope_theta, head_dim=self.head_dim)
        theta = self.rope_theta
        if scaling is not None and scaling.get("rope_type") == "default" and "rope_theta" in scaling:
            theta = scaling.pop("rope_theta")  # ntk exports as default with a scaled theta
            scaling = scaling if len(scaling) > 1 else None
        out = {
            "architectures": [HF_MODEL_TYPES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "rope_theta": theta,
            "rope_scaling": scaling,
            "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": theta},
        }
        if self.model_type == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        else:
            out["sliding_window"] = self.sliding_window
        return out

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)


def rules_of(module):
    """The logical-axis rules a model module uses: its own, else `parallel.DEFAULT_RULES`."""
    return module.rules if module.rules is not None else DEFAULT_RULES


def _constrain(module, x, names):
    if module.mesh is None:
        return x
    return nn.with_logical_constraint(x, names, rules=rules_of(module), mesh=module.mesh)


def flat_tokens(mesh) -> bool:
    """Whether projections, the MLP and the loss head run on [B*L, E] rows: without a mesh or on a
    one-device mesh. XLA:CPU computes a weight gradient contracted over one token axis as a plain
    matmul, but over (B, L) it first copies the cotangent into a transposed layout: a third of the tiny
    model's backward. A multi-device mesh keeps (B, L) for the sharding rules."""
    return mesh is None or mesh.devices.size == 1


def _on_cpu(module) -> bool:
    """Whether `module` runs on CPU devices with the sequence unsplit."""
    if module.mesh is None:
        return jax.default_backend() == "cpu"
    return module.mesh.devices.flat[0].platform == "cpu" and attn_lib.seq_shards(module.mesh, rules_of(module)) == 1


def _one_cpu_device(module) -> bool:
    """Whether `module` runs on one CPU device (no mesh, or a one-device mesh): where the C++ kernels
    (attention/cpu_kernel.py) and the 2-D projections apply."""
    return flat_tokens(module.mesh) and _on_cpu(module)


def _tokens(module, x_BxLxF):
    """`x` as [B*L, ...] where `flat_tokens`, else unchanged."""
    return x_BxLxF.reshape(-1, *x_BxLxF.shape[2:]) if flat_tokens(module.mesh) else x_BxLxF


def _untokens(module, x_TxF, like_BxLxE):
    """`_tokens`' inverse: [B*L, ...] back to the [B, L, ...] of `like`."""
    return x_TxF.reshape(*like_BxLxE.shape[:2], *x_TxF.shape[1:]) if flat_tokens(module.mesh) else x_TxF


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` of lhs's trailing axes with rhs's leading ones (no batch axes) as one 2-D matmul:
    the [E, H, D] kernels of the attention projections seen as [E, H*D] (and [H*D, E]). On XLA:CPU the
    3-D contraction's weight gradient goes through a transposing copy of the cotangent; this does not."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
    n = len(lhs_c)
    if lhs_b or rhs_b or tuple(lhs_c) != tuple(range(lhs.ndim - n, lhs.ndim)) or tuple(rhs_c) != tuple(range(n)):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    k = math.prod(rhs.shape[:n])
    out = jax.lax.dot_general(lhs.reshape(-1, k), rhs.reshape(k, -1), (((1,), (0,)), ((), ())), precision=precision,
                              preferred_element_type=preferred_element_type)
    return out.reshape(lhs.shape[:lhs.ndim - n] + rhs.shape[n:])


def _init(config: LlamaConfig, names: tuple[str, ...], init=None):
    init = init or nn.initializers.normal(config.initializer_range)
    return nn.with_logical_partitioning(init, names)


class RMSNorm(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        scale = self.param("scale", _init(cfg, ("embed",), nn.initializers.ones), (x.shape[-1],), cfg.jnp_param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        return scale.astype(cfg.jnp_dtype) * xf.astype(cfg.jnp_dtype)


class Attention(nn.Module):
    config: LlamaConfig
    mesh: Any = None
    rules: Any = None

    @nn.compact
    def __call__(self, x_BxLxE, cos, sin, positions_BxL, segment_ids_BxL, kv=None, kv_mask_BxLxS=None, kv_index=None):
        """Without `kv`: the attention output. With `kv` ({"k", "v"}: [B, S, K, D] buffers of one layer):
        writes this call's keys/values at `kv_index`, attends densely over the whole buffer under
        `kv_mask_BxLxS`, and returns `(output, new_kv)`. A `kv_mask_BxLxS` of None says the buffer held
        nothing before this call (a prefill): the tokens attend to each other only, with `_fill_kernel`."""
        cfg = self.config
        h, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        x_TxE = _tokens(self, x_BxLxE)
        dot = flat_dot_general if _one_cpu_device(self) else None  # None: DenseGeneral's own

        def proj(name, heads, axis):
            return nn.DenseGeneral(
                (heads, d), use_bias=cfg.attention_bias, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                kernel_init=_init(cfg, ("embed", axis, "head_dim")),
                bias_init=_init(cfg, (axis, "head_dim"), nn.initializers.zeros), dot_general=dot, name=name,
            )(x_TxE)

        q_BxLxHxD = apply_rotary(_untokens(self, proj("q_proj", h, "heads"), x_BxLxE), cos, sin)
        k_BxLxKxD = apply_rotary(_untokens(self, proj("k_proj", kv_heads, "kv_heads"), x_BxLxE), cos, sin)
        v_BxLxKxD = _untokens(self, proj("v_proj", kv_heads, "kv_heads"), x_BxLxE)
        q_BxLxHxD = _constrain(self, q_BxLxHxD, ("batch", "length", "heads", "head_dim"))
        if kv is None:
            o_BxLxHxD = self._attend(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, positions_BxL, segment_ids_BxL)
        else:
            # Decoding: dense over the cache; the mask (positions, segments) hides empty slots.
            fresh = kv_mask_BxLxS is None
            k_BxSxKxD, v_BxSxKxD = (self._write(kv[n], x, kv_index, fresh) for n, x in (("k", k_BxLxKxD), ("v", v_BxLxKxD)))
            if kv_mask_BxLxS is None:
                o_BxLxHxD = self._fill_kernel(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, positions_BxL, segment_ids_BxL)
            else:
                o_BxLxHxD = attn_lib.dense_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, kv_mask_BxLxS)
        out_BxLxE = nn.DenseGeneral(
            cfg.hidden_size, axis=(-2, -1), use_bias=cfg.attention_bias, dtype=cfg.jnp_dtype,
            param_dtype=cfg.jnp_param_dtype, kernel_init=_init(cfg, ("heads", "head_dim", "embed")),
            bias_init=_init(cfg, ("embed",), nn.initializers.zeros), dot_general=dot, name="o_proj",
        )(_tokens(self, o_BxLxHxD))
        out_BxLxE = _untokens(self, out_BxLxE, x_BxLxE)
        if kv is None:
            return out_BxLxE
        return out_BxLxE, {"k": k_BxSxKxD, "v": v_BxSxKxD}


    def _write(self, buffer_BxSxKxD, new_BxLxKxD, index, fresh: bool):
        """The cache buffer with the new keys (or values) at slots [index, index + L). A `fresh` fill starts
        at slot 0 of an empty buffer; its tokens may run past the buffer only with padding (segment 0)."""
        new_BxLxKxD = new_BxLxKxD.astype(buffer_BxSxKxD.dtype)
        names = ("batch", "cache_length", "kv_heads", "head_dim")
        if fresh:
            return _constrain(self, fit_length(new_BxLxKxD, buffer_BxSxKxD.shape[1]), names)
        if self.mesh is None:
            return jax.lax.dynamic_update_slice_in_dim(buffer_BxSxKxD, new_BxLxKxD, index, axis=1)
        # On a mesh the slots are split over devices: a select keeps every shard in place, where a
        # dynamic_update_slice at a traced slot would gather the buffer.
        slots_S = jnp.arange(buffer_BxSxKxD.shape[1])
        hit_S = (slots_S >= index) & (slots_S < index + new_BxLxKxD.shape[1])
        picked = jnp.take(new_BxLxKxD, jnp.clip(slots_S - index, 0, new_BxLxKxD.shape[1] - 1), axis=1)
        return _constrain(self, jnp.where(hit_S[None, :, None, None], picked, buffer_BxSxKxD), names)

    def _fill_kernel(self, q, k, v, positions, segment_ids):
        """A prefill's attention: the ring when the mesh splits the sequence; else blockwise (O(L x chunk))
        unless the config is dense or the length does not split into chunks."""
        cfg = self.config
        length, chunk = q.shape[1], cfg.attention_chunk
        if attn_lib.seq_shards(self.mesh, rules_of(self)) > 1:
            return attn_lib.ring_attention(q, k, v, positions, segment_ids, mesh=self.mesh, rules=rules_of(self),
                                           chunk=chunk, sliding_window=cfg.sliding_window, zigzag=False,
                                           block_kernel=cfg.ring_blocks)
        if (o := self._cpu_flash(q, k, v, positions, segment_ids)) is not None:
            return o
        if cfg.attention == "dense" or (length > chunk and length % chunk):
            mask = attn_lib.attention_mask(positions, positions, segment_ids, segment_ids, cfg.sliding_window)
            return attn_lib.dense_attention(q, k, v, mask)
        return attn_lib.blockwise_attention(q, k, v, positions, positions, segment_ids, segment_ids, chunk=chunk,
                                            sliding_window=cfg.sliding_window, q_chunk=self._q_chunk(q, chunk))

    def _cpu_flash(self, q, k, v, positions, segment_ids):
        """`dense` and `blockwise` attention as the CPU flash kernel (attention/cpu_kernel.py) on one CPU
        device, in float32, at shapes it takes, once built (same numbers to rounding); else None."""
        if self.config.attention not in ("dense", "blockwise") or not _one_cpu_device(self):
            return None
        if not attn_lib.cpu_kernel.supports(q, k):
            return None
        return attn_lib.flash_attention(q, k, v, positions, positions, segment_ids, segment_ids,
                                        sliding_window=self.config.sliding_window)

    def _cpu_block(self, q_BxLxHxD) -> int:
        """`cpu_blocks`' square block size for these queries (rows = batch x query heads)."""
        b, length, h, _ = q_BxLxHxD.shape
        return attn_lib.cpu_blocks(length, b * h)[0]

    def _cpu_blockwise(self, length: int) -> bool:
        """Whether `dense` runs as CPU-sized blockwise attention: on CPU, at a length that splits into
        CPU_CHUNK blocks (see benchmarks/attention.py for the crossover)."""
        return length >= attn_lib.CPU_BLOCKWISE_MIN and not length % attn_lib.CPU_CHUNK and _on_cpu(self)

    def _q_chunk(self, q_BxLxHxD, chunk: int):
        """Blockwise query rows per block: on CPU, those of `cpu_blocks` where they are a multiple of
        `chunk` and divide the length (fewer loop steps, same numbers); elsewhere `chunk` (None)."""
        length, rows = q_BxLxHxD.shape[1], self._cpu_block(q_BxLxHxD)
        return rows if rows > chunk and not rows % chunk and not length % rows and _on_cpu(self) else None

    def _attend(self, q, k, v, positions, segment_ids):
        cfg = self.config
        if (o := self._cpu_flash(q, k, v, positions, segment_ids)) is not None:
            return o
        if cfg.attention == "dense" and self._cpu_blockwise(q.shape[1]):
            # Same numbers (to float32 rounding) as dense; on XLA:CPU the [B,H,L,L] scores of dense are
            # memory-bound passes while `cpu_blocks` blocks stay in cache and skip fully masked pairs.
            block = self._cpu_block(q)
            return attn_lib.blockwise_attention(
                q, k, v, positions, positions, segment_ids, segment_ids,
                chunk=block, sliding_window=cfg.sliding_window, q_chunk=block,
            )
        if cfg.attention == "dense":
            mask = attn_lib.attention_mask(positions, positions, segment_ids, segment_ids, cfg.sliding_window)
            return attn_lib.dense_attention(q, k, v, mask)
        if cfg.attention == "blockwise":
            return attn_lib.blockwise_attention(
                q, k, v, positions, positions, segment_ids, segment_ids,
                chunk=cfg.attention_chunk, sliding_window=cfg.sliding_window,
                q_chunk=self._q_chunk(q, cfg.attention_chunk),
            )
        if cfg.attention == "ring":
            return attn_lib.ring_attention(
                q, k, v, positions, segment_ids, mesh=self.mesh, rules=rules_of(self),
                chunk=cfg.attention_chunk, sliding_window=cfg.sliding_window, zigzag=cfg.ring_zigzag,
                block_kernel=cfg.ring_blocks,
            )
        return attn_lib.splash_attention(q, k, v, segment_ids, mesh=self.mesh, rules=rules_of(self))


class MLP(nn.Module):
    config: LlamaConfig
    mesh: Any = None
    rules: Any = None

    @nn.compact
    def __call__(self, x_BxLxE):
        cfg = self.config

        def dense(name, features, names):
            return nn.Dense(
                features, use_bias=cfg.mlp_bias, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                kernel_init=_init(cfg, names), bias_init=_init(cfg, names[1:], nn.initializers.zeros), name=name,
            )

        x_TxE = _tokens(self, x_BxLxE)  # T = B*L where `flat_tokens`, else (B, L)
        gate_TxM = dense("gate_proj", cfg.intermediate_size, ("embed", "mlp"))(x_TxE)
        up_TxM = dense("up_proj", cfg.intermediate_size, ("embed", "mlp"))(x_TxE)
        h_TxM = nn.silu(gate_TxM) * up_TxM
        if not flat_tokens(self.mesh):
            h_TxM = _constrain(self, h_TxM, ("batch", "length", "mlp"))
        out_TxE = dense("down_proj", cfg.hidden_size, ("mlp", "embed"))(h_TxM)
        return _untokens(self, out_TxE, x_BxLxE)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    mesh: Any = None
    rules: Any = None

    @nn.compact
    def __call__(self, x_BxLxE, cos, sin, positions_BxL, segment_ids_BxL, kv=None, kv_mask_BxLxS=None, kv_index=None):
        """Returns (x, new_kv); new_kv is None without a cache (the per-layer output of `nn.scan`)."""
        cfg = self.config
        attn = Attention(cfg, self.mesh, self.rules, name="self_attn")
        h = attn(RMSNorm(cfg, name="input_layernorm")(x_BxLxE), cos, sin, positions_BxL, segment_ids_BxL,
                 kv, kv_mask_BxLxS, kv_index)
        h, kv = (h, None) if kv is None else h
        x_BxLxE = x_BxLxE + h
        x_BxLxE = x_BxLxE + MLP(cfg, self.mesh, self.rules, name="mlp")(RMSNorm(cfg, name="post_attention_layernorm")(x_BxLxE))
        return _constrain(self, x_BxLxE, ("batch", "length", "embed")), kv


class Embed(nn.Module):
    """Token embedding; `attend` gives tied logits. The table is sharded over `embed` for storage but
    gathered along it before use, so the lookup never forces a full activation onto every device."""

    config: LlamaConfig
    mesh: Any = None
    rules: Any = None

    def setup(self):
        cfg = self.config
        self.embedding = self.param(
            "embedding", _init(cfg, ("vocab", "embed")), (cfg.vocab_size, cfg.hidden_size), cfg.jnp_param_dtype
        )

    def _table(self):
        return _constrain(self, self.embedding, ("vocab", None)).astype(self.config.jnp_dtype)

    def __call__(self, tokens_BxL):
        return jnp.take(self._table(), tokens_BxL, axis=0)

    def attend(self, x_BxLxE):
        return jnp.einsum("ble,ve->blv", x_BxLxE, self._table())


class Llama(nn.Module):
    """LLaMA causal LM. `apply({'params': p}, tokens, positions, segment_ids)` -> float32 logits [B, L, V].

    `positions` default to arange(L); `segment_ids` (default all ones) keep packed documents apart.
    `rope_scaling` overrides the config's (it may hold traced LongRoPE factors / start_tokens).
    `mesh` and `rules` (logical -> mesh axes; default `parallel.DEFAULT_RULES` when a mesh is given)
    shard activations; without a mesh the model runs unconstrained.

    With `cache` (from `init_cache`) it returns `(logits, new_cache)`: see `_cached_layers`.
    """

    config: LlamaConfig
    mesh: Any = None
    rules: Any = None

    @nn.compact
    def __call__(self, tokens_BxL, positions=None, segment_ids=None, rope_scaling: RopeScaling | None = None,
                 balanced: bool = False, cache: dict | None = None, logits_at=None, hidden: bool = False,
                 fresh_cache: bool = False):
        """`balanced=True` says the inputs already are in the ring's zig-zag order (the data layer
        reordered them, positions included); logits then come back in that order too. Otherwise,
        with ring attention and `ring_zigzag`, the model reorders on entry and restores on exit.

        With a `cache`, `positions` default to `cache["index"] + arange(L)` and `segment_ids` must be
        >= 1 (0 marks empty cache slots); the attention kernel is always dense over the cache.
        `logits_at` (cached calls only; an index into L, may be traced) returns the logits of that one
        token, [B, 1, V], rather than [B, L, V] (a prefill needs only the last). `fresh_cache=True` says
        the cache holds nothing yet and the L tokens fill it from slot 0 (prefill, re-prefill): they attend
        to each other with the config's memory-efficient kernel instead of densely over every slot. `hidden=True` returns the
        final-norm hidden states [B, L, E] instead of logits: `loss.py` applies the head chunk by chunk."""
        cfg = self.config
        b, length = tokens_BxL.shape
        if logits_at is not None and cache is None:
            raise ValueError("Llama: logits_at is for cached calls; pass cache= too")
        if positions is None:
            positions = jnp.arange(length, dtype=jnp.int32)
            if cache is not None:
                positions = positions + cache["index"]
        positions_BxL = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, length))
        if segment_ids is None:
            segment_ids = jnp.ones((b, length), jnp.int32)
        segment_ids_BxL = jnp.broadcast_to(jnp.asarray(segment_ids, jnp.int32), (b, length))
        shards = 1
        if cfg.attention == "ring" and cache is None:
            shards = attn_lib.seq_shards(self.mesh, rules_of(self))
        reorder = cfg.ring_zigzag and shards > 1 and not balanced
        if reorder:
            tokens_BxL, positions_BxL, segment_ids_BxL = (
                attn_lib.zigzag(x, shards) for x in (tokens_BxL, positions_BxL, segment_ids_BxL)
            )

        embed = Embed(cfg, self.mesh, self.rules, name="embed_tokens")
        x_BxLxE = _constrain(self, embed(tokens_BxL), ("batch", "length", "embed"))
        cos, sin = rope_cos_sin(
            rope_scaling if rope_scaling is not None else cfg.rope_scaling, positions_BxL,
            head_dim=cfg.head_dim, theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
            segment_ids=segment_ids_BxL if cfg.mixed_window and cache is None else None,
        )
        if _one_cpu_device(self):
            # Otherwise XLA:CPU fuses cos/sin into each rotary consumer and evaluates them once per head.
            cos, sin = attn_lib.cpu_kernel.materialize(cos), attn_lib.cpu_kernel.materialize(sin)

        block = DecoderLayer
        if cfg.remat_policy != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        args = (cos, sin, positions_BxL, segment_ids_BxL)
        new_cache = None
        if cache is not None:
            x_BxLxE, new_cache = self._cached_layers(block, x_BxLxE, args, cache, fresh_cache)
        elif cfg.scan_layers:
            stack = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast,) * len(args), length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.mesh, self.rules, name="layers")
            x_BxLxE, _ = stack(x_BxLxE, *args)
        else:
            for i in range(cfg.num_hidden_layers):
                x_BxLxE, _ = block(cfg, self.mesh, self.rules, name=f"layers_{i}")(x_BxLxE, *args)

        if logits_at is not None:
            x_BxLxE = jax.lax.dynamic_slice_in_dim(x_BxLxE, logits_at, 1, axis=1)
        x_BxLxE = RMSNorm(cfg, name="norm")(x_BxLxE)
        if hidden and cache is None:  # (init never asks for it, so the head's parameters exist)
            return attn_lib.unzigzag(x_BxLxE, shards) if reorder else x_BxLxE
        if cfg.tie_word_embeddings:
            logits_BxLxV = embed.attend(x_BxLxE)
        else:
            logits_BxLxV = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                kernel_init=_init(cfg, ("embed", "vocab")), name="lm_head",
            )(x_BxLxE)
        logits_BxLxV = _constrain(self, logits_BxLxV, ("batch", "length", "vocab")).astype(jnp.float32)
        if new_cache is not None:
            return logits_BxLxV, new_cache
        return attn_lib.unzigzag(logits_BxLxV, shards) if reorder else logits_BxLxV

    def _cached_layers(self, block, x_BxLxE, args, cache, fresh: bool = False):
        """The layer stack over a KV cache: the L new tokens go to slots [index, index + L).

        Queries attend to every slot whose (position, segment) the mask allows, so slots with
        segment id 0 (empty, or padding a caller wrote there) are never seen by real tokens.
        """
        cfg = self.config
        _, _, positions_BxL, segment_ids_BxL = args
        index = cache["index"]
        def write(buffer_BxS, new_BxL):
            if fresh:
                return fit_length(new_BxL, buffer_BxS.shape[1])
            return jax.lax.dynamic_update_slice_in_dim(buffer_BxS, new_BxL, index, axis=1)

        k_pos_BxS, k_seg_BxS = (_constrain(self, write(cache[n], x), ("batch", "cache_length"))
                                for n, x in (("positions", positions_BxL), ("segment_ids", segment_ids_BxL)))
        mask_BxLxS = None if fresh else attn_lib.attention_mask(positions_BxL, k_pos_BxS, segment_ids_BxL, k_seg_BxS,
                                                                cfg.sliding_window)
        kv = {"k": cache["k"], "v": cache["v"]}  # [layers, B, S, K, D] each
        if cfg.scan_layers:
            stack = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast,) * len(args) + (0, nn.broadcast, nn.broadcast), length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.mesh, self.rules, name="layers")
            x_BxLxE, kv = stack(x_BxLxE, *args, kv, mask_BxLxS, index)
        else:
            layers = []
            for i in range(cfg.num_hidden_layers):
                kv_i = jax.tree.map(lambda a: a[i], kv)
                x_BxLxE, kv_i = block(cfg, self.mesh, self.rules, name=f"layers_{i}")(
                    x_BxLxE, *args, kv_i, mask_BxLxS, index)
                layers.append(kv_i)
            kv = jax.tree.map(lambda *a: jnp.stack(a), *layers)
        length = positions_BxL.shape[1]
        return x_BxLxE, {**kv, "positions": k_pos_BxS, "segment_ids": k_seg_BxS, "index": index + length}


def fit_length(x, length: int):
    """`x` cut or zero-padded along axis 1 to `length` (a fill's tokens against its cache's slots)."""
    if x.shape[1] >= length:
        return x[:, :length]
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def init_cache(config: LlamaConfig, batch: int, max_len: int) -> dict:
    """An empty KV cache of `max_len` slots, in the model's compute dtype.

    k, v: [layers, B, S, K, D] (stacked per layer, as the scanned parameters are); positions and
    segment_ids [B, S] of the cached keys (segment 0 = empty); index: the next slot to write.
    """
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return {
        "k": jnp.zeros(shape, config.jnp_dtype),
        "v": jnp.zeros(shape, config.jnp_dtype),
        "positions": jnp.zeros((batch, max_len), jnp.int32),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def init_params(config: LlamaConfig, rng: jax.Array, length: int = 8) -> dict:
    """Unboxed random parameters (for sharded init see the parallel module)."""
    tokens = jnp.zeros((1, length), jnp.int32)
    dense = dataclasses.replace(config, attention="dense")  # the parameters do not depend on the kernel
    return nn.meta.unbox(Llama(dense).init(rng, tokens)["params"])
