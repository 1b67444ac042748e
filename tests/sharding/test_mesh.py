"""The device mesh and shardings derived from logical names: mesh arithmetic, batch and parameter
shardings under overridden rules."""

import jax
import pytest
from jax.sharding import AxisType

from longrope_jax.sharding.mesh import batch_sharding, make_mesh
from longrope_jax.sharding.rules import MESH_AXES, rules_from_config
from tests.sharding.sharded_model import mesh_of, normalize


def test_make_mesh_default_puts_every_device_on_fsdp_with_auto_axes():
    mesh = make_mesh()
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "seq": 1, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert set(mesh.devices.flat) == set(jax.devices())


@pytest.mark.parametrize("kwargs, shape", [
    (dict(data=2, fsdp=-1, tensor=2), (2, 2, 1, 2)),
    (dict(data=-1, fsdp=2, seq=2, tensor=1), (2, 2, 2, 1)),
    (dict(fsdp=1, seq=-1), (1, 1, 8, 1)),
    (dict(data=2, fsdp=2, seq=2, tensor=1), (2, 2, 2, 1)),  # no -1: the sizes must use every device
])
def test_make_mesh_infers_the_minus_one_axis(kwargs, shape):
    mesh = make_mesh(**kwargs)
    assert tuple(mesh.shape[a] for a in MESH_AXES) == shape


def test_make_mesh_reshapes_explicit_devices_in_the_given_order():
    devices = jax.devices()[::-1][:4]
    mesh = make_mesh(fsdp=-1, seq=2, devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "seq": 2, "tensor": 1}
    assert list(mesh.devices.flat) == devices


@pytest.mark.parametrize("kwargs, message", [
    (dict(fsdp=3, seq=2), "data=1 x fsdp=3 x seq=2 x tensor=1 = 6 does not equal 8 devices"),
    (dict(fsdp=-1, seq=3), "the other axes give 3, which does not divide 8 devices"),
    (dict(data=-1, fsdp=-1), "at most one axis may be -1, got 2 (data, fsdp)"),
    (dict(fsdp=0), "make_mesh fsdp=0: expected a positive integer or -1"),
    (dict(tensor=2.0), "make_mesh tensor=2.0"),
])
def test_make_mesh_errors_show_the_arithmetic(kwargs, message):
    with pytest.raises(ValueError) as e:
        make_mesh(**kwargs)
    assert message in str(e.value)


def test_batch_sharding_maps_batch_and_length():
    mesh = mesh_of("fsdp2_seq2_tensor2")
    assert normalize(batch_sharding(mesh).spec, 2) == (("data", "fsdp"), "seq")
    rules = rules_from_config({"batch": "data", "length": None})
    assert normalize(batch_sharding(mesh, rules).spec, 2) == ("data", None)
