"""A published checkpoint (file or HF folder) as this project's parameter trees and config.

`import_checkpoint` picks the reader by the file's keys, infers the architecture from the
shapes, checks the fixed position tables against ours and reports what it loaded and
what it left out. `load_params` and `run_config` are what cmae_jax.weights hands a path
to when it names a published checkpoint instead of a run of this project.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from cmae_jax import checkpointing, config_defaults
from cmae_jax.interop import (
    cmae_official,
    hf_vitmae,
    mae_timm,
    maect_official,
    positions,
    state_dicts,
    torch_layout,
)
from cmae_jax.interop.architecture import Architecture, decoder_sizes, encoder_architecture

# Weight files of a model folder (HF transformers, timm hub), in the order looked for.
FOLDER_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# MAE's evaluation view: resize to 256, centre crop 224.
EVAL_CROP_FRACTION = 0.875


@dataclasses.dataclass
class ImportedCheckpoint:
    """A published checkpoint in this project's terms, with what was and was not loaded."""

    path: str
    format: str
    method: str  # config.method of the model these parts belong to
    architecture: Architecture
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    normalization: tuple[tuple[float, ...], tuple[float, ...]]
    left_out: list[str]
    notes: list[str]

    def report(self) -> str:
        """What was read, loaded and left out, one item a line."""
        lines = [
            f"{self.path}: {self.format} checkpoint, {self.architecture.describe()}",
            f"  loaded: {', '.join(self.params)}",
        ]
        lines += [f"  left out: {item}" for item in self.left_out]
        lines += [f"  note: {item}" for item in self.notes]
        return "\n".join(lines)


def is_published_checkpoint(path: str) -> bool:
    """Whether `path` is a tensor file or a model folder rather than a run of this project."""
    root = epath.Path(path)
    if root.is_dir():
        return any((root / name).exists() for name in FOLDER_WEIGHTS)
    return state_dicts.is_tensor_file(path) and root.is_file()


def _read_folder(folder: epath.Path) -> tuple[dict[str, Any], dict | None, dict | None]:
    """(tensors, config.json, preprocessor_config.json) of a model folder."""

    def read(name: str) -> Any:
        return json.loads((folder / name).read_text()) if (folder / name).exists() else None

    name = next(n for n in FOLDER_WEIGHTS if (folder / n).exists())
    if name.endswith(".index.json"):  # sharded: {'weight_map': {tensor: file}}
        files = sorted(set(read(name)["weight_map"].values()))
        tensors = {}
        for file in files:
            tensors.update(state_dicts.read_tensor_file(str(folder / file)))
    else:
        tensors = state_dicts.read_tensor_file(str(folder / name))
    return tensors, read("config.json"), read("preprocessor_config.json")


def read_torch_checkpoint(path: str) -> torch_layout.TorchCheckpoint:
    """The parts of the checkpoint at `path`, read by the reader its keys call for."""
    root = epath.Path(path)
    config = preprocessor = None
    if root.is_dir():
        content, config, preprocessor = _read_folder(root)
    else:
        content = state_dicts.read_tensor_file(path)
    try:
        if maect_official.is_maect(content, path):
            checkpoint = maect_official.read_maect(content, path)
        else:
            keys = torch_layout.unwrap_state_dict(content)
            if any(k.endswith(hf_vitmae.SIGNATURE) for k in keys):
                checkpoint = hf_vitmae.read_hf(keys, config)
            elif any(k.endswith(cmae_official.SIGNATURE) for k in keys):
                checkpoint = cmae_official.read_cmae(content)
            elif "patch_embed.proj.weight" in keys:
                checkpoint = mae_timm.read_mae_timm(content)
            else:
                raise state_dicts.CheckpointFileError(
                    f"{path} holds no ViT of the families read here (official MAE, timm, HF "
                    f"ViTMAE, CMAE, MAE-CT): found {torch_layout.summarize(keys) or 'no tensors'}."
                )
    except torch_layout.LayoutError as e:
        raise torch_layout.LayoutError(f"{path}: {e}") from None
    if preprocessor and "image_mean" in preprocessor and "image_std" in preprocessor:
        checkpoint.normalization = (
            tuple(preprocessor["image_mean"]),
            tuple(preprocessor["image_std"]),
        )
    return checkpoint


def _position_order(
    part: torch_layout.Part,
    side: int | None,
    what: str,
    checkpoint: torch_layout.TorchCheckpoint,
    is_encoder: bool,
) -> np.ndarray | None:
    """Checks part['pos_embed'] against our table; returns the channel permutation that
    makes ours apply (None: none needed). An encoder's non-zero cls row is folded into the
    cls token (the same sum)."""
    if "pos_embed" not in part:
        checkpoint.notes.append(f"{what}: no position table stored; MAE's sin-cos is assumed")
        return None
    rows, cls_row, stored_side = positions.split_table(part.pop("pos_embed"), what)
    if side is not None and stored_side != side:
        raise positions.PositionTableError(
            f"{what}: position table of a {stored_side}x{stored_side} grid, the encoder's "
            f"is {side}x{side}."
        )
    if cls_row is not None and np.any(cls_row != 0):
        if not is_encoder:
            raise positions.PositionTableError(f"{what}: the cls slot of pos_embed is not zero.")
        part["cls_token"] = part["cls_token"] + cls_row.reshape(part["cls_token"].shape)
        checkpoint.notes.append(f"{what}: the cls row of pos_embed is added to the cls token")
    layout, deviation = positions.table_layout(rows, stored_side, what)
    if layout is None:
        message = (
            f"{what}: the stored pos_embed differs from the fixed 2-D sin-cos table by up to "
            f"{deviation:.3g} (in either channel order)"
        )
        if not checkpoint.fine_tuned:
            raise positions.PositionTableError(
                f"{message}. This project's ViT adds that fixed table, so it cannot compute "
                "what this checkpoint computes."
            )
        checkpoint.notes.append(f"{message}: trained during fine-tuning; the fixed table is used")
        return None
    if layout == positions.ROW_FIRST_LAYOUT:
        checkpoint.notes.append(
            f"{what}: position table {layout}; channels reordered so that ours applies "
            "(the same outputs, channels in this project's order)"
        )
        return positions.half_swap(rows.shape[-1])
    return None


def _decoders(
    checkpoint: torch_layout.TorchCheckpoint,
    architecture: Architecture,
    side: int | None,
    encoder_perm: np.ndarray | None,
    params: dict[str, Any],
) -> Architecture:
    """Converts the pixel and feature decoders into `params`; returns the architecture
    with their sizes. A decoder this project's model cannot hold is left out, with why."""
    pixel_out = architecture.patch_size**2 * architecture.channels
    sizes: dict[str, Any] = {}
    for name, out_dim in (("pixel_decoder", pixel_out), ("feature_decoder", architecture.width)):
        part = checkpoint.parts.get(name)
        if part is None:
            continue
        what = name.replace("_", " ")
        dims = decoder_sizes(part, checkpoint.decoder_heads, what)
        pixel = sizes.get("pixel_decoder")
        fits_model = dims.out_dim == out_dim and (
            pixel is None or (dims.width, dims.num_heads) == (pixel.width, pixel.num_heads)
        )
        if not fits_model:
            checkpoint.left_out.append(
                f"{what} ({dims.width} wide, {dims.num_heads} heads, output {dims.out_dim}): "
                f"this project's CMAE needs output {out_dim}"
                + (" and the pixel decoder's width and heads" if pixel else "")
            )
            continue
        perm = _position_order(part, side, what, checkpoint, is_encoder=False)
        tree = torch_layout.decoder_params(part, dims.num_heads, what)
        if perm is not None or encoder_perm is not None:
            keep = lambda p, n: np.arange(n) if p is None else p
            tree = positions.permute_decoder(
                tree,
                keep(encoder_perm, architecture.width),
                keep(perm, dims.width),
                encoder_perm if name == "feature_decoder" else None,
            )
        params[name] = tree
        sizes[name] = dims
    return dataclasses.replace(architecture, **sizes)


def _default_normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if channels == 3:
        return config_defaults.IMAGENET_MEAN, config_defaults.IMAGENET_STD
    return (0.5,) * channels, (0.5,) * channels


def import_checkpoint(path: str) -> ImportedCheckpoint:
    """Reads a published checkpoint into this project's params and batch_stats trees."""
    checkpoint = read_torch_checkpoint(path)
    if "encoder" not in checkpoint.parts:
        raise torch_layout.LayoutError(f"{path}: no encoder found ({checkpoint.format}).")
    try:
        encoder_part = checkpoint.parts["encoder"]
        architecture = encoder_architecture(encoder_part, checkpoint.num_heads)
        if architecture.image_size is None and checkpoint.image_size:
            architecture = dataclasses.replace(architecture, image_size=checkpoint.image_size)
        size, patch = architecture.image_size, architecture.patch_size
        side = size // patch if size else None
        # The channel order that makes our table apply (None: the stored one is ours).
        encoder_perm = _position_order(encoder_part, side, "encoder", checkpoint, is_encoder=True)
        encoder = torch_layout.encoder_params(encoder_part, architecture.num_heads)
        if encoder_perm is not None:
            encoder = positions.permute_encoder(encoder, encoder_perm)
        params = {"encoder": encoder}
        architecture = _decoders(checkpoint, architecture, side, encoder_perm, params)
        batch_stats = {}
        for name in ("projector", "predictor"):
            if name in checkpoint.parts:
                head, stats = torch_layout.head_params(checkpoint.parts[name], name)
                if name == "projector" and encoder_perm is not None:
                    # It reads the encoder's (and feature decoder's) channels.
                    head = positions.permute_head_input(head, encoder_perm)
                params[name] = head
                batch_stats[name] = stats
        # The contrastive heads of a method whose defaults train them (CMAE) are sized by
        # config.model; MAE-CT's by config.maect.
        defaults = config_defaults.base_config(checkpoint.method)
        if defaults.loss.contrastive_weight > 0 and "projector" in params:
            architecture = dataclasses.replace(
                architecture,
                projector_hidden=int(params["projector"]["dense_0"]["kernel"].shape[1]),
                projection_dim=int(params["projector"]["dense_1"]["kernel"].shape[1]),
            )
    except ValueError as e:
        message = str(e) if str(e).startswith(path) else f"{path}: {e}"
        raise type(e)(message) from None
    return ImportedCheckpoint(
        path=path,
        format=checkpoint.format,
        method=checkpoint.method,
        architecture=architecture,
        params=params,
        batch_stats=batch_stats,
        normalization=checkpoint.normalization or _default_normalization(architecture.channels),
        left_out=checkpoint.left_out,
        notes=checkpoint.notes,
    )


def config_of(imported: ImportedCheckpoint) -> dict[str, Any]:
    """The config.json a run of this project with this model would have written: the
    defaults of its method with config.model and the input geometry of the checkpoint."""
    architecture = imported.architecture
    config = config_defaults.base_config(imported.method)
    for key, value in architecture.model_config().items():
        config.model[key] = value
    config.input.patch_size = architecture.patch_size
    config.input.channels = architecture.channels
    config.input.mean, config.input.std = imported.normalization
    config.input.eval_crop_fraction = EVAL_CROP_FRACTION
    if architecture.image_size is not None:
        config.input.image_size = architecture.image_size
    return json.loads(config.to_json_best_effort())


def run_config(path: str) -> dict[str, Any]:
    """config_of the checkpoint at `path` (what weights.run_config_json returns), its
    config.model holding only what the checkpoint decides (so that an evaluation keeps its
    own dtype, remat and scan_layers)."""
    imported = import_checkpoint(path)
    return {**config_of(imported), "model": imported.architecture.model_config()}


def saved_structure(path: str) -> dict[str, Any]:
    """{'params', 'batch_stats'} as ShapeDtypeStruct trees (cf. weights.saved_structure)."""
    imported = import_checkpoint(path)
    abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    return {
        "params": jax.tree.map(abstract, imported.params),
        "batch_stats": jax.tree.map(abstract, imported.batch_stats),
    }


def _stack_blocks(tree: dict[str, Any], abstract: Any) -> dict[str, Any]:
    """`tree` with block_0..block_{n-1} stacked into 'blocks' when `abstract` is scanned."""
    if not isinstance(abstract, dict) or "blocks" not in abstract or "block_0" not in tree:
        return tree
    names = sorted((k for k in tree if k.startswith("block_")), key=lambda k: int(k[6:]))
    out = {k: v for k, v in tree.items() if not k.startswith("block_")}
    out["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *[tree[n] for n in names])
    return out


def unstack_blocks(tree: dict[str, Any]) -> dict[str, Any]:
    """The inverse of _stack_blocks: scanned 'blocks' back to block_0..block_{n-1}."""
    if "blocks" not in tree:
        return tree
    depth = jax.tree.leaves(tree["blocks"])[0].shape[0]
    out = {k: v for k, v in tree.items() if k != "blocks"}
    for i in range(depth):
        out[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], tree["blocks"])
    return out


def _describe_encoder(tree: Any) -> str:
    """'768 wide, 12 blocks, 12 heads, MLP 3072, patch 16, 3 channel(s)' of an encoder tree
    (arrays or ShapeDtypeStructs, blocks unrolled or scanned)."""
    patch, _, channels, width = tree["embedding"]["kernel"].shape
    if "blocks" in tree:
        block = tree["blocks"]
        depth = block["norm1"]["scale"].shape[0]
        heads = block["attn"]["qkv"]["kernel"].shape[-2]
        mlp = block["mlp"]["fc1"]["kernel"].shape[-1]
    else:
        depth = sum(k.startswith("block_") for k in tree)
        heads = tree["block_0"]["attn"]["qkv"]["kernel"].shape[-2]
        mlp = tree["block_0"]["mlp"]["fc1"]["kernel"].shape[-1]
    return (
        f"{width} wide, {depth} blocks, {heads} heads, MLP {mlp}, patch {patch}, "
        f"{channels} channel(s)"
    )


def _encoder_fix(imported: ImportedCheckpoint) -> str:
    """The flags that describe the checkpoint's encoder."""
    architecture = imported.architecture
    flags = [
        f"--config.model.{k}={v}"
        for k, v in architecture.model_config().items()
        if k in ("variant", "width", "depth", "num_heads", "mlp_dim") and v is not None
    ]
    flags.append(f"--config.input.patch_size={architecture.patch_size}")
    flags.append(f"--config.input.channels={architecture.channels}")
    return " ".join(flags)


def _mismatch(imported: ImportedCheckpoint, key: str, abstract: Any) -> ValueError:
    if key == "encoder":
        return ValueError(
            f"{imported.path} holds a {imported.architecture.describe()}, but config.model "
            f"and config.input describe an encoder of {_describe_encoder(abstract)}. Fix: "
            f"{_encoder_fix(imported)} (an evaluation takes them from the checkpoint with "
            "config.model_from_init=True; grey images are repeated to 3 channels)."
        )
    return ValueError(
        f"The {key} in {imported.path} has other shapes than the one config.model "
        "describes; use a config.model matching the checkpoint."
    )


def _place(tree: Any, abstract: Any) -> Any:
    """NumPy leaves as jax.Arrays in the dtypes and shardings of the abstract leaves."""

    def put(x: np.ndarray, target: Any) -> jax.Array:
        value = np.asarray(x, target.dtype)
        sharding = getattr(target, "sharding", None)
        if sharding is None:
            return jax.device_put(value)
        return jax.make_array_from_callback(target.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree, abstract)


def load_params(
    path: str,
    abstract_params: dict,
    *,
    required: tuple[str, ...] = ("encoder",),
    optional: tuple[str, ...] = (),
    abstract_batch_stats: dict | None = None,
) -> tuple[dict, dict]:
    """(params, batch_stats) of a published checkpoint for a new run; the contract of
    weights.load_params: every `required` key must match `abstract_params` (else an
    error naming the shapes and the flags that fit), `optional` keys load where they match."""
    imported = import_checkpoint(path)
    abstract_batch_stats = abstract_batch_stats or {}
    params, stats = {}, {}
    for key in required:
        if key not in imported.params:
            raise ValueError(
                f"{path} has no {key} ({imported.format}; loaded: {', '.join(imported.params)}"
                f"; {'; '.join(imported.left_out)})."
            )
        tree = _stack_blocks(imported.params[key], abstract_params[key])
        if not checkpointing.same_shapes(tree, abstract_params[key]):
            raise _mismatch(imported, key, abstract_params[key])
        params[key] = tree
    for key in optional:
        if key not in imported.params or key not in abstract_params:
            where = "the checkpoint" if key not in imported.params else "this model"
            logging.info("%s: no %s in %s, not loaded.", path, key, where)
            continue
        tree = _stack_blocks(imported.params[key], abstract_params[key])
        key_stats = imported.batch_stats.get(key)
        if not checkpointing.same_shapes(tree, abstract_params[key]) or not (
            checkpointing.same_shapes(key_stats, abstract_batch_stats.get(key))
        ):
            logging.info("%s: its %s has other shapes than this model's; not loaded.", path, key)
            continue
        params[key] = tree
        if key in abstract_batch_stats:
            stats[key] = key_stats
    logging.info("%s\n  into this model: %s", imported.report(), ", ".join(params))
    placed_stats = _place(stats, {k: abstract_batch_stats[k] for k in stats})
    return _place(params, {k: abstract_params[k] for k in params}), placed_stats
