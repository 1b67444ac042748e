"""What accelerator this host has, decided before jax starts (no jax import here).

With libtpu installed (the `[tpu]` extra, which `compile` needs) every jax process on a machine
without a TPU probes for one: it prints libtpu start-up errors and concurrent processes collide on
libtpu's lockfile. `quiet_tpu_probe()` prevents that by choosing the CPU backend on such hosts, and
changes nothing on a Cloud TPU VM, with a GPU plugin, when JAX_PLATFORMS is set, or once jax is imported.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

# Signals of a Cloud TPU VM. Env vars: GKE and queued-resource TPU VMs export the worker list
# (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES) and the slice type (TPU_ACCELERATOR_TYPE);
# CLOUD_TPU_TASK_ID is set by older TPU VM images. Plain GCE TPU VMs keep these in the metadata
# server instead, so the hardware is checked too: /dev/accel* (v2-v5e) or a Google PCI device
# with a TPU device id (v5p, v6e and later sit behind VFIO, and /dev/vfio alone also means GPU
# passthrough). The ids mirror jax._src.hardware_utils.
TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_ACCELERATOR_TYPE", "CLOUD_TPU_TASK_ID")
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def on_cloud_tpu_vm() -> bool:
    """Whether this host is a Cloud TPU VM (env vars or TPU hardware; see above)."""
    if any(os.environ.get(v) for v in TPU_ENV_VARS) or glob.glob("/dev/accel[0-9]*"):
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


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def quiet_tpu_probe() -> bool:
    """Select the CPU backend on a host that has libtpu but no TPU (and no GPU plugin). True if it did."""
    if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules or not _installed("libtpu"):
        return False
    if on_cloud_tpu_vm() or any(_installed(p) for p in _GPU_PLUGINS):
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    return True
