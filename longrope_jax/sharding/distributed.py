"""Multi-host start and global batches.

Multi-host contract (one process per host, every process runs the same program):
  1. `initialize_distributed()` first, before anything touches a device.
  2. `mesh = make_mesh(...)` and `sharding = batch_sharding(mesh, rules)` (identical everywhere).
  3. Each process loads only `data[local_slices(global_shape, sharding)]`: the rows and the
     sequence chunk its own devices hold (every row of a sequence chunk when 'seq' spans hosts).
  4. `global_batch(local, mesh, sharding, global_shape)` stitches them into one global jax.Array.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from longrope_jax.platform import on_cloud_tpu_vm


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
