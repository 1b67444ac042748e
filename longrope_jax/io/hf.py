"""Hugging Face LLaMA directories <-> `Llama` parameters.

`load_hf` / `save_hf` read and write HF directories (config.json + safetensors, single file or
sharded with an index); loading needs no torch. The tensor mapping itself lives in `param_map`.
Every writer builds its result in a temporary sibling directory and renames it into place, so DST
is untouched when anything fails.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from longrope_jax.io import safetensors as sio
from longrope_jax.io.files import atomic_dir, check_destination, read_json_object
from longrope_jax.io.param_map import (
    ConversionError,
    WeightSpec,
    check_hf_can_run,
    check_param_tree,
    flatten_params,
    float_dtype,
    short_list,
    weight_specs,
)
from longrope_jax.model import LlamaConfig
from longrope_jax.rope import RopeScaling

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Older LLaMA checkpoints saved this non-persistent buffer; it is recomputed from the config.
_IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_PROGRESS_BYTES = 1 << 30  # show a progress bar above 1 GiB of weights


# ---- reading HF ------------------------------------------------------------------------------------


def read_hf_config(src: Path) -> LlamaConfig:
    path = src / CONFIG_FILE
    d = read_json_object(path, "", "a Hugging Face model directory with config.json", ConversionError)
    try:
        config = LlamaConfig.from_hf(d)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{path}: {e}") from None
    params, legacy = d.get("rope_parameters"), d.get("rope_scaling")
    if isinstance(params, dict) and isinstance(legacy, dict):  # both written: they must say the same
        try:
            same = RopeScaling.from_hf({k: v for k, v in params.items() if k != "rope_theta"}) == RopeScaling.from_hf(
                {k: v for k, v in legacy.items() if k != "rope_theta"})
        except ValueError:
            same = False
        if not same:
            raise ConversionError(f"{path}: rope_parameters {params} and rope_scaling {legacy} disagree; expected "
                                  "one of them, or both the same")
    original = config.rope_scaling.original_max_position_embeddings
    if original and original > config.max_position_embeddings:
        raise ConversionError(
            f"{path}: rope_scaling.original_max_position_embeddings {original} is more than max_position_embeddings "
            f"{config.max_position_embeddings}; expected the extended context (max_position_embeddings) to be at "
            "least the original one")
    return config


def _with_overrides(config: LlamaConfig, **overrides) -> LlamaConfig:
    # Applied after from_hf, so any field (rope_scaling included) can be overridden the same way.
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(LlamaConfig)})
    if unknown:
        raise ConversionError(f"config overrides: unknown LlamaConfig field(s) {unknown}")
    return dataclasses.replace(config, **overrides)


def _bin_only_error(src: Path, bins: list[Path]) -> ConversionError:
    return ConversionError(
        f"{src}: holds only PyTorch weights ({', '.join(b.name for b in bins)}); expected {SAFETENSORS_FILE} "
        f"or {INDEX_FILE}. Convert them first (needs torch): python -c \"from transformers import "
        f"AutoModelForCausalLM as M; M.from_pretrained('{src}').save_pretrained('{src}-safetensors', "
        f"safe_serialization=True)\""
    )


def open_hf_weights(src: Path) -> dict[str, sio.SafetensorsFile]:
    """{tensor name: the open file holding it}, from the index when the checkpoint is sharded."""
    single, index = src / SAFETENSORS_FILE, src / INDEX_FILE
    if single.is_file():  # transformers prefers the single file too when both exist
        f = _open_safetensors(single)
        return {name: f for name in f.keys()}
    if index.is_file():
        return _open_sharded(src, index)
    bins = sorted(src.glob("pytorch_model*.bin")) + sorted(src.glob("pytorch_model*.bin.index.json"))
    if bins:
        raise _bin_only_error(src, bins)
    raise FileNotFoundError(f"{src}: no {SAFETENSORS_FILE} or {INDEX_FILE}; expected safetensors weights")


def _open_safetensors(path: Path) -> sio.SafetensorsFile:
    try:
        return sio.SafetensorsFile(path)
    except sio.SafetensorsError as e:
        raise ConversionError(str(e)) from None  # one error type for every bad checkpoint


def _open_sharded(src: Path, index: Path) -> dict[str, sio.SafetensorsFile]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ConversionError(f"{index}: not a JSON object with a weight_map ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"{index}: weight_map is {weight_map!r:.80}; expected an object of tensor -> file name")
    shards = {}
    for shard in sorted(set(weight_map.values())):
        path = src / shard
        if Path(shard).name != shard:
            raise ConversionError(f"{index}: shard {shard!r} is not a plain file name inside {src}")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard named by {index} does not exist")
        shards[shard] = _open_safetensors(path)
    for name, shard in weight_map.items():
        if name not in shards[shard]:
            raise ConversionError(f"{src / shard}: has no tensor {name!r}, which {index} says it holds")
    return {name: shards[shard] for name, shard in weight_map.items()}


def _check_hf_tensors(src: Path, config: LlamaConfig, files: dict[str, sio.SafetensorsFile]) -> list[WeightSpec]:
    specs = weight_specs(config)
    expected = {w.hf_name for w in specs}
    present = {n for n in files if not _IGNORED_HF_TENSORS.fullmatch(n)}
    if config.tie_word_embeddings and "lm_head.weight" in present:
        _check_tied_head(files)
        present.discard("lm_head.weight")
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing:
        raise ConversionError(f"{src}: missing tensor(s) {short_list(missing)} that {CONFIG_FILE} implies")
    if unexpected:
        raise ConversionError(f"{src}: unexpected tensor(s) {short_list(unexpected)} that {CONFIG_FILE} does not describe")
    for w in specs:
        f = files[w.hf_name]
        info = f.tensors[w.hf_name]
        if info.shape != w.hf_shape:
            raise ConversionError(f"{f.path}: tensor {w.hf_name!r} has shape {info.shape}; expected {w.hf_shape}")
        if sio.dtype_name(info.dtype) not in _FLOAT_DTYPES:
            raise ConversionError(f"{f.path}: tensor {w.hf_name!r} has dtype {info.dtype}; expected a float type")
    return specs


def _check_tied_head(files: dict[str, sio.SafetensorsFile]) -> None:
    head, embed = files["lm_head.weight"], files.get("model.embed_tokens.weight")
    if embed is not None and not np.array_equal(head.get("lm_head.weight"), embed.get("model.embed_tokens.weight")):
        raise ConversionError(
            f"{head.path}: tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' but "
            f"{CONFIG_FILE} has tie_word_embeddings=true"
        )


def load_hf(path, dtype=jnp.float32, **config_overrides) -> tuple[LlamaConfig, dict]:
    """Read a HF LLaMA/Mistral directory into `(LlamaConfig, params)` with params of `dtype`.

    `dtype` also sets `config.param_dtype`; `config_overrides` set other fields (e.g.
    `scan_layers=True`, `attention=...`). The compute dtype (`LlamaConfig.dtype`) stays float32;
    change it with `dataclasses.replace`.
    """
    src = Path(path)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a directory; expected a Hugging Face model directory")
    if "param_dtype" in config_overrides:
        raise ConversionError("load_hf: pass dtype= rather than param_dtype= (it sets both)")
    dt = float_dtype(dtype, "load_hf")
    config = _with_overrides(read_hf_config(src), param_dtype=dt.name, **config_overrides)
    files = open_hf_weights(src)
    specs = _check_hf_tensors(src, config, files)
    flat = {}
    total = sum(files[w.hf_name].tensors[w.hf_name].nbytes for w in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {src.name}", disable=total < _PROGRESS_BYTES) as bar:
        for w in specs:
            f = files[w.hf_name]
            flat[w.flax_key()] = w.to_flax(f.get(w.hf_name)).astype(dt)
            bar.update(f.tensors[w.hf_name].nbytes)
    if config.scan_layers:
        flat = _stack_layers(config, flat)
    params = traverse_util.unflatten_dict({k: jnp.asarray(flat.pop(k)) for k in list(flat)})
    return config, params


def _stack_layers(config: LlamaConfig, flat: dict) -> dict:
    """layers_<i>/... leaves -> one `layers/...` leaf with a leading [num_hidden_layers] axis."""
    n = config.num_hidden_layers
    layer_paths = [k[1:] for k in flat if k[0] == "layers_0"]
    for p in layer_paths:
        flat[("layers", *p)] = np.stack([flat.pop((f"layers_{i}", *p)) for i in range(n)])
    return flat


# ---- writing HF ------------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB' (10**9) or '2GiB' (2**30), as transformers reads them."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ConversionError(f"max_shard_size: {size!r}; expected bytes or a size like '500MB', '5GB', '2GiB'")
        unit = (m.group(2) or "").lower()
        scale = 1 if not unit else (1024 if unit.endswith("i") else 1000) ** ("kmgt".index(unit[0]) + 1)
        value = int(float(m.group(1)) * scale)
    if value < 1:
        raise ConversionError(f"max_shard_size: {size!r}; expected a positive size")
    return value


def _plan_shards(specs: list[WeightSpec], itemsize: int, max_bytes: int) -> list[list[WeightSpec]]:
    """Greedy, in order: a tensor larger than the limit gets a shard of its own."""
    shards, size = [[]], 0
    for w in specs:
        nbytes = int(np.prod(w.hf_shape)) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(w)
        size += nbytes
    return shards


def _hf_tensor(flat: dict, w: WeightSpec, scanned: bool, dt: np.dtype) -> np.ndarray:
    if w.layer is not None and scanned:
        x = np.asarray(flat[("layers", *w.path)])[w.layer]  # jax caches the host copy across layers
    else:
        x = np.asarray(flat[w.flax_key()])
    return np.ascontiguousarray(w.to_hf(x.astype(dt)))


def _write_weights(out: Path, config: LlamaConfig, flat: dict, scanned: bool, dt: np.dtype, max_bytes: int, desc: str) -> None:
    specs = weight_specs(config)
    shards = _plan_shards(specs, dt.itemsize, max_bytes)
    names = [SAFETENSORS_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    total = sum(int(np.prod(w.hf_shape)) * dt.itemsize for w in specs)
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=total < _PROGRESS_BYTES) as bar:
        for name, shard in zip(names, shards):
            tensors = {w.hf_name: _hf_tensor(flat, w, scanned, dt) for w in shard}
            sio.write_file(out / name, tensors, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            bar.update(sum(t.nbytes for t in tensors.values()))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def tokenizer_files(source: Path) -> list[str]:
    """The tokenizer (and generation config) files that `source` has; an error if it has none."""
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: tokenizer directory not found")
    found = [n for n in TOKENIZER_FILES if (source / n).is_file()]
    if not found:
        raise FileNotFoundError(f"{source}: none of the tokenizer files {list(TOKENIZER_FILES)}")
    return found


def save_hf(
    config: LlamaConfig,
    params,
    path,
    dtype=None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    tokenizer_source=None,
    overwrite: bool = False,
    protect: dict | None = None,
) -> Path:
    """Write a HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    `params` may be scanned or unscanned (the tree decides, not `config.scan_layers`). `dtype=None`
    keeps the params' dtype (they must all share one). Shards above `max_shard_size` bytes. An empty
    existing `path` is written into; a non-empty one needs `overwrite` and must not hold or lie inside
    a path in `protect` ({what: path}; see `files.check_destination`).
    """
    dst = Path(path)
    check_destination(dst, overwrite, protect)
    check_hf_can_run(config)
    flat = flatten_params(params)
    scanned = ("layers",) in {k[:1] for k in flat}
    check_param_tree(config, flat, scanned)
    dt = float_dtype(dtype if dtype is not None else common_dtype(flat), "save_hf")
    max_bytes = parse_size(max_shard_size)
    # Checked before the (long) write, so a typo costs nothing.
    tok_files = tokenizer_files(Path(tokenizer_source)) if tokenizer_source is not None else []
    with atomic_dir(dst, overwrite, protect) as tmp:
        _write_weights(tmp, config, flat, scanned, dt, max_bytes, desc=f"writing {dst.name}")
        hf = {**config.to_hf(), "torch_dtype": dt.name, "dtype": dt.name}
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        for name in tok_files:
            shutil.copyfile(Path(tokenizer_source) / name, tmp / name)
    return dst


def common_dtype(flat: dict) -> np.dtype:
    dtypes = {np.dtype(x.dtype) for x in flat.values()}
    if len(dtypes) != 1:
        raise ConversionError(f"params: mixed dtypes {sorted(d.name for d in dtypes)}; pass dtype= to pick one")
    return dtypes.pop()
