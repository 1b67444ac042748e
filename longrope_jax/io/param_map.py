"""The HF <-> Flax parameter mapping: which tensor goes where, transposed and reshaped how.

HF keeps rotary pairs in the rotate_half layout that `Llama` uses too, so q/k need no permutation:
the mapping is only transposes and reshapes. `param_shapes` gives the tree `init_params` builds, for
the scanned (`layers`, leading [num_hidden_layers] axis) and the unscanned (`layers_<i>`) layouts;
`check_hf_can_run` refuses what transformers' LlamaForCausalLM cannot run.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from longrope_jax.model import DTYPES, LlamaConfig


class ConversionError(ValueError):
    """A checkpoint or parameter tree that does not match what the config says it should hold."""


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One HF tensor and where it lives in the (unscanned) Flax tree.

    `transpose`: HF stores Linear weights [out, in], Flax kernels are [in, out] (then split into
    heads by reshape). Everything else is a plain reshape.
    """

    hf_name: str
    path: tuple[str, ...]  # inside layer `layer` when that is not None, else from the root
    layer: int | None
    hf_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]
    transpose: bool = False

    def to_flax(self, w: np.ndarray) -> np.ndarray:
        return (w.T if self.transpose else w).reshape(self.flax_shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.transpose:
            return x.reshape(self.hf_shape[::-1]).T
        return x.reshape(self.hf_shape)

    def flax_key(self) -> tuple[str, ...]:
        return self.path if self.layer is None else (f"layers_{self.layer}", *self.path)


def _layer_specs(c: LlamaConfig, i: int) -> list[WeightSpec]:
    e, m, h, k, d = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    pre = f"model.layers.{i}."
    specs = [
        WeightSpec(pre + "input_layernorm.weight", ("input_layernorm", "scale"), i, (e,), (e,)),
        WeightSpec(pre + "post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), i, (e,), (e,)),
    ]
    for name, heads in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
        specs.append(WeightSpec(pre + f"self_attn.{name}.weight", ("self_attn", name, "kernel"), i, (heads * d, e), (e, heads, d), True))
        if c.attention_bias:
            specs.append(WeightSpec(pre + f"self_attn.{name}.bias", ("self_attn", name, "bias"), i, (heads * d,), (heads, d)))
    specs.append(WeightSpec(pre + "self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), i, (e, h * d), (h, d, e), True))
    if c.attention_bias:
        specs.append(WeightSpec(pre + "self_attn.o_proj.bias", ("self_attn", "o_proj", "bias"), i, (e,), (e,)))
    for name, n_in, n_out in (("gate_proj", e, m), ("up_proj", e, m), ("down_proj", m, e)):
        specs.append(WeightSpec(pre + f"mlp.{name}.weight", ("mlp", name, "kernel"), i, (n_out, n_in), (n_in, n_out), True))
        if c.mlp_bias:
            specs.append(WeightSpec(pre + f"mlp.{name}.bias", ("mlp", name, "bias"), i, (n_out,), (n_out,)))
    return specs


def weight_specs(config: LlamaConfig) -> list[WeightSpec]:
    """Every tensor of the HF checkpoint for `config`, in HF module order."""
    v, e = config.vocab_size, config.hidden_size
    specs = [WeightSpec("model.embed_tokens.weight", ("embed_tokens", "embedding"), None, (v, e), (v, e))]
    for i in range(config.num_hidden_layers):
        specs += _layer_specs(config, i)
    specs.append(WeightSpec("model.norm.weight", ("norm", "scale"), None, (e,), (e,)))
    if not config.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", ("lm_head", "kernel"), None, (v, e), (e, v), True))
    return specs


def param_shapes(config: LlamaConfig, scanned: bool | None = None) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {path: shape} of the `Llama` params; `scanned` defaults to `config.scan_layers`."""
    scanned = config.scan_layers if scanned is None else scanned
    n = config.num_hidden_layers
    shapes = {}
    for w in weight_specs(config):
        if w.layer is None:
            shapes[w.path] = w.flax_shape
        elif scanned:
            shapes[("layers", *w.path)] = (n, *w.flax_shape)
        else:
            shapes[w.flax_key()] = w.flax_shape
    return shapes


def check_param_tree(config: LlamaConfig, flat: dict, scanned: bool) -> None:
    """A ConversionError naming the first missing, unexpected or misshapen leaf of `flat`."""
    expected = param_shapes(config, scanned)
    missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
    unexpected = sorted("/".join(k) for k in flat.keys() - expected.keys())
    layout = "scanned ('layers')" if scanned else "unscanned ('layers_<i>')"
    if missing:
        raise ConversionError(f"params: missing {short_list(missing)} (expected by the config, {layout} layout)")
    if unexpected:
        raise ConversionError(f"params: unexpected {short_list(unexpected)} (not in the config's {layout} layout)")
    for key, shape in expected.items():
        got = tuple(np.shape(flat[key]))
        if got != shape:
            raise ConversionError(f"params/{'/'.join(key)}: shape {got}; expected {shape}")


def flatten_params(params) -> dict[tuple[str, ...], object]:
    """{('layers_0', 'mlp', ...): leaf} from a params tree."""
    if set(params) == {"params"}:  # accept the {'params': ...} variables dict as well
        params = params["params"]
    return traverse_util.flatten_dict(params)


def short_list(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def float_dtype(dtype, what: str) -> np.dtype:
    dt = np.dtype(jnp.dtype(dtype))
    if dt.name not in DTYPES:
        raise ConversionError(f"{what}: dtype {dt.name!r}; expected one of {DTYPES}")
    return dt


def check_hf_can_run(config: LlamaConfig) -> None:
    """Refuse what LlamaForCausalLM cannot run; warn about what it silently drops."""
    if config.rope_scaling.partial_rotary_factor != 1.0:
        raise ConversionError(
            f"rope_scaling.partial_rotary_factor: {config.rope_scaling.partial_rotary_factor}; "
            "transformers' LlamaForCausalLM rotates the whole head_dim, so only 1.0 exports"
        )
    if config.rope_scaling.rope_type == "longrope" and config.rope_scaling.start_tokens:
        warnings.warn(
            f"rope_scaling.start_tokens={config.rope_scaling.start_tokens} is written to config.json but "
            "transformers ignores it: HF logits will differ from longrope_jax's", stacklevel=3,
        )
