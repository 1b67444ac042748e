"""Orbax checkpointing of a training run: train state, data-iterator state and config per step.

Orbax writes each step into a temporary directory and renames it when complete, so a save cut off
mid-way leaves only a tmp directory that `latest_step()` ignores (and `cleanup_tmp_directories`
removes on the next start). Restores take an abstract state carrying the *current* shardings, so a
checkpoint saved under one mesh restores under another.
"""

from __future__ import annotations

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath


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
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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


def abstract(state):
    """ShapeDtypeStructs with the arrays' shardings: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
