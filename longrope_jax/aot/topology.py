"""TPU slice names (`v5p-256`, `v4-128`, `v5e-64`, `v6e-8`, or `v5p:4x4x8`) -> chip grid, HBM and peak FLOPs,
and the devices libtpu's compiler gives for that grid on a machine without a TPU."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re

GIB = 1 << 30


class MissingLibtpu(RuntimeError):
    """libtpu (the TPU compiler) is not installed in this environment."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. `hbm_bytes`: per chip, as sold; `peak_flops`: bf16 dense per chip."""

    generation: str
    hbm_bytes: int
    peak_flops: float
    cores_per_chip: int  # slice names count TensorCores on v4/v5p (two per chip), chips on v5e/v6e
    dims: int  # torus dimensions
    chip_config: str  # what get_topology_desc wants: megacore chips pair their two cores


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 2, 3, "megacore"),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2, 3, "megacore"),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 1, 2, "default"),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1, 2, "default"),
}
_NAME = re.compile(r"^(v4|v5p|v5e|v6e)-(\d+)$")
_GRID = re.compile(r"^(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})$")
FORMS = "a slice name such as v5p-256, v4-128, v5e-64, v6e-8, or an explicit grid such as v5p:4x4x8"


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user gave it
    chip: Chip
    grid: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def topology_name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.grid))}"

    @property
    def accelerator_type(self) -> str:
        return f"{self.chip.generation}-{self.chips * self.chip.cores_per_chip}"

    @property
    def env_accelerator_type(self) -> str:
        """The slice as libtpu's TPU_ACCELERATOR_TYPE spells it (v5e slices are `v5litepod-N`)."""
        return self.accelerator_type.replace("v5e-", "v5litepod-")

    @property
    def host_bounds(self) -> list[int] | None:
        """Chips per host for a slice smaller than one host (libtpu's default 2x2x1 must divide the grid)."""
        grid = list(self.grid) + [1] * (3 - len(self.grid))
        bounds = [min(g, h) for g, h in zip(grid, (2, 2, 1))]
        return None if bounds == [2, 2, 1] else bounds


def standard_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The grid Cloud TPU builds for a power-of-two chip count: 3-D tori grow 2x2x1, 2x2x2, 2x2x4,
    2x4x4, 4x4x4, 4x4x8, ...; 2-D ones 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, ..."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: only power-of-two slices have a standard grid; give it explicitly "
                         f"(e.g. v5p:4x4x12)")
    if dims == 2:
        grid = [1, 1]
        while math.prod(grid) < chips:
            i = 1 if grid[0] == grid[1] else 0
            grid[i] *= 2
        return tuple(grid)
    if chips < 4:
        return (chips, 1, 1)
    grid = [2, 2, 1]
    while math.prod(grid) < chips:
        top = max(grid)
        i = 2 if all(g == top for g in grid) else max(j for j, g in enumerate(grid) if g < top)
        grid[i] *= 2
    return tuple(grid)


def parse_topology(text: str) -> Topology:
    """`v5p-256` (the Cloud TPU name: TensorCores on v4/v5p, chips on v5e/v6e) or `v5p:4x4x8`."""
    text = str(text).strip()
    if m := _NAME.match(text):
        chip = CHIPS[m.group(1)]
        cores = int(m.group(2))
        if cores % chip.cores_per_chip:
            raise ValueError(f"--topology {text!r}: {chip.generation} slice names count TensorCores, "
                             f"{chip.cores_per_chip} per chip; expected an even number")
        try:
            grid = standard_grid(cores // chip.cores_per_chip, chip.dims)
        except ValueError as e:
            raise ValueError(f"--topology {text!r}: {e}") from None
        return Topology(text, chip, grid)
    if m := _GRID.match(text):
        chip = CHIPS[m.group(1)]
        grid = tuple(int(g) for g in m.group(2).split("x"))
        if len(grid) != chip.dims or min(grid) < 1:
            raise ValueError(f"--topology {text!r}: {chip.generation} grids have {chip.dims} positive sizes")
        return Topology(text, chip, grid)
    raise ValueError(f"--topology {text!r}: expected {FORMS}")


@contextlib.contextmanager
def _environment(**values):
    """Set environment variables for the block only: left set, they would tell later code in this process
    (and its subprocesses) that it runs on a Cloud TPU VM."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if old[k] is None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)


def tpu_devices(topology: Topology) -> list:
    """The slice's devices from libtpu's compiler, on any machine (nothing runs on them; they compile).

    Needs libtpu (`pip install -e '.[tpu]'`); the process keeps JAX_PLATFORMS=cpu for everything else."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise MissingLibtpu("compile: libtpu is not installed; install the TPU extra: pip install -e '.[tpu]' "
                            "(make install does)") from None
    from jax.experimental import topologies

    extra = {} if topology.host_bounds is None else {"chips_per_host_bounds": topology.host_bounds}
    # No metadata server here: name the slice and its (absent) workers, so libtpu does not log failed lookups;
    # concurrent compiles share libtpu's lockfile.
    with _environment(TPU_ACCELERATOR_TYPE=topology.env_accelerator_type, TPU_WORKER_HOSTNAMES="localhost",
                      TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1"):
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.topology_name,
                                            chip_config_name=topology.chip.chip_config, **extra)
    return list(desc.devices)
