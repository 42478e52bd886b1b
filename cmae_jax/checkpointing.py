"""Orbax checkpoints of the train state plus the input pipeline's position, and loading
parts of any run's checkpoint (e.g. its encoder) for another trainer or an evaluation."""

import math
import os
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from cmae_jax import workdir as workdir_files


class Checkpointer:
    """Periodic saves under WORKDIR/checkpoints, keeping the newest `keep`, resumable."""

    def __init__(self, workdir: str, *, keep: int, save_every_steps: int):
        # orbax wants an absolute path; a cloud path (gs://...) already is one.
        local = "://" not in workdir
        self.directory = epath.Path(os.path.abspath(workdir) if local else workdir) / "checkpoints"
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
            checkpointer.set_aside(step, f"{type(error).__name__}: {str(error)[:300]}")
            continue
        check_resumable(position, expected, checkpointer.directory)
        return state, position
    return None


# -------------------------------------------------------------------- Loading parts of a run


# A step folder holds the train state in `state`; a finished run may also write there, in
# `published`, the parameters it hands to readers in place of its train state (MAE-CT
# stage 3: the EMA encoder); readers of other runs then take those.
STATE = "state"
PUBLISHED = "published"


def find_checkpoint(path: str) -> epath.Path:
    """The folder of parameters to read from the checkpoint `path` names: a step folder's
    `published` parameters when the run wrote some, else its `state`.

    `path` may be a workdir of any trainer here (its newest checkpoint; for a workdir of
    stage sub-folders such as MAE-CT's 1_mae, 2_head, 3_tune, that of the last stage, in
    name order, that has one), its checkpoints/ folder, one step folder checkpoints/N, or
    one item of a step folder (checkpoints/N/state: the train state even where the run
    published something else, e.g. MAE-CT's raw encoder).
    A published checkpoint (file or model folder, see cmae_jax.interop) is its own path.
    """
    from cmae_jax import interop

    if interop.is_published_checkpoint(path):
        return epath.Path(path)
    root = epath.Path(path)
    if root.name in (STATE, PUBLISHED) and root.is_dir():
        return root
    if (root / STATE).exists():
        return _readers_item(root)
    stage_folders = []
    if root.is_dir():
        stage_folders = sorted(
            (c / "checkpoints" for c in root.iterdir() if c.is_dir()), reverse=True
        )
    for folder in (root / "checkpoints", root, *stage_folders):
        if folder.is_dir():
            steps = [int(c.name) for c in folder.iterdir() if c.name.isdigit()]
            steps = [s for s in steps if (folder / str(s) / STATE).exists()]
            if steps:
                return _readers_item(folder / str(max(steps)))
    raise FileNotFoundError(
        f"No checkpoint of this project at {path}: give a workdir (e.g. a MAE run or a MAE-CT "
        "stage folder), its checkpoints/ folder or a step folder checkpoints/N."
    )


def _readers_item(step_folder: epath.Path) -> epath.Path:
    published = step_folder / PUBLISHED
    return published if published.exists() else step_folder / STATE


def publish(checkpoint_dir: epath.Path, step: int, tree: Any) -> None:
    """Writes `tree` (e.g. {'params', 'batch_stats', ...}, laid out as the train state) as
    what the run hands to readers: checkpoint_dir/<step>/published, which find_checkpoint
    (and so load_params) then prefers to the step's train state. Every process calls it.
    """
    target = epath.Path(checkpoint_dir) / str(step) / PUBLISHED
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, tree, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    logging.info("Published %s", target)


def run_folder(state_dir: epath.Path) -> epath.Path:
    """The workdir that wrote the checkpoint whose `state` folder is `state_dir`."""
    return state_dir.parent.parent.parent


def run_config_json(path: str) -> dict[str, Any] | None:
    """The config.json of the run that wrote the checkpoint `path` names, or None without one
    (for a published checkpoint: the config its architecture implies)."""
    from cmae_jax import interop

    if interop.is_published_checkpoint(path):
        return interop.run_config(path)
    return workdir_files.read_json(run_folder(find_checkpoint(path)), "config.json")


def saved_structure(state_dir: epath.Path) -> Any:
    """The tree of array metadata (shapes, dtypes) a checkpoint's state holds; reads no data
    (a published checkpoint, see cmae_jax.interop, is read whole)."""
    from cmae_jax import interop

    if interop.is_published_checkpoint(state_dir):
        return interop.saved_structure(state_dir)
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


def describe_encoder(encoder: dict) -> str:
    """E.g. '12 blocks (scanned), 768 wide' for an encoder params tree (arrays or shapes)."""
    if "blocks" in encoder:
        depth = jax.tree.leaves(encoder["blocks"])[0].shape[0]
        layout = "scanned"
    else:
        depth = sum(k.startswith("block_") for k in encoder)
        layout = "unrolled"
    width = encoder["cls"].shape[-1] if "cls" in encoder else "?"
    return f"{depth} blocks ({layout}), {width} wide"


def load_params(
    path: str,
    abstract_params: dict,
    *,
    required: tuple[str, ...] = ("encoder",),
    optional: tuple[str, ...] = (),
    abstract_batch_stats: dict | None = None,
) -> tuple[dict, dict]:
    """(params, batch_stats) of the checkpoint at `path` (see find_checkpoint: a finished
    run's published parameters where it wrote some, e.g. MAE-CT stage 3's EMA encoder), for
    a new run.

    Restores params[key] for each `required` key (an error naming the shapes if the saved
    one differs, e.g. another config.model) and for each `optional` key whose saved params
    and BatchNorm statistics match `abstract_params` / `abstract_batch_stats`; nothing
    else is read. Leaves land in the shardings of the abstract trees (ShapeDtypeStructs).
    `path` may also name a published checkpoint (cmae_jax.interop), read the same way.
    """
    from cmae_jax import interop

    if interop.is_published_checkpoint(path):
        stats = abstract_batch_stats
        return interop.load_params(
            path, abstract_params, required=required, optional=optional, abstract_batch_stats=stats
        )
    state_dir = find_checkpoint(path)
    saved = saved_structure(state_dir)
    saved_params, saved_stats = saved["params"], saved.get("batch_stats") or {}
    abstract_batch_stats = abstract_batch_stats or {}
    for key in required:
        if not same_shapes(saved_params.get(key), abstract_params[key]):
            described = abstract_params[key]
            if key == "encoder":
                saved_form = describe_encoder(saved_params.get(key) or {})
                described = f"{describe_encoder(described)}; the saved one: {saved_form}"
            raise ValueError(
                f"The {key} in {state_dir} has other shapes than the one config.model "
                f"describes ({described}); use the config.model that checkpoint was trained "
                "with (config.model.scan_layers included)."
            )
    matching = [
        key
        for key in optional
        if same_shapes(saved_params.get(key), abstract_params.get(key))
        and same_shapes(saved_stats.get(key), abstract_batch_stats.get(key))
    ]
    item = {"params": {k: abstract_params[k] for k in (*required, *matching)}}
    stats_keys = [k for k in matching if k in abstract_batch_stats]
    if stats_keys:
        item["batch_stats"] = {k: abstract_batch_stats[k] for k in stats_keys}
    restored = restore_parts(state_dir, item)
    logging.info("Loaded %s from %s", ", ".join(item["params"]), state_dir)
    return restored["params"], restored.get("batch_stats", {})
