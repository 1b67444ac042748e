"""Model artifacts by spec: the one parser of `hf:DIR` / `jax:DIR` specs, the one model loader, the one
tokenizer-discovery rule, and the one reader of rope_scaling and factors JSON files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from longrope_jax.io.files import parse_json, read_json_object, require_local
from longrope_jax.io.hf import load_hf, read_hf_config
from longrope_jax.io.orbax_params import JAX_CONFIG_FILE, config_from_json, load_jax
from longrope_jax.model import LlamaConfig

MODEL_KINDS = ("hf", "jax")
# What `data.tokenizer.build_tokenizer` can read from a model directory, in order of preference.
TOKENIZER_MARKERS = {"tokenizer.json": "hf:{dir}", "tokenizer.model": "sentencepiece:{dir}/tokenizer.model"}
LONGROPE_TYPES = ("longrope", "su")  # "su": Phi-3's first name for LongRoPE


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A checkpoint named as `hf:DIR` (a Hugging Face directory) or `jax:DIR` (`save_jax` output)."""

    kind: str
    path: Path

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


def parse_model_spec(spec, what: str = "checkpoint") -> ModelSpec:
    if isinstance(spec, ModelSpec):
        return spec
    kind, _, path = str(spec).partition(":")
    if kind not in MODEL_KINDS or not path:
        raise ValueError(f"{what} {spec!r}: expected 'hf:DIR' or 'jax:DIR'")
    require_local(path, what)
    return ModelSpec(kind, Path(path))


def load_model(spec, what: str = "checkpoint") -> tuple[LlamaConfig, dict]:
    """(LlamaConfig, params) of `hf:DIR` or `jax:DIR`."""
    m = parse_model_spec(spec, what)
    _check_dir(m, what)
    return load_hf(m.path) if m.kind == "hf" else load_jax(m.path)


def _check_dir(m: ModelSpec, what: str) -> None:
    if not m.path.is_dir():
        raise FileNotFoundError(f"{what} {m}: {m.path} is not a directory; expected a "
                                + ("Hugging Face model directory" if m.kind == "hf" else "`convert hf-to-jax` directory"))


def read_model_config(spec, what: str = "checkpoint") -> LlamaConfig:
    """The LlamaConfig of `hf:DIR` or `jax:DIR`, without reading the weights."""
    m = parse_model_spec(spec, what)
    _check_dir(m, what)
    if m.kind == "hf":
        return read_hf_config(m.path)
    file = m.path / JAX_CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{what} {str(spec)!r}: {file} not found (not a `convert hf-to-jax` directory?)")
    return config_from_json(file.read_text(), str(file))


def tokenizer_dir(spec) -> Path | None:
    """The model's directory when it holds a tokenizer we can read (tokenizer.json or tokenizer.model)."""
    path = parse_model_spec(spec).path
    return path if any((path / name).is_file() for name in TOKENIZER_MARKERS) else None


def default_tokenizer(spec) -> str:
    """The tokenizer spec a model implies: its directory's tokenizer.json, else its tokenizer.model, else `byte`."""
    path = parse_model_spec(spec).path
    for name, form in TOKENIZER_MARKERS.items():
        if (path / name).is_file():
            return form.format(dir=path)
    return "byte"


def read_rope_scaling(path, what: str, original_length: int | None = None) -> dict:
    """The LongRoPE `rope_scaling` dict of a JSON file: a search's `rope_scaling.json`, or a HF config.json's
    `rope_parameters`/`rope_scaling` (whose top-level original_max_position_embeddings wins, as in HF).
    A missing original length becomes `original_length` when given. Both factor lists pass `check_factors`
    (finite, positive, non-decreasing); their count is checked against the model where it is used."""
    expected = "a 'longrope' rope_scaling with short_factor and long_factor"
    d = read_json_object(path, what, "a rope_scaling JSON object")
    if "rope_parameters" in d or "rope_scaling" in d:  # a HF config.json
        top = d
        d = dict(top.get("rope_parameters") or top.get("rope_scaling") or {})
        d.pop("rope_theta", None)  # the base is the model's
        if top.get("original_max_position_embeddings") is not None:
            d["original_max_position_embeddings"] = top["original_max_position_embeddings"]
    kind = d.get("rope_type", d.get("type", "longrope"))
    if kind not in LONGROPE_TYPES:
        raise ValueError(f"{what}: {path} has rope_type {kind!r}; expected {expected}")
    for key in ("short_factor", "long_factor"):
        if key not in d:
            raise ValueError(f"{what}: {path} has no {key!r}; expected {expected}")
    d = {"rope_type": "longrope", **{k: v for k, v in d.items() if k not in ("type", "rope_type")}}
    for key in ("short_factor", "long_factor"):
        if not isinstance(d[key], list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in d[key]):
            raise ValueError(f"{what}: {path}: {key} is {d[key]!r:.80}; expected a list of numbers")
        check_factors(d[key], f"{what}: {path}: {key}")
    if original_length is not None:
        d.setdefault("original_max_position_embeddings", original_length)
    return d


def read_factors(path, d_half: int, monotone: bool = True, key: str | None = None) -> np.ndarray:
    """LongRoPE factors from a CSV (microsoft/LongRoPE's one value per line; one comma-separated row also
    works) or a JSON file (a list, or an object with `key`, default `factors` then `long_factor`).

    Raises a ValueError for an empty file, a wrong count, a value that is not a finite positive number,
    several rows of several values (per-layer factors are not supported), or, with `monotone`, a
    decreasing step."""
    path = Path(path)
    what = f"factors file {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{what}: not found")
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"{what}: empty; expected {d_half} factors")
    if path.suffix == ".json":
        values = _json_factors(path, key)
    else:
        rows = [[v.strip() for v in line.split(",") if v.strip()] for line in text.splitlines() if line.strip()]
        if len(rows) > 1 and any(len(r) > 1 for r in rows):
            raise ValueError(f"{what}: {len(rows)} rows of several values (per-layer factors?); "
                             f"expected one factor per line or a single row")
        try:
            values = [float(v) for r in rows for v in r]
        except ValueError as e:
            raise ValueError(f"{what}: {e}; expected numbers") from None
    return check_factors(values, what, d_half, monotone)


def check_factors(values, what: str, d_half: int | None = None, monotone: bool = True) -> np.ndarray:
    """The checks every LongRoPE factor list passes wherever it is read (factors files, rope_scaling JSON):
    `d_half` values when given, finite and positive, and (with `monotone`) non-decreasing, as the search
    produces them. A ValueError names `what` and the first bad factor."""
    lam = np.asarray(values, np.float64)
    if lam.ndim != 1 or lam.size == 0 or (d_half is not None and lam.size != d_half):
        raise ValueError(f"{what}: has {lam.size} values; expected "
                         + (f"{d_half} (rotary_dim / 2 of this model)" if d_half else "a non-empty list"))
    bad = ~np.isfinite(lam) | (lam <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{what}: factor {i} is {lam[i]}; expected finite positive factors")
    if monotone and np.any(np.diff(lam) < 0):
        i = int(np.argmax(np.diff(lam) < 0))
        raise ValueError(f"{what}: not monotone: factor {i + 1} ({lam[i + 1]}) < factor {i} "
                         f"({lam[i]}); expected non-decreasing factors")
    return lam


def _json_factors(path: Path, key: str | None) -> list:
    data = parse_json(path.read_text(), f"factors file {path}")
    if isinstance(data, dict):
        names = [key] if key else ["factors", "long_factor"]
        found = [n for n in names if n in data]
        if not found:
            raise ValueError(f"factors file {path}: no {' or '.join(map(repr, names))} key; got keys {sorted(data)}")
        data = data[found[0]]
    if not isinstance(data, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data):
        raise ValueError(f"factors file {path}: expected a list of numbers")
    return data
