"""Which parameters train, and how fast: frozen encoder parts and layer-wise lr decay.

Frozen parameters are kept out of everything that trains: the trainer differentiates only
the trainable part (`split`), builds the optimiser on it alone (so frozen leaves have no
Adam moments and no EMA copy) and puts the untouched frozen leaves back afterwards
(`merge`), so they stay bit-identical.

Layer-wise lr decay as BEiT / MAE fine-tuning / MAE-CT (depth + 2 "layers"): the stem
(patch embedding, cls token, conv stem) is layer 0, block j (0-based) is layer j + 1, the final norm
and everything outside the encoder layer depth + 1; layer i gets decay ** (depth + 1 - i).
So the last block already runs at `decay` times the base lr and the final norm and heads
at the base lr.

Both work on either block layout of the encoder: unrolled (block_0 .. block_{depth-1}) or
scanned (config.model.scan_layers: one 'blocks' subtree whose leaves are stacked along a
leading layers axis, row j being block j). A scanned leaf is split by rows: its first
`frozen_blocks` rows are frozen, the others train, so the trainable tree holds the last
rows of each stacked leaf; the lr multiplier of a stacked leaf is a vector over its rows.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from cmae_jax.models import vit

_BLOCK = re.compile(r"block_(\d+)")
# The encoder's stem: frozen whenever any block is, and layer 0 of the lr decay. With a
# convolutional patch stem (config.model.stem_channels) its layers are part of it too.
STEM_KEYS = ("embedding", "cls")


def is_stem(key: str) -> bool:
    """Whether an encoder's top-level parameter name belongs to its stem."""
    return key in STEM_KEYS or key.startswith(vit.STEM_PREFIX)


# The scanned blocks' subtree (models.vit.block_stack with scan).
SCANNED_BLOCKS = "blocks"


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _keys(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def is_scanned_blocks(keys: tuple[str, ...]) -> bool:
    """Whether the parameter at `keys` is a stacked leaf of the encoder's scanned blocks."""
    return len(keys) >= 2 and keys[0] == "encoder" and keys[1] == SCANNED_BLOCKS


def encoder_layer(keys: tuple[str, ...], depth: int) -> int:
    """Layer id of an unstacked parameter path: 0 stem, j + 1 for block_j, depth + 1 else."""
    if len(keys) >= 2 and keys[0] == "encoder":
        if is_stem(keys[1]):
            return 0
        match = _BLOCK.fullmatch(keys[1])
        if match:
            return int(match.group(1)) + 1
    return depth + 1


def lr_multiplier(
    keys: tuple[str, ...], depth: int, decay: float, rows: int | None = None
) -> float | np.ndarray:
    """decay ** (depth + 1 - layer) for the parameter at `keys` (a path of dict keys).

    For a stacked leaf of the scanned blocks with `rows` rows (the last `rows` blocks, as
    `split` leaves them; all depth when None): a [rows] vector, row r being block
    depth - rows + r.
    """
    if is_scanned_blocks(keys):
        rows = depth if rows is None else rows
        layers = np.arange(depth - rows, depth) + 1
        return decay ** (depth + 1 - layers).astype(np.float64)
    return float(decay ** (depth + 1 - encoder_layer(keys, depth)))


def _scale(keys: tuple[str, ...], update: jax.Array, depth: int, decay: float) -> jax.Array:
    if is_scanned_blocks(keys):
        rows = update.shape[0]
        factor = lr_multiplier(keys, depth, decay, rows).reshape((rows,) + (1,) * (update.ndim - 1))
        return update * jnp.asarray(factor, update.dtype)
    return update * lr_multiplier(keys, depth, decay)


def scale_by_layer_decay(depth: int, decay: float) -> optax.GradientTransformation:
    """Multiplies each update by its lr multiplier (chain it after the optimiser).

    For AdamW this is exact layer-wise lr decay: the update is -lr * (adam + wd * param)
    and the moments do not depend on lr, so scaling the update scales the lr.
    """
    if decay == 1.0:
        return optax.identity()

    def scale(updates, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda path, u: _scale(_keys(path), u, depth, decay), updates
        )

    return optax.stateless(scale)


def is_frozen(keys: tuple[str, ...], *, freeze_encoder: bool, frozen_blocks: int) -> bool:
    """Whether the (unstacked) parameter at `keys` is frozen.

    `freeze_encoder`: the whole encoder (final norm included). Otherwise `frozen_blocks` > 0
    freezes the stem (patch embedding, cls token, conv stem) and blocks 0 .. frozen_blocks - 1.
    """
    if not keys or keys[0] != "encoder":
        return False
    if freeze_encoder:
        return True
    if frozen_blocks <= 0 or len(keys) < 2:
        return False
    if is_stem(keys[1]):
        return True
    match = _BLOCK.fullmatch(keys[1])
    return match is not None and int(match.group(1)) < frozen_blocks


def _leading_rows(leaf: Any) -> int:
    value = leaf.value if _is_box(leaf) else leaf
    return value.shape[0]


def _take_rows(leaf: Any, rows: slice) -> Any:
    """Rows of a stacked leaf: an array, a ShapeDtypeStruct or a logically boxed value."""
    if _is_box(leaf):
        return leaf.replace_boxed(_take_rows(leaf.value, rows))
    if isinstance(leaf, jax.ShapeDtypeStruct):
        count = len(range(*rows.indices(leaf.shape[0])))
        return jax.ShapeDtypeStruct(
            (count, *leaf.shape[1:]), leaf.dtype, sharding=getattr(leaf, "sharding", None)
        )
    return leaf[rows]


def split(params: dict, *, freeze_encoder: bool, frozen_blocks: int) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts holding the leaves of each kind, nothing else.

    A stacked leaf of the scanned blocks is cut by rows: rows 0 .. frozen_blocks - 1 in
    `frozen`, the rest in `trainable` (a side that gets no rows does not hold the leaf).
    """
    flat = traverse_util.flatten_dict(params)
    trainable, frozen = {}, {}
    for keys, leaf in flat.items():
        names = tuple(str(k) for k in keys)
        if is_scanned_blocks(names) and not freeze_encoder:
            cut = min(max(frozen_blocks, 0), _leading_rows(leaf))
            if cut:
                frozen[keys] = _take_rows(leaf, slice(None, cut))
            if cut < _leading_rows(leaf):
                trainable[keys] = _take_rows(leaf, slice(cut, None))
            continue
        frozen_leaf = is_frozen(names, freeze_encoder=freeze_encoder, frozen_blocks=frozen_blocks)
        (frozen if frozen_leaf else trainable)[keys] = leaf
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
    """Inverse of `split`: one nested dict with the leaves of both (stacked leaves that
    `split` cut by rows are joined again, frozen rows first)."""
    flat = traverse_util.flatten_dict(frozen)
    for keys, leaf in traverse_util.flatten_dict(trainable).items():
        flat[keys] = jnp.concatenate([flat[keys], leaf]) if keys in flat else leaf
    return traverse_util.unflatten_dict(flat)
