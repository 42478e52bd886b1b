"""The fixed sin-cos position tables a checkpoint stores, checked against this project's.

Our encoder and decoders add MAE's table (`vit.sincos_2d_posemb`: channels [0, D/2) encode
the patch column, [D/2, D) its row). The official CMAE code stores the transposed table
(mmselfsup's `build_2d_sincos_position_embedding` in ZhichengHuang/CMAE
cmae/models/utils/position_embedding.py meshes with indexing 'ij', so its first half
encodes the row). A model that adds the row-first table computes the same function as
ours once the two halves of its residual stream's channels are swapped: the `permute_*`
functions do that to the parameters, so the imported model reproduces the checkpoint's
outputs with the channels of its tokens in our order (a fixed relabelling that no loss,
probe or k-NN can see).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cmae_jax.models import vit

MAE_LAYOUT = "MAE (column first)"
ROW_FIRST_LAYOUT = "row first (mmselfsup, official CMAE)"
# float32 tables computed in float32 (mmselfsup) differ from ours by ~1e-6 at 32x32 grids.
TOLERANCE = 1e-4


class PositionTableError(ValueError):
    """A stored position table that is not the fixed sin-cos table this model adds."""


def split_table(pos_embed: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(patch rows [N, D], cls row [D] or None, grid side) of a stored [1, (1+)N, D] table."""
    table = np.asarray(pos_embed, np.float32).reshape(-1, pos_embed.shape[-1])
    length = table.shape[0]
    for cls_rows in (1, 0):
        side = math.isqrt(length - cls_rows)
        if length > cls_rows and side * side == length - cls_rows:
            return table[cls_rows:], (table[0] if cls_rows else None), side
    raise PositionTableError(
        f"{what}: pos_embed has {length} positions, neither a square grid nor 1 + a square "
        f"grid (shape {list(pos_embed.shape)})."
    )


def table_layout(patch_rows: np.ndarray, side: int, what: str) -> tuple[str | None, float]:
    """(layout, largest deviation) of a stored [side*side, D] table; the layout is
    MAE_LAYOUT or ROW_FIRST_LAYOUT, or None when it is neither (a learned table)."""
    width = patch_rows.shape[-1]
    if width % 4:
        raise PositionTableError(f"{what}: width {width} is not divisible by 4 (sin-cos table).")
    ours = vit.sincos_2d_posemb(width, side, side)
    deviation = float(np.max(np.abs(patch_rows - ours)))
    if deviation <= TOLERANCE:
        return MAE_LAYOUT, deviation
    if float(np.max(np.abs(patch_rows[:, half_swap(width)] - ours))) <= TOLERANCE:
        return ROW_FIRST_LAYOUT, 0.0
    return None, deviation


def stored_table(width: int, side: int) -> np.ndarray:
    """Our table as PyTorch MAE code stores it: [1, 1 + side*side, width], cls row zero."""
    table = vit.sincos_2d_posemb(width, side, side)
    return np.concatenate([np.zeros((1, width), np.float32), table])[None]


def half_swap(width: int) -> np.ndarray:
    """The channel permutation that swaps the two halves (its own inverse)."""
    return np.concatenate([np.arange(width // 2, width), np.arange(width // 2)])


def _norm(tree: dict[str, np.ndarray], perm: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[perm] for k, v in tree.items()}


def _block(block: dict[str, Any], perm: np.ndarray) -> dict[str, Any]:
    attn, mlp = block["attn"], block["mlp"]
    return {
        "norm1": _norm(block["norm1"], perm),
        "attn": {
            "qkv": {"kernel": attn["qkv"]["kernel"][perm], "bias": attn["qkv"]["bias"]},
            "proj": {
                "kernel": attn["proj"]["kernel"][..., perm],
                "bias": attn["proj"]["bias"][perm],
            },
        },
        "norm2": _norm(block["norm2"], perm),
        "mlp": {
            "fc1": {"kernel": mlp["fc1"]["kernel"][perm], "bias": mlp["fc1"]["bias"]},
            "fc2": {"kernel": mlp["fc2"]["kernel"][:, perm], "bias": mlp["fc2"]["bias"][perm]},
        },
    }


def permute_encoder(tree: dict[str, Any], perm: np.ndarray) -> dict[str, Any]:
    """params['encoder'] with its residual-stream channels reordered by `perm`."""
    out = {
        "embedding": {
            "kernel": tree["embedding"]["kernel"][..., perm],
            "bias": tree["embedding"]["bias"][perm],
        },
        "cls": tree["cls"][..., perm],
        "norm": _norm(tree["norm"], perm),
    }
    out.update({k: _block(v, perm) for k, v in tree.items() if k.startswith("block_")})
    return out


def permute_decoder(
    tree: dict[str, Any],
    encoder_perm: np.ndarray,
    perm: np.ndarray,
    output_perm: np.ndarray | None = None,
) -> dict[str, Any]:
    """Decoder params reading the encoder's channels in `encoder_perm` order, with its own
    stream reordered by `perm` (and its outputs by `output_perm`, for a feature decoder)."""
    pred_kernel, pred_bias = tree["pred"]["kernel"][perm], tree["pred"]["bias"]
    if output_perm is not None:
        pred_kernel, pred_bias = pred_kernel[:, output_perm], pred_bias[output_perm]
    out = {
        "embed": {
            "kernel": tree["embed"]["kernel"][encoder_perm][:, perm],
            "bias": tree["embed"]["bias"][perm],
        },
        "mask_token": tree["mask_token"][..., perm],
        "norm": _norm(tree["norm"], perm),
        "pred": {"kernel": pred_kernel, "bias": pred_bias},
    }
    out.update({k: _block(v, perm) for k, v in tree.items() if k.startswith("block_")})
    return out


def permute_head_input(tree: dict[str, Any], perm: np.ndarray) -> dict[str, Any]:
    """MLP head params whose first layer reads its inputs in `perm` order."""
    first = dict(tree["dense_0"], kernel=tree["dense_0"]["kernel"][perm])
    return {**tree, "dense_0": first}
