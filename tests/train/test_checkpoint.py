"""Resume falls back: the newest checkpoint is checked before it is trusted, an unreadable one is moved aside
to `corrupt-N` (never deleted) and the next newest restores; another model's checkpoint is an error naming the
first differing parameter and both shapes. On a small state, without a model: the trainer test covers the
same path end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax.train.checkpoint import Checkpointer, CheckpointMismatch, NoGoodCheckpoint, abstract


class Loader:
    """The data item's contract: get_state / set_state with bytes (as RowBlocks)."""

    def __init__(self, position=0):
        self.position = position

    def get_state(self) -> bytes:
        return json.dumps({"position": self.position}).encode()

    def set_state(self, state: bytes) -> None:
        self.position = json.loads(state)["position"]

    def start_prefetch(self) -> None:  # grain's restore calls it
        pass


def state(step: int, width: int = 64):
    # 64 KiB of random kernel (incompressible): its own data file, as a real model's arrays are.
    kernel = np.random.RandomState(step).standard_normal((256, width)).astype(np.float32)
    return {"params": {"dense": {"kernel": jnp.asarray(kernel)}, "norm": jnp.ones((width,))},
            "step": jnp.asarray(step, jnp.int32)}


@pytest.fixture
def saved(tmp_path, ml_config):
    """checkpoints/2 and checkpoints/4, each with its state and loader position."""
    ckpt = Checkpointer(tmp_path / "checkpoints", every_steps=1, keep=5, async_save=False)
    for step in (2, 4):
        ckpt.save(step, state(step), Loader(step * 10), ml_config)
    ckpt.close()
    return tmp_path / "checkpoints"


@pytest.fixture
def ml_config():
    import ml_collections

    return ml_collections.ConfigDict({"seed": 0})


def restore(directory, target=None):
    warnings = []
    ckpt = Checkpointer(directory, every_steps=1, keep=5, async_save=False)
    loader = Loader()
    try:
        step, restored = ckpt.restore_latest(abstract(target or state(0)), loader, warn=warnings.append)
    finally:
        ckpt.close()
    return step, restored, loader, warnings


def _truncate(step_dir):
    """Cut the largest array file in half, as a crash or a full disk during the write would."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    f = max(files, key=lambda p: p.stat().st_size)
    assert f.stat().st_size > 10_000
    os.truncate(f, f.stat().st_size // 2)


def _delete_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "does not read back"),
    (_delete_metadata, "metadata"),
])
def test_a_corrupt_latest_step_is_moved_aside_and_the_previous_one_restores(saved, damage, reason):
    damage(saved / "4")
    before = sorted(p.relative_to(saved / "4") for p in (saved / "4").rglob("*"))
    step, restored, loader, warnings = restore(saved)
    assert step == 2 and loader.position == 20
    np.testing.assert_array_equal(restored["params"]["dense"]["kernel"], state(2)["params"]["dense"]["kernel"])
    assert sorted(p.name for p in saved.iterdir()) == ["2", "corrupt-4"]
    assert sorted(p.relative_to(saved / "corrupt-4") for p in (saved / "corrupt-4").rglob("*")) == before  # kept whole
    (warning,) = warnings
    assert "step 4" in warning and reason in warning and "corrupt-4" in warning


def test_an_empty_step_directory_is_moved_aside(saved):
    (saved / "10").mkdir()
    step, _, loader, warnings = restore(saved)
    assert step == 4 and loader.position == 40
    assert (saved / "corrupt-10").is_dir() and not (saved / "10").exists()
    assert "step 10" in warnings[0] and "incomplete" in warnings[0]


def test_a_second_corrupt_copy_of_a_step_keeps_the_first(saved):
    (saved / "corrupt-4").mkdir()
    _truncate(saved / "4")
    step, *_ = restore(saved)
    assert step == 2 and sorted(p.name for p in saved.iterdir()) == ["2", "corrupt-4", "corrupt-4.1"]


def test_another_model_is_an_error_naming_the_parameter_and_both_shapes(saved):
    with pytest.raises(CheckpointMismatch, match=r"params/dense/kernel has shape \(256, 64\) there but \(256, 65\)"):
        restore(saved, target=state(0, width=65))
    assert sorted(p.name for p in saved.iterdir()) == ["2", "4"]  # nothing moved: the steps are fine


def test_no_readable_step_is_an_error_naming_the_workdir(saved):
    for step in ("2", "4"):
        _truncate(saved / step)
    with pytest.raises(NoGoodCheckpoint, match=f"{saved.parent}: no readable checkpoint.*corrupt-2, corrupt-4"):
        restore(saved)
    # And again on the next start: the run does not silently begin afresh next to its old steps.
    with pytest.raises(NoGoodCheckpoint):
        restore(saved)


def test_a_bug_while_restoring_moves_nothing_aside(saved):
    class Broken(Loader):
        def set_state(self, state):
            raise AttributeError("a bug, not a bad file")

    ckpt = Checkpointer(saved, every_steps=1, keep=5, async_save=False)
    with pytest.raises(AttributeError):
        ckpt.restore_latest(abstract(state(0)), Broken(), warn=print)
    ckpt.close()
    assert sorted(p.name for p in saved.iterdir()) == ["2", "4"]


def test_no_checkpoint_at_all_starts_afresh(tmp_path):
    assert restore(tmp_path / "checkpoints")[:2] == (None, None)


def test_shapes_are_compared_by_name_not_by_position():
    from longrope_jax.train.checkpoint import compare_trees

    a = {"params": {"a": jax.ShapeDtypeStruct((2,), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.float32)}}
    compare_trees(a, {"params": {"b": np.zeros(3), "a": np.zeros(2)}}, "here")
    with pytest.raises(CheckpointMismatch, match="params/b is missing there"):
        compare_trees(a, {"params": {"a": np.zeros(2)}}, "here")
