"""Method specs (`none`, `default`, `KIND:FACTOR`, `longrope:FILE`) -> RopeScaling, for evaluation."""

from __future__ import annotations

from longrope_jax.io.artifacts import read_rope_scaling
from longrope_jax.model import LlamaConfig
from longrope_jax.rope import RopeScaling

METHOD_KINDS = ("none", "default", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
LLAMA3_BANDS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}  # Llama 3.1's published values


def parse_method(spec: str, config: LlamaConfig, original_length: int | None = None) -> RopeScaling:
    """A RopeScaling from `none` (the model's own), `default`, `KIND:FACTOR` (linear, ntk, dynamic,
    yarn, llama3) or `longrope:FILE` (a rope_scaling JSON from `longrope-jax search`, or a HF
    config.json). yarn and llama3 scale from `original_length` (default: the model's
    max_position_embeddings); dynamic NTK, as in HF, from max_position_embeddings."""
    kind, sep, arg = str(spec).partition(":")
    original = config.max_position_embeddings if original_length is None else original_length
    if kind not in METHOD_KINDS:
        raise ValueError(f"method spec {spec!r}: unknown kind {kind!r}; expected none, default, linear:F, ntk:F, "
                         f"dynamic:F, yarn:F, llama3:F or longrope:FILE")
    if kind == "none":
        if sep:
            raise ValueError(f"method spec {spec!r}: 'none' takes no argument")
        return config.rope_scaling
    if kind == "default":
        if sep:
            raise ValueError(f"method spec {spec!r}: 'default' takes no argument")
        d = {"rope_type": "default"}
    elif kind == "longrope":
        if not arg:
            raise ValueError(f"method spec {spec!r}: expected longrope:FILE (a rope_scaling JSON)")
        d = read_rope_scaling(arg, "longrope method", original)
    else:
        try:
            factor = float(arg)
        except ValueError:
            raise ValueError(f"method spec {spec!r}: expected {kind}:FACTOR with a number, got {arg!r}") from None
        d = {"rope_type": kind, "factor": factor}
        if kind in ("yarn", "llama3"):
            d["original_max_position_embeddings"] = original
        if kind == "llama3":
            d.update(LLAMA3_BANDS)
    # The rotary dimension belongs to the model, whatever the method.
    if config.rope_scaling.partial_rotary_factor != 1.0:
        d.setdefault("partial_rotary_factor", config.rope_scaling.partial_rotary_factor)
    try:
        scaling = RopeScaling.from_hf(d)
        scaling.validate(config.head_dim)
    except ValueError as e:
        raise ValueError(f"method spec {spec!r}: {e}") from None
    return scaling


def parse_methods(specs, config: LlamaConfig, original_length: int | None = None) -> tuple[dict, dict]:
    """({name: RopeScaling}, {name: spec}) from `NAME=SPEC` or bare `SPEC` strings (named by the spec).
    No specs: the model's own RoPE, named `model`."""
    specs = list(specs or ["model=none"])
    methods, names = {}, {}
    for item in specs:
        name, sep, spec = str(item).partition("=")
        if not sep:
            name, spec = item, item
        if not name or not spec:
            raise ValueError(f"--method {item!r}: expected NAME=SPEC (e.g. yarn4=yarn:4) or SPEC")
        if name in methods:
            raise ValueError(f"--method {item!r}: the name {name!r} is used twice")
        methods[name], names[name] = parse_method(spec, config, original_length), spec
    return methods, names


def hf_methods(methods: dict, config: LlamaConfig) -> dict:
    """{name: HF rope_scaling dict or None}: what eval.json records."""
    return {name: s.to_hf(rope_theta=config.rope_theta, head_dim=config.head_dim) for name, s in methods.items()}
