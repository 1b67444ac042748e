"""Two processes x 4 CPU devices (gloo) give the same loss and gradients as one unsharded process.

Each process loads only its `local_slices` of the global batch; layouts cover rows split between
hosts and a sequence split between hosts (tests/multihost_worker.py). The reference is the
unsharded single-device forward + backward with the model's own `init_params`.
"""

import functools
import os
import sys

import jax
import numpy as np
import pytest

from longrope_jax import attention as attn_lib
from longrope_jax.model import Llama, init_params
from tests import multihost_worker as worker
from tests.processes import free_port, run_all

WORKER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "multihost_worker.py")  # tests/
NUM_PROCESSES = 2
TIMEOUT_S = 180  # a hung collective fails the test instead of hanging CI
RTOL = 1e-5

# Ring attention runs shard_map over 'seq': it turns on here as soon as attention.py offers it.
ATTENTIONS = ["dense"] + (["ring"] if "ring" in attn_lib.ATTENTION_IMPLS else [])

# Per layout: the (row start, row stop, seq start, seq stop) each process must load.
EXPECTED_BOXES = {
    "rows_per_host": [[0, 4, 0, 32], [4, 8, 0, 32]],
    "seq_across_hosts": [[0, 8, 0, 16], [0, 8, 16, 32]],
}


def run_workers(attention: str, out_dir) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    coordinator = f"127.0.0.1:{free_port()}"
    jobs = [([sys.executable, WORKER, "--coordinator", coordinator, "--num-processes", str(NUM_PROCESSES),
              "--process-id", str(i), "--attention", attention, "--out", str(out_dir)], env,
             out_dir / f"process{i}.log") for i in range(NUM_PROCESSES)]
    run_all(jobs, timeout_s=TIMEOUT_S, what="multi-host workers")


@functools.cache
def reference() -> tuple[float, dict[str, np.ndarray]]:
    """Unsharded, single device: dense attention and eagerly initialized params."""
    params = init_params(worker.CONFIG, jax.random.key(worker.SEED))
    model = Llama(worker.CONFIG)
    loss, grads = jax.jit(jax.value_and_grad(lambda p, b: worker.loss_fn(model, p, b)))(params, worker.global_arrays())
    return float(loss), worker.flat(grads)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_two_processes_match_unsharded_loss_and_gradients(attention, tmp_path):
    run_workers(attention, tmp_path)
    ref_loss, ref_grads = reference()
    for layout, boxes in EXPECTED_BOXES.items():
        with np.load(tmp_path / f"{layout}.npz") as f:
            got = {k: f[k] for k in f.files}
        np.testing.assert_array_equal(got.pop("boxes"), boxes, err_msg=f"{layout}: data each process loaded")
        np.testing.assert_allclose(got.pop("loss"), ref_loss, rtol=RTOL, err_msg=f"{layout}: loss")
        grads = {k.removeprefix("grad:"): v for k, v in got.items()}
        assert sorted(grads) == sorted(ref_grads), layout
        for name, ref in ref_grads.items():
            # rtol on every element, plus an absolute floor at rtol of the leaf's largest entry, for
            # entries that are near zero (sums in another order differ there by ~1e-8).
            np.testing.assert_allclose(grads[name], ref, rtol=RTOL, atol=RTOL * np.abs(ref).max(),
                                       err_msg=f"{layout}: gradient {name}")
