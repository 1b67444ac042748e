"""Orbax checkpointing of a training run: train state, data-iterator state and config per step.

Orbax writes each step into a temporary directory and renames it when complete, so a save cut off
mid-way leaves only a tmp directory that `latest_step()` ignores (and `cleanup_tmp_directories`
removes on the next start). Restores take an abstract state carrying the *current* shardings, so a
checkpoint saved under one mesh restores under another.

`restore_latest` checks the newest step before it trusts it (complete, its metadata reads, its state tree is
the current model's) and falls back: a step that is incomplete or does not read back is moved aside to
`corrupt-N` (never deleted; Orbax ignores the name) with a warning, and the next newest is tried. A step
for another model is an error naming the first differing parameter and both shapes.
"""

from __future__ import annotations

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from longrope_jax.io.files import BadInput, RuntimeFailure, first_line

ITEMS = ("state", "data", "config")
CORRUPT_PREFIX = "corrupt-"
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"


class CheckpointMismatch(BadInput):
    """The workdir's checkpoint holds another model (or another optimizer state) than the config builds."""


class NoGoodCheckpoint(RuntimeFailure):
    """The workdir has checkpoints, but none reads back."""


class Checkpointer:
    def __init__(self, directory, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = epath.Path(directory)
        if "://" not in str(self.directory):
            self.directory = self.directory.absolute()  # orbax wants absolute local paths
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(every_steps, 1),
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def check_step(self, step: int, abstract_state) -> str | None:
        """Why `step` cannot be restored, or None when it looks whole: complete, with readable metadata.
        Raises CheckpointMismatch when its state tree is not `abstract_state`'s."""
        d = self.step_dir(step)
        if not (d / STEP_METADATA_FILE).exists():
            return f"incomplete (no {STEP_METADATA_FILE}; cut off mid-save?)"
        for item in ITEMS:
            if not (d / item).is_dir():
                return f"incomplete (no {item}/)"
        try:
            with ocp.StandardCheckpointer() as reader:
                meta = reader.metadata(d / "state").item_metadata
        except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many kinds; all mean "unreadable")
            return f"its state metadata does not read ({first_line(e)})"
        if meta is None or getattr(meta, "tree", None) is None:
            return "its state metadata is missing"
        compare_trees(abstract_state, meta.tree, f"{d}")
        return None

    def restore_latest(self, abstract_state, loader, warn=print):
        """(step, state) of the newest step that restores, with the loader's position restored in place, or
        (None, None) when there is no checkpoint. Unreadable steps are moved aside to `corrupt-N` (see the
        module docstring); when none is left but some were moved aside, NoGoodCheckpoint."""
        while (step := self.latest_step()) is not None:
            why = self.check_step(step, abstract_state)
            if why is None:
                try:
                    return step, self.restore(step, abstract_state, loader)
                except Exception as e:  # noqa: BLE001
                    if bad := _in_chain(e, BadInput):
                        raise bad from e  # e.g. the data shards changed: the config's fault, not the step's
                    if not _in_chain(e, (ValueError, OSError)):
                        raise  # not a file that fails to read (tensorstore, json, the OS): a bug; keep the step
                    why = f"it does not read back ({first_line(e)})"
            moved = self.move_aside(step)
            warn(f"warning: checkpoint step {step} in {self.directory} is unusable: {why}; moved it to {moved.name} "
                 "and falling back to the previous step")
        corrupt = self.corrupt_steps()
        if corrupt:
            raise NoGoodCheckpoint(
                f"{self.directory.parent}: no readable checkpoint in {self.directory} (unusable steps kept in "
                f"{', '.join(corrupt)}); to start this run afresh move them away, or use another --workdir")
        return None, None

    def corrupt_steps(self) -> list[str]:
        if not self.directory.exists():
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.name.startswith(CORRUPT_PREFIX))

    def move_aside(self, step: int) -> epath.Path:
        """Rename step `step` to `corrupt-<step>` (`corrupt-<step>.<k>` if taken) and forget it."""
        src = self.step_dir(step)
        dst = self.directory / f"{CORRUPT_PREFIX}{step}"
        k = 1
        while dst.exists():
            dst, k = self.directory / f"{CORRUPT_PREFIX}{step}.{k}", k + 1
        if jax.process_index() == 0:
            src.rename(dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint-move-aside-{step}")
        self.manager.reload()
        return dst

    def save(self, step: int, state, loader, config: ml_collections.ConfigDict, *, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(loader),
            config=ocp.args.JsonSave(config.to_dict()),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, loader):
        """Restore `step` into the shardings of `abstract_state` and the loader's position in place."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(loader),
        ))
        return restored["state"]

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _in_chain(e: BaseException, kinds) -> BaseException | None:
    """The first exception of `kinds` in `e`'s cause/context chain, `e` included."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kinds):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_shapes(tree) -> dict[str, tuple]:
    """{'params/layers_0/mlp/up_proj/kernel': shape} of a state tree or of its Orbax metadata."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in flat if hasattr(leaf, "shape")}


def compare_trees(ours, saved, where: str) -> None:
    """A CheckpointMismatch naming the first parameter (then optimizer entry) whose shape differs between
    `ours` (the state the config builds) and `saved` (a checkpoint's metadata), with both shapes."""
    mine, theirs = leaf_shapes(ours), leaf_shapes(saved)
    order = sorted(set(mine) | set(theirs), key=lambda k: (not k.startswith("params/"), list(mine).index(k)
                                                           if k in mine else len(mine)))
    for key in order:
        a, b = mine.get(key), theirs.get(key)
        if a == b:
            continue
        if b is None:
            diff = f"{key} is missing there (this config's model has it, shape {a})"
        elif a is None:
            diff = f"{key} (shape {b}) is there but not in this config's model"
        else:
            diff = f"{key} has shape {b} there but {a} in this config's model"
        raise CheckpointMismatch(f"{where}: checkpoint of another model: {diff}; resume with the config that wrote "
                                 "it (see config.json beside checkpoints/), or use another --workdir")


def abstract(state):
    """ShapeDtypeStructs with the arrays' shardings: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
