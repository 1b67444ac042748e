"""Building the CPU kernel library (csrc/flash_cpu.cc: flash attention and `materialize`): compiled with
the system C++ compiler at first use, cached per source, jaxlib, compiler and CPU, loaded and registered
with XLA's FFI.

LONGROPE_JAX_CPU_KERNEL=0 turns it off; CXX picks the compiler; LONGROPE_JAX_CACHE (else
$XDG_CACHE_HOME/longrope_jax, else ~/.cache/longrope_jax) holds the built library; where that cannot be
written, a directory under the system's temporary directory does.
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

SOURCE = Path(__file__).with_name("csrc") / "flash_cpu.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
_TARGETS = {"longrope_flash_fwd": "LongropeFlashForward", "longrope_flash_bwd": "LongropeFlashBackward",
            "longrope_materialize": "LongropeMaterialize"}
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


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(d, os.W_OK)


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernel (once per source, jaxlib, compiler and CPU) and return the shared library's path.
    Written to a temporary file and renamed, so concurrent builders never see half a library."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(f"flash_cpu: no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jax.lib.__version__, version, _cpu_signature(), *FLAGS]).encode())
    name = f"flash_cpu-{key.hexdigest()[:16]}.so"
    if out_dir is None:
        out_dir = cache_dir()
        if not (out_dir / name).exists() and not _writable(out_dir):
            fallback = Path(tempfile.gettempdir()) / f"longrope_jax-{os.getuid()}" / "kernels"
            log.warning("kernel cache %s cannot be written (set LONGROPE_JAX_CACHE); building in %s",
                        out_dir, fallback)
            out_dir = fallback
    lib = out_dir / name
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
