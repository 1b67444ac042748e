"""The device mesh, and shardings derived from logical names (batches, parameter trees)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longrope_jax.sharding.rules import DEFAULT_RULES, MESH_AXES


def make_mesh(data: int = 1, fsdp: int = -1, seq: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A Mesh over ('data', 'fsdp', 'seq', 'tensor'); one size may be -1 (the rest of the devices).

    Without `devices` the layout comes from `jax.make_mesh` (topology-aware on TPU: neighbouring
    mesh coordinates are neighbouring chips). Explicit `devices` are reshaped in the order given,
    which lets a caller choose which axis crosses hosts. With no -1 the sizes must multiply to
    exactly the device count (a silent subset of the devices would be a surprise).
    Axis types are Auto: Flax's `with_logical_constraint` needs them (jax 0.10 defaults to Explicit).
    """
    explicit = devices is not None
    devices = list(np.asarray(devices, dtype=object).reshape(-1)) if explicit else jax.devices()
    shape = mesh_shape(data, fsdp, seq, tensor, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if explicit:
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=auto)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)


def mesh_shape(data: int, fsdp: int, seq: int, tensor: int, n: int) -> tuple[int, int, int, int]:
    """(data, fsdp, seq, tensor) for `n` devices, one -1 inferred; errors show the arithmetic."""
    sizes = {"data": data, "fsdp": fsdp, "seq": seq, "tensor": tensor}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not (size == -1 or size >= 1):
            raise ValueError(f"make_mesh {name}={size!r}: expected a positive integer or -1 (infer)")
    desc = " x ".join(f"{k}={v}" for k, v in sizes.items())
    inferred = [k for k, v in sizes.items() if v == -1]
    if len(inferred) > 1:
        raise ValueError(f"make_mesh {desc}: at most one axis may be -1, got {len(inferred)} ({', '.join(inferred)})")
    known = math.prod(int(v) for v in sizes.values() if v != -1)
    if inferred:
        if n % known:
            raise ValueError(f"make_mesh {desc}: the other axes give {known}, which does not divide {n} devices")
        sizes[inferred[0]] = n // known
    elif known != n:
        raise ValueError(f"make_mesh {desc} = {known} does not equal {n} devices")
    return tuple(int(sizes[a]) for a in MESH_AXES)


def axes_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """NamedSharding for [batch, length] arrays (tokens, positions, segment ids) from the rules."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


def shardings_for(abstract_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of (abstract) values boxed with logical names (unboxed leaves replicate).

    Checks that every sharded dimension divides its mesh axes and names the offending leaf:
    XLA's own message for an uneven `out_shardings` does not say which rule caused it.
    """
    logical = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
    values = nn.meta.unbox(abstract_tree)
    is_sharding = lambda x: isinstance(x, NamedSharding)
    flat_vals, _ = jax.tree_util.tree_flatten_with_path(values)
    flat_shardings = jax.tree_util.tree_leaves(shardings, is_leaf=is_sharding)
    flat_logical = jax.tree_util.tree_leaves(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, value), sharding, names in zip(flat_vals, flat_shardings, flat_logical, strict=True):
        shape = getattr(value, "shape", ())
        for dim, axes in enumerate(sharding.spec):
            size = axes_size(mesh, axes)
            if dim < len(shape) and shape[dim] % size:
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path, simple=True, separator='/')}: shape {tuple(shape)} "
                    f"(logical {tuple(names)}) dim {dim} = {shape[dim]} is not divisible by mesh axes "
                    f"{axes!r} of size {size} (mesh {dict(mesh.shape)}); change the mesh, or map "
                    f"{names[dim]!r} elsewhere with rules_from_config({{{names[dim]!r}: None}})"
                )
    return shardings


def parse_mesh_flag(text: str | None, flag: str = "--mesh"):
    """(data, fsdp, seq, tensor) from a 'D,F,S,T' flag value (one size may be -1); None stays None."""
    if text is None:
        return None
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 4:
        raise ValueError(f"{flag} {text!r}: expected four integers data,fsdp,seq,tensor (one may be -1), e.g. 1,2,4,1")
    return sizes
