"""How many patches a mask keeps and hides: the sizes of the mask arrays, without TensorFlow.

The model, the update steps and the compile-ahead need these sizes on machines without
TensorFlow; cmae_jax.data.masking draws the masks themselves (see its docstring for the
counts of 'random' and 'block' masking).
"""

from __future__ import annotations

from typing import Any

MASK_TYPES = ("random", "block")


def num_keep(total: int, mask_ratio: float, what: str) -> int:
    """int(total * (1 - mask_ratio)) kept of `total` patches or cells; both kinds left."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(
            f"config.input.mask_ratio must lie in (0, 1), got {mask_ratio}; it is the fraction "
            "of patches (block masking: of cells) that is masked, e.g. 0.75."
        )
    keep = int(total * (1.0 - mask_ratio))
    if keep < 1 or keep >= total:
        raise ValueError(
            f"config.input.mask_ratio={mask_ratio} keeps {keep} of {total} {what}; at least one "
            "must be visible and one masked. Fix: choose a ratio nearer 0.5 or a larger grid."
        )
    return keep


def grid_hw(grid: int | tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of a patch grid given as one side or as both."""
    if isinstance(grid, int):
        return grid, grid
    grid_h, grid_w = grid
    return int(grid_h), int(grid_w)


def check_block(grid_h: int, grid_w: int, block: int) -> None:
    """Refuses a mask block that does not tile the patch grid."""
    if block < 1 or grid_h % block or grid_w % block:
        raise ValueError(
            f"config.input.mask_block={block} must divide the patch grid {grid_h}x{grid_w} "
            "(image_size / patch_size). Fix: change mask_block, image_size or patch_size."
        )


def mask_counts(grid: int | tuple[int, int], input_cfg: Any) -> tuple[int, int]:
    """Returns (K visible, M masked) patch counts for a patch grid under `config.input`."""
    grid_h, grid_w = grid_hw(grid)
    mask_type = input_cfg.mask_type
    num_patches = grid_h * grid_w
    if mask_type == "random":
        keep = num_keep(num_patches, input_cfg.mask_ratio, "patches")
    elif mask_type == "block":
        block = input_cfg.get("mask_block", 2)
        check_block(grid_h, grid_w, block)
        num_cells = (grid_h // block) * (grid_w // block)
        keep = num_keep(num_cells, input_cfg.mask_ratio, "cells") * block * block
    else:
        raise ValueError(
            f"Unknown config.input.mask_type {mask_type!r}; allowed values: {list(MASK_TYPES)}"
        )
    return keep, num_patches - keep
