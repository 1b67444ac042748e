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


def _axes_tuple(value) -> tuple:
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def sequence_rules(rules, mesh_shape, rows: int, *, decode: bool = False) -> tuple:
    """Rules for a few long sequences (generation, one-window scoring) on a training mesh.

    The batch keeps only the mesh axes (of its rule, in order) that its `rows` divide; the axes it frees
    join the sequence, so a single 128k prompt on fsdp x seq is split over every chip rather than
    replicated over fsdp. `cache_length` (the KV cache's slots) is split the same way. `decode=True`
    is for one-token steps: the new tokens' `length` is not split, only the cache is.
    """
    keep, size = [], 1
    batch_axes = _axes_tuple(partition_spec(("batch",), rules)[0])
    for axis in batch_axes:
        n = mesh_shape.get(axis, 1)
        if rows % (size * n) == 0:
            keep.append(axis)
            size *= n
    freed = [a for a in batch_axes if a not in keep]
    wanted = set(freed) | set(_axes_tuple(partition_spec(("length",), rules)[0]))
    seq = tuple(a for a in MESH_AXES if a in wanted and mesh_shape.get(a, 1) > 1) or None
    overrides = {"batch": tuple(keep) or None, "length": None if decode else seq, "cache_length": seq}
    return rules_from_config(overrides, base=rules)
