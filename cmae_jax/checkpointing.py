"""Orbax checkpoints of the train state plus the input pipeline's position, and reading
parts of one (cmae_jax.weights resolves a path to the folder to read)."""

import gc
import inspect
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils


def orbax_path(path: str) -> epath.Path:
    """`path` as orbax wants it: absolute (it reads no metadata of a relative folder); a
    cloud path (gs://...) already is."""
    return epath.Path(path if "://" in path else os.path.abspath(path))


class Checkpointer:
    """Periodic saves under WORKDIR/checkpoints, keeping the newest `keep`, resumable."""

    def __init__(self, workdir: str, *, keep: int, save_every_steps: int):
        self.directory = orbax_path(workdir) / "checkpoints"
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

    def read_position(self, step: int) -> dict:
        """The data position saved with `step` (reads no arrays)."""
        return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data

    def last_finite_step(self) -> int | None:
        """The newest checkpoint whose recorded loss is finite (or unrecorded), or None."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            loss = self.read_position(step).get("loss")
            if loss is None or math.isfinite(loss):
                return step
        return None

    def set_aside(self, step: int, reason: str) -> None:
        """Moves an unreadable checkpoint out of the manager's sight, never deleting it."""
        if jax.process_index() == 0:
            folder = self.directory / str(step)
            aside = self.directory / f"unreadable_{step}_{int(time.time())}"
            folder.rename(aside)
            logging.warning("Checkpoint %s is unreadable (%s); moved to %s.", folder, reason, aside)
        multihost_utils.sync_global_devices(f"checkpoint set aside {step}")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


# -------------------------------------------------------------------- Resuming a run


class DataOrderError(ValueError):
    """Resuming would silently change the order of the training data."""


class StateMismatchError(ValueError):
    """A checkpoint's arrays do not fit the state this config builds."""


def data_position(
    config: ml_collections.ConfigDict, next_step: int, steps_per_epoch: int, data_offset: int = 0
) -> dict:
    """What a checkpoint records about the input stream: enough to resume it exactly.

    `data_offset` counts the batches a rollback skipped: the stream continues at batch
    next_step + data_offset.
    """
    return {
        "next_step": int(next_step),
        "data_offset": int(data_offset),
        "epoch": int((next_step + data_offset) // steps_per_epoch),
        "examples_seen": int(next_step * config.input.global_batch_size),
        "seed": int(config.seed),
        "global_batch_size": int(config.input.global_batch_size),
        "steps_per_epoch": int(steps_per_epoch),
    }


def check_resumable(position: dict, expected: dict, directory: Any) -> None:
    """Refuses to resume a run whose data order would silently change."""
    for key in ("seed", "global_batch_size", "steps_per_epoch"):
        if position.get(key) != expected[key]:
            raise DataOrderError(
                f"The checkpoint in {directory} was written with {key}={position.get(key)}, "
                f"this config has {key}={expected[key]}: resuming would change the data order. "
                "Use the same value, or a new --workdir to start afresh (the old one is kept)."
            )


def restore_latest(
    checkpointer: Checkpointer, abstract_state: Any, expected: dict
) -> tuple[Any, dict] | None:
    """(state, data position) of the newest readable checkpoint, its data order checked; or
    None without one. An unreadable checkpoint (cut short, truncated or deleted files) is
    logged and set aside (Checkpointer.set_aside), and the next older one is tried."""
    while (step := checkpointer.latest_step()) is not None:
        try:
            saved = saved_structure(checkpointer.directory / str(step) / "state")
        except Exception as error:  # no readable metadata: cut short or damaged
            checkpointer.set_aside(step, f"{type(error).__name__}: {str(error)[:300]}")
            continue
        if leaf_shapes(saved) != leaf_shapes(abstract_state):
            raise StateMismatchError(
                f"The checkpoint of step {step} in {checkpointer.directory} holds a state of "
                "other shapes than this config builds (another config.model, optimiser or "
                "method?). Resume with the config it was written with (its config.json), or "
                "use a new --workdir."
            )
        try:
            state, position = checkpointer.restore(step, abstract_state)
        except Exception as error:  # whatever the storage layer raises for broken files
            reason = f"{type(error).__name__}: {str(error)[:300]}"
        else:
            check_resumable(position, expected, checkpointer.directory)
            return state, position
        discard_abandoned_reads()
        checkpointer.set_aside(step, reason)
    return None


def discard_abandoned_reads() -> None:
    """Collects the array reads a failed restore abandoned, without their tracebacks.

    When one array of a checkpoint cannot be read, orbax gives up on the others' pending
    read coroutines; each would print the same error again as an "Exception ignored"
    traceback (some 65 lines) whenever the garbage collector met it. The error is logged
    once, where the checkpoint is set aside.
    """
    report = sys.unraisablehook

    def report_all_but_coroutines(unraisable: Any) -> None:
        if not inspect.iscoroutine(unraisable.object):
            report(unraisable)

    sys.unraisablehook = report_all_but_coroutines
    try:
        gc.collect()
    finally:
        sys.unraisablehook = report


# -------------------------------------------------------------------- Parts of a step folder


# A step folder holds the train state in `state`; a finished run may also write there, in
# `published`, the parameters it hands to readers in place of its train state (MAE-CT
# stage 3: the EMA encoder); readers of other runs then take those.
STATE = "state"
PUBLISHED = "published"


def publish(checkpoint_dir: epath.Path, step: int, tree: Any) -> None:
    """Writes `tree` (e.g. {'params', 'batch_stats', ...}, laid out as the train state) as
    what the run hands to readers: checkpoint_dir/<step>/published, which
    weights.find_checkpoint (and so weights.load_params) then prefers to the step's train
    state. Every process calls it.
    """
    target = epath.Path(checkpoint_dir) / str(step) / PUBLISHED
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, tree, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    logging.info("Published %s", target)


def saved_structure(state_dir: epath.Path) -> Any:
    """The tree of array metadata (shapes, dtypes) an orbax checkpoint item holds; reads no data."""
    return ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree


def leaf_shapes(tree: Any) -> list[tuple[int, ...]]:
    """The sorted shapes of a tree's array leaves: equal for the same state, whatever the
    container types (dataclasses and named tuples come back from orbax as dicts)."""
    return sorted(tuple(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def same_shapes(saved: Any, abstract: Any) -> bool:
    """Whether two trees have the same structure and leaf shapes."""
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
    try:
        return shapes(saved) == shapes(abstract)
    except (TypeError, ValueError):
        return False


def restore_parts(state_dir: epath.Path, item: Any) -> Any:
    """Restores only the sub-trees `item` names (ShapeDtypeStructs with shardings), in place.

    E.g. item={'params': {'encoder': abstract_encoder}} reads the encoder of any run here
    straight into its target sharding, and nothing else.
    """
    return ocp.PyTreeCheckpointer().restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        ),
    )
