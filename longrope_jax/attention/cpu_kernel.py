"""The CPU flash-attention kernel (csrc/flash_cpu.cc) as a JAX op: built with the system C++ compiler
at first use, cached, registered with XLA's FFI, and wrapped with a custom VJP.

Same numbers as `dense_attention` (float32, to rounding) and the same mask rule. Where it cannot run
(no compiler, not float32, a head size or length it does not take), `supports` says so and the model
keeps the XLA path. LONGROPE_JAX_CPU_KERNEL=0 turns it off; CXX picks the compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("csrc") / "flash_cpu.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
BLOCK_Q, BLOCK_K = 128, 128  # forward: queries per task (per head), keys per block; measured, README
BWD_BLOCK_Q, BWD_BLOCK_K = 128, 128  # backward: queries per block, keys per task
_TARGETS = {"longrope_flash_fwd": "LongropeFlashForward", "longrope_flash_bwd": "LongropeFlashBackward"}
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("LONGROPE_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "longrope_jax")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _cpu_signature() -> str:
    """The CPU's model and flags: -march=native code is only valid where they match (a shared cache)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f.read().splitlines(True)[:40] if line.startswith(("model name", "flags")))
    except OSError:
        return platform.processor() or platform.machine()


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernel (once per source, jaxlib, compiler and CPU) and return the shared library's path.
    Written to a temporary file and renamed, so concurrent builders never see half a library."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(f"flash_cpu: no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jax.lib.__version__, version, _cpu_signature(), *FLAGS]).encode())
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"flash_cpu-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"flash_cpu: {' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib


@functools.cache
def _register() -> str | None:
    """Build, load and register the kernel, once per process; None if that worked, else why not (logged)."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("CPU attention kernel unavailable, using XLA attention: %s", e)
        return str(e)
    return None


def unavailable() -> str | None:
    """Why the kernel cannot run here (turned off, or its build failed), or None when it can."""
    if os.environ.get("LONGROPE_JAX_CPU_KERNEL", "1") == "0":
        return "turned off by LONGROPE_JAX_CPU_KERNEL=0"
    return _register()


def available() -> bool:
    """Whether the kernel is built and registered (builds it on first call)."""
    return unavailable() is None


def _shape_problem(q_BxQxHxD, k_BxSxKxD) -> str | None:
    _, q_len, h, d = q_BxQxHxD.shape
    if q_BxQxHxD.dtype != jnp.float32 or k_BxSxKxD.dtype != jnp.float32:
        return f"expected float32 q and k, got {q_BxQxHxD.dtype} and {k_BxSxKxD.dtype}"
    if d % 16 or not 16 <= d <= 256:
        return f"expected a head_dim that is a multiple of 16 in [16, 256], got {d}"
    if q_len % 16 or k_BxSxKxD.shape[1] % 16:
        return f"expected query and key lengths that are multiples of 16, got {q_len} and {k_BxSxKxD.shape[1]}"
    if h % k_BxSxKxD.shape[2]:
        return f"expected query heads ({h}) to be a multiple of kv heads ({k_BxSxKxD.shape[2]})"
    return None


def supports(q_BxQxHxD, k_BxSxKxD) -> bool:
    """Whether the kernel takes these shapes and dtypes and is available here."""
    return _shape_problem(q_BxQxHxD, k_BxSxKxD) is None and available()


def _attrs(d, window, block_q, block_k):
    return dict(window=np.int64(-1 if window is None else window), scale=np.float32(d ** -0.5),
                block_q=np.int64(block_q), block_k=np.int64(block_k))


def _forward(q, k, v, qpos, kpos, qseg, kseg, window):
    b, q_len, h, d = q.shape
    call = jax.ffi.ffi_call("longrope_flash_fwd", (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                                   jax.ShapeDtypeStruct((b, h, q_len), jnp.float32)),
                            vmap_method="sequential")
    return call(q, k, v, qpos, kpos, qseg, kseg, **_attrs(d, window, BLOCK_Q, BLOCK_K))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, qpos, kpos, qseg, kseg, window):
    return _forward(q, k, v, qpos, kpos, qseg, kseg, window)[0]


def _flash_fwd(q, k, v, qpos, kpos, qseg, kseg, window):
    o, lse = _forward(q, k, v, qpos, kpos, qseg, kseg, window)
    return o, (q, k, v, o, lse, qpos, kpos, qseg, kseg)


def _flash_bwd(window, res, do):
    q, k, v, o, lse, qpos, kpos, qseg, kseg = res
    call = jax.ffi.ffi_call("longrope_flash_bwd", tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
                            vmap_method="sequential")
    dq, dk, dv = call(q, k, v, o, do.astype(jnp.float32), lse, qpos, kpos, qseg, kseg,
                      **_attrs(q.shape[-1], window, BWD_BLOCK_Q, BWD_BLOCK_K))
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, q_pos, k_pos, q_seg, k_seg, *, sliding_window=None):
    """Attention equal to `dense_attention` with `attention_mask(q_pos, k_pos, q_seg, k_seg, sliding_window)`,
    computed by the CPU kernel; check `supports` first. Rows that see no key give zeros (as blockwise)."""
    if (problem := _shape_problem(q_BxQxHxD, k_BxSxKxD)) or (problem := unavailable()):
        raise ValueError(f"flash_attention: {problem}")
    ints = [jnp.asarray(x, jnp.int32) for x in (q_pos, k_pos, q_seg, k_seg)]
    return _flash(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, *ints, sliding_window)
