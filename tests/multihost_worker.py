"""One process of the multi-host test: sharded init, per-process data loading, forward + backward.

Run by tests/sharding/test_multihost.py as
    python tests/multihost_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I \
        --attention dense --out DIR
with XLA_FLAGS=--xla_force_host_platform_device_count=4 and JAX_PLATFORMS=cpu. Every process runs
each layout in LAYOUTS; process 0 writes DIR/<layout>.npz with the loss, the gathered gradients
and the (rows, sequence) box each process loaded.
The test imports the config, batch and loss from here so both sides compute the same thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from longrope_jax.model import Llama, LlamaConfig
from longrope_jax.sharding.distributed import global_batch, initialize_distributed, local_slices
from longrope_jax.sharding.init import init_sharded
from longrope_jax.sharding.mesh import batch_sharding, make_mesh
from longrope_jax.sharding.rules import DEFAULT_RULES

# tensor=2 needs kv heads and vocab even; fsdp*seq up to 8 needs hidden % 8 == 0.
CONFIG = LlamaConfig(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
)
BATCH, LENGTH = 8, 32
SEED = 0


def _seq_across_hosts(data=1, fsdp=2, seq=2, tensor=2):
    # Reorder devices so the mesh's 'seq' coordinate is the process: process p owns sequence
    # chunk p of every row (jax.devices() lists process 0's devices first); fsdp and tensor
    # stay inside a host.
    devices = np.asarray(jax.devices(), dtype=object).reshape(seq, data, fsdp, tensor).transpose(1, 2, 0, 3)
    return make_mesh(data, fsdp, seq, tensor, devices=devices)


# name -> mesh factory (8 devices over 2 processes of 4). Each layout costs ~10 s of compiling.
LAYOUTS = {
    "rows_per_host": lambda: make_mesh(data=1, fsdp=2, seq=4, tensor=1),  # each host half the rows
    "seq_across_hosts": _seq_across_hosts,  # each host a sequence chunk of all rows
}


def global_arrays() -> dict[str, np.ndarray]:
    """The deterministic global batch: tokens, positions, next-token targets and their weights."""
    tokens = np.random.default_rng(SEED).integers(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    positions = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH)).copy()
    # Targets are shifted on the host, so the loss needs no cross-shard shift of the sequence.
    targets = np.roll(tokens, -1, axis=1)
    weights = (positions < LENGTH - 1).astype(np.float32)
    return {"tokens": tokens, "positions": positions, "targets": targets, "weights": weights}


def loss_fn(model: Llama, params, batch) -> jax.Array:
    """Mean next-token cross-entropy."""
    logits_BxLxV = model.apply({"params": params}, batch["tokens"], positions=batch["positions"])
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    nll_BxL = -jnp.take_along_axis(logp_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(nll_BxL * batch["weights"]) / jnp.sum(batch["weights"])


def flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v) for p, v in leaves}


def run_layout(config: LlamaConfig, mesh) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and full gradients (as numpy on every process) on `mesh`, loading only local data."""
    rules = DEFAULT_RULES
    params = init_sharded(config, mesh, jax.random.key(SEED), rules)
    sharding = batch_sharding(mesh, rules)
    full = global_arrays()
    box = local_slices((BATCH, LENGTH), sharding)
    local = {k: v[box] for k, v in full.items()}  # a real loader reads only these rows and positions
    batch = global_batch(local, mesh, sharding, (BATCH, LENGTH))
    model = Llama(config, mesh=mesh, rules=rules)
    loss, grads = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(model, p, b)))(params, batch)
    return float(loss), flat(multihost_utils.process_allgather(grads, tiled=True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--attention", default="dense")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    start = time.monotonic()

    assert initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    assert initialize_distributed(args.coordinator, args.num_processes, args.process_id)  # idempotent
    assert jax.process_count() == args.num_processes and jax.device_count() == 8, (jax.process_count(), jax.devices())

    print(f"process {jax.process_index()}: initialized ({time.monotonic() - start:.1f} s)", flush=True)
    # Devices interleaved between hosts along 'seq': no process owns one contiguous chunk.
    interleaved = np.asarray(jax.devices(), dtype=object).reshape(2, 4).T.reshape(-1)
    try:
        local_slices((BATCH, LENGTH), batch_sharding(make_mesh(1, 1, 8, 1, devices=interleaved)))
    except ValueError as e:
        assert "not one contiguous block" in str(e), e
    else:
        raise AssertionError("local_slices accepted an interleaved layout")

    config = dataclasses.replace(CONFIG, attention=args.attention)
    for name, make in LAYOUTS.items():
        start = time.monotonic()
        mesh = make()
        loss, grads = run_layout(config, mesh)
        rows, seq = local_slices((BATCH, LENGTH), batch_sharding(mesh))
        print(f"process {jax.process_index()} {name}: rows {rows} seq {seq} loss {loss:.6f} "
              f"({time.monotonic() - start:.1f} s)", flush=True)
        # [process, (row start, row stop, seq start, seq stop)]: what each process loaded.
        boxes = multihost_utils.process_allgather(np.array([rows.start, rows.stop, seq.start, seq.stop]))
        if jax.process_index() == 0:
            path = os.path.join(args.out, f"{name}.npz")
            np.savez(path + ".tmp.npz", loss=np.float64(loss), boxes=boxes, **{f"grad:{k}": v for k, v in grads.items()})
            os.replace(path + ".tmp.npz", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
