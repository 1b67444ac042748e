"""`longrope-jax convert`: checkpoints between Hugging Face directories and our Orbax format, and llama.cpp GGUF
files into either."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from longrope_jax.io.files import atomic_dir, check_destination, require_local
from longrope_jax.io.gguf import read_gguf, write_tokenizer_files
from longrope_jax.io.hf import (
    DEFAULT_MAX_SHARD_SIZE,
    common_dtype,
    load_hf,
    parse_size,
    save_hf,
    tokenizer_files,
)
from longrope_jax.io.orbax_params import load_jax, save_jax
from longrope_jax.io.param_map import ConversionError, flatten_params
from longrope_jax.io.artifacts import read_rope_scaling
from longrope_jax.model import DTYPES
from longrope_jax.rope import RopeScaling


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
    j2h.add_argument("--rope-scaling", metavar="FILE", default=None,
                     help="a search's rope_scaling.json (or a HF config.json): export with these LongRoPE factors")
    j2h.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    j2h.set_defaults(func=_jax_to_hf_cli)
    for direction, func, what in (("gguf-to-hf", _gguf_to_hf_cli, "HF safetensors directory"),
                                  ("gguf-to-jax", _gguf_to_jax_cli, "Orbax params + llama_config.json")):
        g = sub.add_parser(direction, help=f"llama.cpp GGUF file (llama architecture) -> {what}, with its tokenizer")
        g.add_argument("src", metavar="SRC.gguf")
        g.add_argument("dst", metavar="DST")
        g.add_argument("--dtype", choices=DTYPES, default="float32",
                       help="weight dtype after dequantizing (default float32)")
        g.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        g.set_defaults(func=func)


def _check_paths(src, dst, overwrite: bool, tokenizer=None) -> dict:
    """{what: path} that DST may not replace; fails before the (possibly long) load when DST is SRC or
    may not be replaced (never swap SRC, a directory holding it, or the current directory away)."""
    require_local(src, "SRC")
    require_local(dst, "DST")
    if tokenizer is not None:
        require_local(tokenizer, "--tokenizer")
    if Path(src).resolve() == Path(dst).resolve():
        raise ConversionError(f"DST {dst}: is SRC; expected a different directory")
    protect = {"SRC": src, "--tokenizer": tokenizer}
    check_destination(Path(dst), overwrite, protect)
    return protect


def param_count(params) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))


def hf_to_jax(src, dst, dtype="float32", scan_layers: bool = False, overwrite: bool = False):
    """`load_hf` then `save_jax`; returns (config, params)."""
    protect = _check_paths(src, dst, overwrite)
    config, params = load_hf(src, dtype=dtype, scan_layers=scan_layers)
    save_jax(config, params, dst, overwrite=overwrite, protect=protect)
    return config, params


def jax_to_hf(src, dst, dtype=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE, tokenizer_source=None, overwrite=False,
              rope_scaling=None):
    """`load_jax` then `save_hf`; returns (config, params). `rope_scaling` (a file, see
    `artifacts.read_rope_scaling`) replaces the model's RoPE with those LongRoPE factors, and
    max_position_embeddings with original x factor (the length the factors were searched for)."""
    protect = _check_paths(src, dst, overwrite, tokenizer_source)
    parse_size(max_shard_size)
    if tokenizer_source is not None:
        tokenizer_files(Path(tokenizer_source))
    config, params = load_jax(src)
    if rope_scaling is not None:
        config = with_rope_scaling_file(config, rope_scaling)
    save_hf(config, params, dst, dtype=dtype, max_shard_size=max_shard_size,
            tokenizer_source=tokenizer_source, overwrite=overwrite, protect=protect)
    return config, params


def gguf_to_hf(src, dst, dtype="float32", overwrite: bool = False):
    """`read_gguf` then `save_hf` plus the tokenizer files, all in one atomic write; returns (config, params)."""
    return _from_gguf(src, dst, dtype, overwrite, "hf")


def gguf_to_jax(src, dst, dtype="float32", overwrite: bool = False):
    """`read_gguf` then `save_jax` plus the tokenizer files, all in one atomic write; returns (config, params)."""
    return _from_gguf(src, dst, dtype, overwrite, "jax")


def _from_gguf(src, dst, dtype, overwrite: bool, kind: str):
    protect = _check_paths(src, dst, overwrite)
    model = read_gguf(src)
    config = dataclasses.replace(model.config, param_dtype=dtype)
    params = model.params(dtype)
    # Weights and tokenizer land in one temporary directory, renamed into place at the end: DST never
    # holds one without the other. The writers write into the (empty) temporary directory.
    with atomic_dir(Path(dst), overwrite, protect) as tmp:
        if kind == "hf":
            save_hf(config, params, tmp, dtype=dtype)
        else:
            save_jax(config, params, tmp)
        write_tokenizer_files(model.tokenizer_files, tmp)
    return config, params


def _gguf_to_hf_cli(args) -> int:
    config, params = gguf_to_hf(args.src, args.dst, args.dtype, args.overwrite)
    print(f"wrote {param_count(params):,} parameters ({args.dtype}, {config.model_type}) and the tokenizer to {args.dst}")
    return 0


def _gguf_to_jax_cli(args) -> int:
    _, params = gguf_to_jax(args.src, args.dst, args.dtype, args.overwrite)
    print(f"wrote {param_count(params):,} parameters ({args.dtype}) and the tokenizer to {args.dst}")
    return 0


def _hf_to_jax_cli(args) -> int:
    config, params = hf_to_jax(args.src, args.dst, args.dtype, args.scan_layers, args.overwrite)
    print(f"wrote {param_count(params):,} parameters ({args.dtype}, scan_layers={config.scan_layers}) to {args.dst}")
    return 0


def with_rope_scaling_file(config, path):
    """`config` with the LongRoPE rope_scaling of `path`, checked against its head_dim."""
    d = read_rope_scaling(path, "--rope-scaling", original_length=config.max_position_embeddings)
    scaling = RopeScaling.from_hf(d)
    try:
        scaling.validate(config.head_dim)
    except ValueError as e:
        raise ValueError(f"--rope-scaling {path}: {e}") from None
    # The search scored its candidates at original x factor: that length sets LongRoPE's attention scale.
    target = round(scaling.original_max_position_embeddings * scaling.factor) if scaling.factor else None
    return dataclasses.replace(config, rope_scaling=scaling,
                               max_position_embeddings=target or config.max_position_embeddings)


def _jax_to_hf_cli(args) -> int:
    config, params = jax_to_hf(args.src, args.dst, args.dtype, args.max_shard_size, args.tokenizer, args.overwrite,
                               args.rope_scaling)
    written = args.dtype or common_dtype(flatten_params(params)).name
    print(f"wrote {param_count(params):,} parameters ({written}, {config.model_type}) to {args.dst}")
    return 0
