"""Which parameters train, and how fast: frozen encoder parts and layer-wise lr decay.

Frozen parameters are kept out of everything that trains: the trainer differentiates only
the trainable part (`split`), builds the optimiser on it alone (so frozen leaves have no
Adam moments and no EMA copy) and puts the untouched frozen leaves back afterwards
(`merge`), so they stay bit-identical.

Layer-wise lr decay as BEiT / MAE fine-tuning / MAE-CT (depth + 2 "layers"): the stem
(patch embedding, cls token) is layer 0, block j (0-based) is layer j + 1, the final norm
and everything outside the encoder layer depth + 1; layer i gets decay ** (depth + 1 - i).
So the last block already runs at `decay` times the base lr and the final norm and heads
at the base lr.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import optax
from flax import traverse_util

_BLOCK = re.compile(r"block_(\d+)")
# The encoder's stem: frozen whenever any block is, and layer 0 of the lr decay.
STEM_KEYS = ("embedding", "cls")


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _keys(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def encoder_layer(keys: tuple[str, ...], depth: int) -> int:
    """Layer id of a parameter path: 0 stem, j + 1 for block_j, depth + 1 for the rest."""
    if len(keys) >= 2 and keys[0] == "encoder":
        if keys[1] in STEM_KEYS:
            return 0
        match = _BLOCK.fullmatch(keys[1])
        if match:
            return int(match.group(1)) + 1
    return depth + 1


def lr_multiplier(keys: tuple[str, ...], depth: int, decay: float) -> float:
    """decay ** (depth + 1 - layer) for the parameter at `keys` (a path of dict keys)."""
    return float(decay ** (depth + 1 - encoder_layer(keys, depth)))


def lr_multipliers(params: Any, depth: int, decay: float) -> Any:
    """A tree of floats over `params`: each leaf's layer-wise lr multiplier."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: lr_multiplier(_keys(path), depth, decay), params, is_leaf=_is_box
    )


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
            lambda path, u: u * lr_multiplier(_keys(path), depth, decay), updates
        )

    return optax.stateless(scale)


def is_frozen(keys: tuple[str, ...], *, freeze_encoder: bool, frozen_blocks: int) -> bool:
    """Whether the parameter at `keys` is frozen.

    `freeze_encoder`: the whole encoder (final norm included). Otherwise `frozen_blocks` > 0
    freezes the stem (patch embedding, cls token) and blocks 0 .. frozen_blocks - 1.
    """
    if not keys or keys[0] != "encoder":
        return False
    if freeze_encoder:
        return True
    if frozen_blocks <= 0 or len(keys) < 2:
        return False
    if keys[1] in STEM_KEYS:
        return True
    match = _BLOCK.fullmatch(keys[1])
    return match is not None and int(match.group(1)) < frozen_blocks


def trainable_mask(params: Any, *, freeze_encoder: bool, frozen_blocks: int) -> Any:
    """A tree of bools over `params`: True where the parameter trains."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: (
            not is_frozen(_keys(path), freeze_encoder=freeze_encoder, frozen_blocks=frozen_blocks)
        ),
        params,
        is_leaf=_is_box,
    )


def split(params: dict, *, freeze_encoder: bool, frozen_blocks: int) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts holding the leaves of each kind, nothing else."""
    flat = traverse_util.flatten_dict(params)
    trainable, frozen = {}, {}
    for keys, leaf in flat.items():
        frozen_leaf = is_frozen(
            tuple(str(k) for k in keys), freeze_encoder=freeze_encoder, frozen_blocks=frozen_blocks
        )
        (frozen if frozen_leaf else trainable)[keys] = leaf
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
    """Inverse of `split`: one nested dict with the leaves of both."""
    flat = traverse_util.flatten_dict(trainable)
    flat.update(traverse_util.flatten_dict(frozen))
    return traverse_util.unflatten_dict(flat)
