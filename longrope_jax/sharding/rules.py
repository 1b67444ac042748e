"""Logical-axis rules: the names the model uses, mapped to the mesh axes ('data', 'fsdp', 'seq', 'tensor').

Flax assigns rules in order and skips a mesh axis that an earlier dimension of the same array
already uses, so `embed` shards weights over (fsdp, seq) while activations, whose batch and length
already take those axes, keep `embed` unsharded.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "seq", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "seq"),
    ("embed", ("fsdp", "seq")),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def _mesh_axes_value(logical: str, value, mesh_axes: tuple[str, ...]):
    """None | 'axis' | ('a', 'b') from None, a string ('fsdp' or 'fsdp,seq') or a sequence."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    parts = [p.strip() if isinstance(p, str) else p for p in parts]
    for p in parts:
        if p not in mesh_axes:
            raise ValueError(
                f"logical axis rule {logical!r}: unknown mesh axis {p!r}; expected None or names from {mesh_axes}"
            )
    if len(set(parts)) != len(parts):
        raise ValueError(f"logical axis rule {logical!r}: mesh axis repeated in {tuple(parts)}")
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else tuple(parts)


def rules_from_config(overrides=None, base=DEFAULT_RULES, mesh_axes: tuple[str, ...] = MESH_AXES) -> tuple:
    """Full rules tuple: `base` with each logical name in `overrides` replaced in place.

    `overrides` is a mapping (dict, ml_collections ConfigDict) or a sequence of (logical, mesh axes)
    pairs; mesh axes are None (replicate), a name, a tuple of names or a 'fsdp,seq' string. A pair
    list may repeat a logical name: Flax then tries them in order (a fallback when the first mesh
    axis is already used by another dimension). New logical names are appended. The result is a
    hashable tuple (it is a Flax module attribute).
    """
    if overrides is None:
        pairs = []
    elif isinstance(overrides, Mapping) or hasattr(overrides, "items"):
        pairs = list(overrides.items())
    else:
        pairs = [tuple(p) for p in overrides]
    for p in pairs:
        if len(p) != 2 or not isinstance(p[0], str) or not p[0]:
            raise ValueError(f"logical axis rule {p!r}: expected a (logical name, mesh axes) pair")
    pairs = [(name, _mesh_axes_value(name, axes, mesh_axes)) for name, axes in pairs]
    replaced = {name for name, _ in pairs}
    out, emitted = [], set()
    for name, axes in base:
        if name not in replaced:
            out.append((name, _mesh_axes_value(name, axes, mesh_axes)))
        elif name not in emitted:
            out.extend(p for p in pairs if p[0] == name)
            emitted.add(name)
    out.extend(p for p in pairs if p[0] not in emitted)
    return tuple(out)


def partition_spec(logical_names, rules) -> PartitionSpec:
    """The mesh PartitionSpec that `rules` give an array with these logical axis names."""
    spec = nn.logical_to_mesh_axes(logical_names, rules)
    return PartitionSpec(*spec) if spec is not None else PartitionSpec(*([None] * len(logical_names)))
