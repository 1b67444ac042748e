"""Slice names map to the chip grids Cloud TPU builds, and libtpu's compiler gives their devices."""

import pytest

from longrope_jax.aot.topology import CHIPS, parse_topology, standard_grid, tpu_devices

# Cloud TPU's published shapes (cloud.google.com/tpu/docs: v4, v5p and v5e/v6e topologies).
PUBLISHED = {"v4-8": (2, 2, 1), "v4-32": (2, 2, 4), "v4-64": (2, 4, 4), "v4-128": (4, 4, 4), "v4-256": (4, 4, 8),
             "v4-512": (4, 8, 8), "v4-4096": (8, 16, 16), "v5p-8": (2, 2, 1), "v5p-128": (4, 4, 4),
             "v5p-256": (4, 4, 8), "v5p-1024": (8, 8, 8), "v5e-1": (1, 1), "v5e-8": (2, 4), "v5e-16": (4, 4),
             "v5e-64": (8, 8), "v5e-256": (16, 16), "v6e-64": (8, 8), "v6e-256": (16, 16)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_slice_names_give_the_published_grids(name):
    t = parse_topology(name)
    assert t.grid == PUBLISHED[name]
    assert t.accelerator_type == name  # the round trip TPU_ACCELERATOR_TYPE expects


def test_an_explicit_grid_is_taken_as_given():
    t = parse_topology("v5p:4x4x12")
    assert (t.grid, t.chips, t.accelerator_type, t.chip) == ((4, 4, 12), 192, "v5p-384", CHIPS["v5p"])


@pytest.mark.parametrize("text, message", [
    ("v9-8", "expected a slice name such as v5p-256"),
    ("tpu", "expected a slice name"),
    ("v4-7", "count TensorCores, 2 per chip"),
    ("v5p-384", "only power-of-two slices have a standard grid; give it explicitly"),
    ("v5e:2x2x2", "v5e grids have 2 positive sizes"),
    ("v5p:0x2x2", "v5p grids have 3 positive sizes"),
])
def test_bad_topologies_name_what_was_expected(text, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_topology(text)
    assert text in str(e.value) and "\n" not in str(e.value)


def test_standard_grids_hold_the_chip_count():
    for dims in (2, 3):
        for k in range(0, 12):
            assert __import__("math").prod(standard_grid(2**k, dims)) == 2**k


def test_libtpu_compiler_gives_the_slices_devices():
    devices = tpu_devices(parse_topology("v5p:2x2x1"))
    assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
