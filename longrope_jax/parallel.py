"""Device mesh, logical-axis rules, sharded initialization and multi-host data helpers.

The model names only logical axes; these rules map them to the physical mesh axes
('data', 'fsdp', 'seq', 'tensor'). Flax assigns rules in order and skips a mesh axis that an
earlier dimension of the same array already uses, so `embed` shards weights over (fsdp, seq) while
activations, whose batch and length already take those axes, keep `embed` unsharded.

Multi-host contract (one process per host, every process runs the same program):
  1. `initialize_distributed()` first, before anything touches a device.
  2. `mesh = make_mesh(...)` and `sharding = batch_sharding(mesh, rules)` (identical everywhere).
  3. Each process loads only `data[local_slices(global_shape, sharding)]`: the rows and the
     sequence chunk its own devices hold (every row of a sequence chunk when 'seq' spans hosts).
  4. `global_batch(local, mesh, sharding, global_shape)` stitches them into one global jax.Array.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


# ---- mesh --------------------------------------------------------------------------------------


def make_mesh(data: int = 1, fsdp: int = -1, seq: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A Mesh over ('data', 'fsdp', 'seq', 'tensor'); one size may be -1 (the rest of the devices).

    Without `devices` the layout comes from `jax.make_mesh` (topology-aware on TPU: neighbouring
    mesh coordinates are neighbouring chips). Explicit `devices` are reshaped in the order given,
    which lets a caller choose which axis crosses hosts. With no -1 the sizes must multiply to
    exactly the device count (a silent subset of the devices would be a surprise).
    Axis types are Auto: Flax's `with_logical_constraint` needs them (jax 0.10 defaults to Explicit).
    """
    sizes = {"data": data, "fsdp": fsdp, "seq": seq, "tensor": tensor}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not (size == -1 or size >= 1):
            raise ValueError(f"make_mesh {name}={size!r}: expected a positive integer or -1 (infer)")
    explicit = devices is not None
    devices = list(np.asarray(devices, dtype=object).reshape(-1)) if explicit else jax.devices()
    n = len(devices)
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
    shape = tuple(int(sizes[a]) for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if explicit:
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=auto)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)


# ---- rules -------------------------------------------------------------------------------------


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


def _axes_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """NamedSharding for [batch, length] arrays (tokens, positions, segment ids) from the rules."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


# ---- sharded parameters ------------------------------------------------------------------------


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
            size = _axes_size(mesh, axes)
            if dim < len(shape) and shape[dim] % size:
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path, simple=True, separator='/')}: shape {tuple(shape)} "
                    f"(logical {tuple(names)}) dim {dim} = {shape[dim]} is not divisible by mesh axes "
                    f"{axes!r} of size {size} (mesh {dict(mesh.shape)}); change the mesh, or map "
                    f"{names[dim]!r} elsewhere with rules_from_config({{{names[dim]!r}: None}})"
                )
    return shardings


def _init_tokens_shape(mesh: Mesh, rules, length: int | None) -> tuple[int, int]:
    # A batch the mesh divides, so the model's activation constraints (and a shard_map over 'seq')
    # see the shapes training will; under jit XLA drops the forward pass since only params are kept.
    spec = tuple(batch_sharding(mesh, rules).spec)
    batch_axes, length_axes = spec + (None,) * (2 - len(spec))
    n_len = _axes_size(mesh, length_axes)
    length = 2 * n_len if length is None else length  # 2 chunks per device: zig-zag ring layouts
    if length % n_len:
        raise ValueError(f"init length {length}: expected a multiple of the mesh axes {length_axes!r} ({n_len})")
    return _axes_size(mesh, batch_axes), length


def _init_fn(config, mesh, rules, length):
    """rng -> boxed params of `Llama(config, mesh, rules)`."""
    from longrope_jax.model import Llama  # local: model imports this module

    model = Llama(config, mesh=mesh, rules=rules)
    shape = _init_tokens_shape(mesh, rules, length)
    return lambda rng: model.init(rng, jnp.zeros(shape, jnp.int32))["params"]


def param_shardings(config, mesh: Mesh, rules=DEFAULT_RULES, length: int | None = None):
    """NamedShardings for `Llama(config)` params (same tree as `init_params`), from the logical names."""
    init = _init_fn(config, mesh, rules, length)
    return shardings_for(jax.eval_shape(init, jax.random.key(0)), mesh, rules)


def init_sharded(config, mesh: Mesh, rng: jax.Array, rules=DEFAULT_RULES, length: int | None = None):
    """Unboxed params created directly in their shards: no device ever holds the whole model.

    `rng` and `length` as for `model.init_params` (length defaults to two chunks per 'length'
    shard). Values equal `jax.jit` of the unsharded init with the same rng (threefry is
    partitionable); eager `model.init_params` may differ in the last float32 bit.
    """
    init = _init_fn(config, mesh, rules, length)
    shardings = shardings_for(jax.eval_shape(init, rng), mesh, rules)
    return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)


# ---- multi-host ----------------------------------------------------------------------------------

# Signals of a Cloud TPU VM. Env vars: GKE and queued-resource TPU VMs export the worker list
# (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES) and the slice type (TPU_ACCELERATOR_TYPE);
# CLOUD_TPU_TASK_ID is set by older TPU VM images. Plain GCE TPU VMs keep these in the metadata
# server instead, so the hardware is checked too: /dev/accel* (v2-v5e) or a Google PCI device
# with a TPU device id (v5p, v6e and later sit behind VFIO, and /dev/vfio alone also means GPU
# passthrough). The ids mirror jax._src.hardware_utils.
_TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_ACCELERATOR_TYPE", "CLOUD_TPU_TASK_ID")
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}


def on_cloud_tpu_vm() -> bool:
    """Whether this host is a Cloud TPU VM (env vars or TPU hardware; see above)."""
    if any(os.environ.get(v) for v in _TPU_ENV_VARS) or glob.glob("/dev/accel[0-9]*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() != _GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor), "device")) as f:
                if f.read().strip() in _TPU_PCI_DEVICES:
                    return True
        except OSError:
            continue
    return False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids=None) -> bool:
    """Join the multi-process JAX runtime; returns whether it is running. Call before any device use.

    - Arguments, else env LONGROPE_COORDINATOR ('host:port'), LONGROPE_NUM_PROCESSES,
      LONGROPE_PROCESS_ID: explicit initialization (GPU or CPU hosts; on CPU the cross-process
      collectives use gloo). All three are needed unless num_processes is 1.
    - Nothing given on a Cloud TPU VM (see `on_cloud_tpu_vm`): `jax.distributed.initialize()`,
      which reads the slice's workers from the TPU environment.
    - Nothing given elsewhere, or num_processes=1: a single process, nothing to do.
    Calling it again once initialized does nothing.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("LONGROPE_COORDINATOR") or None
    num_processes = num_processes if num_processes is not None else _env_int("LONGROPE_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("LONGROPE_PROCESS_ID")
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if all(v is None for v in given.values()):
        if not on_cloud_tpu_vm():
            return False
        jax.distributed.initialize(local_device_ids=local_device_ids)
        return True
    if num_processes == 1 and coordinator_address is None:
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"initialize_distributed: got {given}; missing {missing} (arguments or env LONGROPE_COORDINATOR, "
            "LONGROPE_NUM_PROCESSES, LONGROPE_PROCESS_ID)"
        )
    if not (0 <= process_id < num_processes):
        raise ValueError(f"initialize_distributed: process_id={process_id} must be in [0, {num_processes})")
    # CPU processes talk through gloo (the default in recent jax; older ones had none). It only
    # configures the CPU client, so GPU hosts are unaffected; a user's 'mpi' choice is kept.
    if not on_cloud_tpu_vm() and jax.config.jax_cpu_collectives_implementation in (None, "none", "gloo"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids)
    return True


def _as_sharding(mesh: Mesh | None, sharding_or_spec) -> jax.sharding.Sharding:
    if isinstance(sharding_or_spec, jax.sharding.Sharding):
        return sharding_or_spec
    if isinstance(sharding_or_spec, PartitionSpec) and mesh is not None:
        return NamedSharding(mesh, sharding_or_spec)
    raise ValueError(f"expected a jax Sharding, or a PartitionSpec with a mesh; got {sharding_or_spec!r}")


def local_slices(global_shape, sharding: jax.sharding.Sharding) -> tuple[slice, ...]:
    """The box of the global array this process must load: one slice per dimension.

    For [batch, length] with `batch_sharding` that is (rows, sequence chunk): when 'seq' spans
    hosts a process owns a contiguous chunk of every row it holds. Derived from this process's
    addressable devices, so it follows whatever device order the mesh has. Raises when a
    process's shards are not one contiguous block (a mesh whose devices interleave hosts):
    reorder the mesh devices, or permute tokens (with their positions) before sharding instead.
    """
    global_shape = tuple(int(d) for d in global_shape)
    index_map = sharding.addressable_devices_indices_map(global_shape)
    out = []
    for dim, size in enumerate(global_shape):
        spans = sorted({(s.start or 0, size if s.stop is None else s.stop) for s in (idx[dim] for idx in index_map.values())})
        for (_, stop), (start, _) in zip(spans, spans[1:]):
            if start != stop:
                raise ValueError(
                    f"local_slices: process {jax.process_index()} holds {spans} of dimension {dim} "
                    f"(size {size}) under {sharding}: not one contiguous block"
                )
        out.append(slice(spans[0][0], spans[-1][1]))
    return tuple(out)


def global_batch(local_data, mesh: Mesh | None, sharding_or_spec, global_shape=None):
    """A global jax.Array (or a tree of them) from this process's part, as `local_slices` defines it.

    `local_data` is a numpy array or a tree of them (tokens, positions, segment ids) sharing one
    sharding; each is either this process's slice of `global_shape` or the whole global array.
    `global_shape` (shared by all leaves) defaults to what the sharding implies.
    """
    sharding = _as_sharding(mesh, sharding_or_spec)
    leaves, treedef = jax.tree_util.tree_flatten(local_data)
    if global_shape is not None:
        global_shape = tuple(int(d) for d in global_shape)
        want = tuple(s.stop - s.start for s in local_slices(global_shape, sharding))
        for path, leaf in jax.tree_util.tree_flatten_with_path(local_data)[0]:
            if tuple(np.shape(leaf)) not in (want, global_shape):
                raise ValueError(
                    f"global_batch{jax.tree_util.keystr(path)}: local data has shape {tuple(np.shape(leaf))}; "
                    f"process {jax.process_index()} owns {local_slices(global_shape, sharding)} of "
                    f"{global_shape}, so expected {want} (or the whole {global_shape})"
                )
        if jax.process_count() == 1:  # jax wants global_shape None or equal to the local shape here
            global_shape = None
    out = [jax.make_array_from_process_local_data(sharding, np.asarray(x), global_shape) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)
