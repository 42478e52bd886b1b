"""Weights from a path: a run of this project (its orbax checkpoints) or a published file.

Every place that takes a checkpoint (--config.init of an evaluation, --config.init_from of
pretraining, config.stages.<stage>.init_from of MAE-CT, the convert and export commands)
resolves its path here: `find_checkpoint` picks the folder of parameters to read,
`load_params` reads parts of it into a new run, `run_config_json` tells what wrote it, and
`check_readable` refuses a bad path before anything is written.
"""

from __future__ import annotations

from typing import Any

import jax
from absl import logging
from etils import epath

from cmae_jax import checkpointing, interop
from cmae_jax import workdir as workdir_files

PUBLISHED_HINT = (
    "Or give a published checkpoint: a .pth/.bin/.safetensors file or a folder holding "
    "model.safetensors (README, 'Published checkpoints')."
)


class CheckpointError(ValueError):
    """A path that names no readable checkpoint; the message names the path and the fix."""


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
    if interop.is_published_checkpoint(path):
        return epath.Path(path)
    # A relative config.init, as the README's commands give it, failed to load until
    # 2026-12-05: orbax read no metadata of the relative folder.
    root = checkpointing.orbax_path(path)
    if root.name in (checkpointing.STATE, checkpointing.PUBLISHED) and root.is_dir():
        return root
    if (root / checkpointing.STATE).exists():
        return _readers_item(root)
    for folder in (root / "checkpoints", root, *_stage_checkpoint_folders(root)):
        if folder.is_dir():
            steps = [int(c.name) for c in folder.iterdir() if c.name.isdigit()]
            steps = [s for s in steps if (folder / str(s) / checkpointing.STATE).exists()]
            if steps:
                return _readers_item(folder / str(max(steps)))
    raise FileNotFoundError(
        f"No checkpoint of this project at {path}: give a workdir (e.g. a MAE run or a MAE-CT "
        "stage folder), its checkpoints/ folder or a step folder checkpoints/N."
    )


def _stage_checkpoint_folders(root: epath.Path) -> list[epath.Path]:
    """The checkpoints/ folders of a workdir's stage sub-folders (MAE-CT's 1_mae, 2_head,
    3_tune), the last stage first."""
    if not root.is_dir():
        return []
    return sorted((c / "checkpoints" for c in root.iterdir() if c.is_dir()), reverse=True)


def _readers_item(step_folder: epath.Path) -> epath.Path:
    published = step_folder / checkpointing.PUBLISHED
    return published if published.exists() else step_folder / checkpointing.STATE


def run_folder(state_dir: epath.Path) -> epath.Path:
    """The workdir that wrote the checkpoint whose `state` folder is `state_dir`."""
    return state_dir.parent.parent.parent


def run_config_json(path: str) -> dict[str, Any] | None:
    """The config.json of the run that wrote the checkpoint `path` names, or None without one
    (for a published checkpoint: the config its architecture implies)."""
    if interop.is_published_checkpoint(path):
        return interop.run_config(path)
    return workdir_files.read_json(run_folder(find_checkpoint(path)), "config.json")


def saved_structure(state_dir: epath.Path) -> Any:
    """The tree of array metadata (shapes, dtypes) the checkpoint folder `state_dir` (see
    find_checkpoint) holds; reads no data of a run here (a published checkpoint is read whole)."""
    if interop.is_published_checkpoint(state_dir):
        return interop.saved_structure(state_dir)
    return checkpointing.saved_structure(state_dir)


def check_readable(path: str) -> None:
    """Raises CheckpointError unless `path` names a checkpoint whose parameters can be read.

    Reads the array metadata of a run here and the whole of a published file (whose format
    is only known once read), so that a bad path fails before a run writes anything.
    """
    try:
        state_dir = find_checkpoint(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{e} {PUBLISHED_HINT}") from None
    if interop.is_published_checkpoint(path):
        try:
            interop.import_checkpoint(path)
        except ValueError as e:  # unreadable file, unknown layout, position table
            raise CheckpointError(str(e)) from None
        return
    try:
        saved = checkpointing.saved_structure(state_dir)
    except Exception as e:  # whatever the storage layer raises for missing or broken files
        raise CheckpointError(
            f"{path}: the checkpoint in {state_dir} cannot be read ({type(e).__name__}: "
            f"{str(e)[:300]}). Give another step folder or run."
        ) from None
    if not isinstance(saved, dict) or "params" not in saved:
        raise CheckpointError(f"{path}: the checkpoint in {state_dir} holds no parameters.")


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
    if interop.is_published_checkpoint(path):
        stats = abstract_batch_stats
        return interop.load_params(
            path, abstract_params, required=required, optional=optional, abstract_batch_stats=stats
        )
    state_dir = find_checkpoint(path)
    saved = checkpointing.saved_structure(state_dir)
    saved_params, saved_stats = saved["params"], saved.get("batch_stats") or {}
    abstract_batch_stats = abstract_batch_stats or {}
    same_shapes = checkpointing.same_shapes
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
    restored = checkpointing.restore_parts(state_dir, item)
    logging.info("Loaded %s from %s", ", ".join(item["params"]), state_dir)
    return restored["params"], restored.get("batch_stats", {})
