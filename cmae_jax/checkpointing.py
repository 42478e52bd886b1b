"""Orbax checkpoints of the train state plus the input pipeline's position."""

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    """Periodic saves under WORKDIR/checkpoints, keeping the newest `keep`, resumable."""

    def __init__(self, workdir: str, *, keep: int, save_every_steps: int):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=save_every_steps, create=True
            ),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_position: dict, *, force: bool = False) -> bool:
        """Saves asynchronously when `step` is due (or `force`); every process must call it."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores `step` into `abstract_state`'s shapes, dtypes and shardings.

        `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings (or of arrays).
        """
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.data

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
