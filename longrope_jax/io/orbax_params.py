"""Our own checkpoint format: an Orbax checkpoint of the params next to `llama_config.json`
(every `LlamaConfig` field, the JAX-side ones included)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from longrope_jax.io.files import atomic_dir, check_destination, first_line, parse_json_object
from longrope_jax.io.param_map import ConversionError, check_hf_can_run, check_param_tree, flatten_params, float_dtype
from longrope_jax.model import LlamaConfig
from longrope_jax.rope import RopeScaling

JAX_CONFIG_FILE = "llama_config.json"
JAX_PARAMS_DIR = "params"


def config_to_json(config: LlamaConfig) -> str:
    """Every LlamaConfig field (rope_scaling as its non-default fields), as JSON."""
    d = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        d[f.name] = _rope_to_dict(v) if f.name == "rope_scaling" else _plain(v)
    return json.dumps(d, indent=2) + "\n"


def _rope_to_dict(s: RopeScaling) -> dict:
    out = {"rope_type": s.rope_type}
    for f in dataclasses.fields(s):
        v = getattr(s, f.name)
        if f.name != "rope_type" and not (isinstance(v, (type(None), int, float, str, tuple)) and v == f.default):
            out[f.name] = _plain(v)
    return out


def _plain(v):
    if isinstance(v, (np.ndarray, jax.Array, np.generic)):
        return np.asarray(v).tolist()  # concrete LongRoPE factors / start_tokens
    return list(v) if isinstance(v, tuple) else v


def config_from_json(text: str, source: str = JAX_CONFIG_FILE) -> LlamaConfig:
    """Inverse of `config_to_json`; missing fields take their defaults, unknown ones are errors."""
    d = parse_json_object(text, source, "a JSON object", ConversionError)
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConversionError(f"{source}: unknown LlamaConfig field(s) {unknown}; expected only {sorted(fields)}")
    rope = d.pop("rope_scaling", None) or {}
    rope_fields = {f.name for f in dataclasses.fields(RopeScaling)}
    if not isinstance(rope, dict) or set(rope) - rope_fields:
        raise ConversionError(f"{source}: rope_scaling {rope!r:.120}; expected an object with keys from {sorted(rope_fields)}")
    try:
        return LlamaConfig(rope_scaling=RopeScaling(**rope), **d)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None


def save_jax(config: LlamaConfig, params, path, overwrite: bool = False, protect: dict | None = None) -> Path:
    """Orbax checkpoint of `params` in `path/params` plus `path/llama_config.json`.

    The tree must match `config` (scanned exactly when `config.scan_layers`). `path` follows the rules of
    `files.check_destination` (an empty directory is written into; `protect` paths are never replaced).
    """
    import orbax.checkpoint as ocp  # here, not at the top: slow to import, and every CLI command loads us

    dst = Path(path)
    check_destination(dst, overwrite, protect)
    check_hf_can_run(config)
    flat = flatten_params(params)
    check_param_tree(config, flat, config.scan_layers)
    with atomic_dir(dst, overwrite, protect) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((tmp / JAX_PARAMS_DIR).absolute(), traverse_util.unflatten_dict(flat))
            ckptr.wait_until_finished()
        (tmp / JAX_CONFIG_FILE).write_text(config_to_json(config))
    return dst


def load_jax(path, dtype=None) -> tuple[LlamaConfig, dict]:
    """Read `save_jax` output onto the default device; `dtype` casts params and sets param_dtype."""
    import orbax.checkpoint as ocp  # here, not at the top: slow to import, and every CLI command loads us

    src = Path(path)
    config_path, params_path = src / JAX_CONFIG_FILE, src / JAX_PARAMS_DIR
    for p in (config_path, params_path):
        if not p.exists():
            raise FileNotFoundError(f"{p}: not found; expected a checkpoint written by save_jax (longrope-jax convert hf-to-jax)")
    config = config_from_json(config_path.read_text(), str(config_path))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        try:
            meta = ckptr.metadata(params_path.absolute()).item_metadata
        except Exception as e:  # noqa: BLE001 (orbax and tensorstore raise many kinds; all mean "unreadable")
            raise ConversionError(f"{params_path}: unreadable Orbax metadata ({first_line(e)}); expected save_jax "
                                  "output") from e
        if meta is None:
            raise ConversionError(f"{params_path}: holds no Orbax checkpoint metadata; expected save_jax output")
        # Restore onto one local device whatever sharding the writer had (it may have been a pod).
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta.tree)
        try:
            params = ckptr.restore(params_path.absolute(), target)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{params_path}: corrupt Orbax checkpoint, its arrays do not read back "
                                  f"({first_line(e)}); expected complete save_jax output") from e
    check_param_tree(config, flatten_params(params), config.scan_layers)
    if dtype is not None:
        dt = float_dtype(dtype, "load_jax")
        params = jax.tree.map(lambda x: x.astype(dt), params)
        config = dataclasses.replace(config, param_dtype=dt.name)
    return config, params
