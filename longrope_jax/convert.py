"""Hugging Face LLaMA checkpoints <-> `Llama` parameters, and our own Orbax checkpoint format.

`load_hf` / `save_hf` read and write HF directories (config.json + safetensors, single file or
sharded with an index); loading needs no torch. `save_jax` / `load_jax` write an Orbax checkpoint of
the params next to `llama_config.json` (every `LlamaConfig` field, the JAX-side ones included).
The tensor mapping itself lives in `param_map`. Every writer builds its result in a temporary
sibling directory and renames it into place, so DST is untouched when anything fails.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from longrope_jax import safetensors_io as sio
from longrope_jax.fsutil import atomic_dir, check_destination
from longrope_jax.model import DTYPES, LlamaConfig
from longrope_jax.param_map import (
    ConversionError, WeightSpec, check_param_tree, flatten_params, float_dtype, short_list, weight_specs,
)
from longrope_jax.rope import RopeScaling

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
JAX_CONFIG_FILE = "llama_config.json"
JAX_PARAMS_DIR = "params"
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
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a Hugging Face model directory with config.json")
    try:
        d = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConversionError(f"{path}: holds a JSON {type(d).__name__}; expected an object")
    try:
        return LlamaConfig.from_hf(d)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{path}: {e}") from None


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
) -> Path:
    """Write a HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    `params` may be scanned or unscanned (the tree decides, not `config.scan_layers`). `dtype=None`
    keeps the params' dtype (they must all share one). Shards above `max_shard_size` bytes.
    """
    dst = Path(path)
    check_destination(dst, overwrite)
    _check_hf_can_run(config)
    flat = flatten_params(params)
    scanned = ("layers",) in {k[:1] for k in flat}
    check_param_tree(config, flat, scanned)
    dt = float_dtype(dtype if dtype is not None else _common_dtype(flat), "save_hf")
    max_bytes = parse_size(max_shard_size)
    # Checked before the (long) write, so a typo costs nothing.
    tok_files = tokenizer_files(Path(tokenizer_source)) if tokenizer_source is not None else []
    with atomic_dir(dst, overwrite) as tmp:
        _write_weights(tmp, config, flat, scanned, dt, max_bytes, desc=f"writing {dst.name}")
        hf = {**config.to_hf(), "torch_dtype": dt.name, "dtype": dt.name}
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        for name in tok_files:
            shutil.copyfile(Path(tokenizer_source) / name, tmp / name)
    return dst


def _check_hf_can_run(config: LlamaConfig) -> None:
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


def _common_dtype(flat: dict) -> np.dtype:
    dtypes = {np.dtype(x.dtype) for x in flat.values()}
    if len(dtypes) != 1:
        raise ConversionError(f"params: mixed dtypes {sorted(d.name for d in dtypes)}; pass dtype= to pick one")
    return dtypes.pop()


# ---- our own format: Orbax params + llama_config.json ------------------------------------------


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
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConversionError(f"{source}: holds a JSON {type(d).__name__}; expected an object")
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


def save_jax(config: LlamaConfig, params, path, overwrite: bool = False) -> Path:
    """Orbax checkpoint of `params` in `path/params` plus `path/llama_config.json`.

    The tree must match `config` (scanned exactly when `config.scan_layers`).
    """
    import orbax.checkpoint as ocp  # here, not at the top: slow to import, and every CLI command loads us

    dst = Path(path)
    check_destination(dst, overwrite)
    _check_hf_can_run(config)
    flat = flatten_params(params)
    check_param_tree(config, flat, config.scan_layers)
    with atomic_dir(dst, overwrite) as tmp:
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
        meta = ckptr.metadata(params_path.absolute()).item_metadata
        if meta is None:
            raise ConversionError(f"{params_path}: holds no Orbax checkpoint metadata; expected save_jax output")
        # Restore onto one local device whatever sharding the writer had (it may have been a pod).
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta.tree)
        params = ckptr.restore(params_path.absolute(), target)
    check_param_tree(config, flatten_params(params), config.scan_layers)
    if dtype is not None:
        dt = float_dtype(dtype, "load_jax")
        params = jax.tree.map(lambda x: x.astype(dt), params)
        config = dataclasses.replace(config, param_dtype=dt.name)
    return config, params


def load_checkpoint(spec: str, what: str = "checkpoint") -> tuple[LlamaConfig, dict]:
    """(LlamaConfig, params) from `hf:DIR` (a HF directory) or `jax:DIR` (`save_jax` output)."""
    kind, _, path = str(spec).partition(":")
    if kind == "hf" and path:
        return load_hf(path)
    if kind == "jax" and path:
        return load_jax(path)
    raise ValueError(f"{what} {spec!r}: expected 'hf:DIR' or 'jax:DIR'")


def read_model_config(spec: str, what: str = "checkpoint") -> LlamaConfig:
    """The LlamaConfig of `hf:DIR` or `jax:DIR`, without reading the weights."""
    kind, _, path = str(spec).partition(":")
    if kind == "hf" and path:
        return read_hf_config(Path(path))
    if kind == "jax" and path:
        file = Path(path) / JAX_CONFIG_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{what} {spec!r}: {file} not found (not a `convert hf-to-jax` directory?)")
        return config_from_json(file.read_text(), str(file))
    raise ValueError(f"{what} {spec!r}: expected 'hf:DIR' or 'jax:DIR'")


# ---- command line ------------------------------------------------------------------------------


def register_cli(subparsers) -> None:
    conv = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face and JAX")
    sub = conv.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    h2j = sub.add_parser("hf-to-jax", help="HF safetensors directory -> Orbax params + llama_config.json")
    h2j.add_argument("src", metavar="SRC")
    h2j.add_argument("dst", metavar="DST")
    h2j.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype (default float32)")
    h2j.add_argument("--scan-layers", action="store_true", help="stack layers for nn.scan")
    h2j.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    h2j.set_defaults(func=_hf_to_jax_cli)
    j2h = sub.add_parser("jax-to-hf", help="Orbax params + llama_config.json -> HF safetensors directory")
    j2h.add_argument("src", metavar="SRC")
    j2h.add_argument("dst", metavar="DST")
    j2h.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype (default: the params' dtype)")
    j2h.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB, 500MB, 2GiB")
    j2h.add_argument("--tokenizer", metavar="DIR", default=None, help="copy tokenizer files from DIR")
    j2h.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    j2h.set_defaults(func=_jax_to_hf_cli)


def _check_paths(src, dst, overwrite: bool) -> None:
    # Fail before the (possibly long) load, and never swap SRC away while reading it.
    if Path(src).resolve() == Path(dst).resolve():
        raise ConversionError(f"DST {dst}: is SRC; expected a different directory")
    check_destination(Path(dst), overwrite)


def param_count(params) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))


def hf_to_jax(src, dst, dtype="float32", scan_layers: bool = False, overwrite: bool = False):
    """`load_hf` then `save_jax`; returns (config, params)."""
    _check_paths(src, dst, overwrite)
    config, params = load_hf(src, dtype=dtype, scan_layers=scan_layers)
    save_jax(config, params, dst, overwrite=overwrite)
    return config, params


def jax_to_hf(src, dst, dtype=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE, tokenizer_source=None, overwrite=False):
    """`load_jax` then `save_hf`; returns (config, params)."""
    _check_paths(src, dst, overwrite)
    parse_size(max_shard_size)
    if tokenizer_source is not None:
        tokenizer_files(Path(tokenizer_source))
    config, params = load_jax(src)
    save_hf(config, params, dst, dtype=dtype, max_shard_size=max_shard_size,
            tokenizer_source=tokenizer_source, overwrite=overwrite)
    return config, params


def _hf_to_jax_cli(args) -> int:
    config, params = hf_to_jax(args.src, args.dst, args.dtype, args.scan_layers, args.overwrite)
    print(f"wrote {param_count(params):,} parameters ({args.dtype}, scan_layers={config.scan_layers}) to {args.dst}")
    return 0


def _jax_to_hf_cli(args) -> int:
    config, params = jax_to_hf(args.src, args.dst, args.dtype, args.max_shard_size, args.tokenizer, args.overwrite)
    written = args.dtype or _common_dtype(flatten_params(params)).name
    print(f"wrote {param_count(params):,} parameters ({written}, {config.model_type}) to {args.dst}")
    return 0
