"""Stateless per-example patch masks, computed inside tf.data.

A mask is two fixed-length int32 index arrays into the row-major patch grid: `ids_keep`
(visible patches, K of them) and `ids_mask` (masked patches, M = N - K), each sorted
ascending. Fixed lengths let the batches stack and the model compile once.

Counts (Python `int`, i.e. floor, as MAE's `int(L * (1 - mask_ratio))`):
  * 'random': K = int(N * (1 - mask_ratio)). 224/16 (N=196) at 0.75: K=49, M=147.
    32/4 (N=64) at 0.75: K=16, M=48.
  * 'block': the grid is cut into cells of block x block patches; C cells, of which
    int(C * (1 - mask_ratio)) are kept whole, K = kept cells * block^2.
    224/16, 2x2 blocks (C=49) at 0.65: 17 cells kept (34.7%), K=68, M=128 (65.3% masked).
    32/4, 2x2 blocks (C=16) at 0.65: 5 cells kept, K=20, M=44 (68.75% masked).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from cmae_jax import mask_sizes
from cmae_jax.mask_sizes import mask_counts

__all__ = ["block_mask", "mask_counts", "random_mask", "sample_mask"]


def _split_kept(kept: tf.Tensor, num_keep: int) -> tuple[tf.Tensor, tf.Tensor]:
    # A stable sort on "is masked" lists the kept indices first, each group in ascending
    # order, with static output lengths (tf.where would have a dynamic one).
    order = tf.argsort(tf.cast(tf.logical_not(kept), tf.int32), axis=-1, stable=True)
    order = tf.cast(order, tf.int32)
    return order[..., :num_keep], order[..., num_keep:]


def _lowest(seed: tf.Tensor, size: int, count: int, num: int | None) -> tf.Tensor:
    """Which of `size` items get the `count` lowest uniform noise values (bool [..., size])."""
    shape = [size] if num is None else [num, size]
    noise = tf.random.stateless_uniform(shape, seed=seed)
    # The rank of each item in the noise order: the inverse of the sorting permutation.
    rank = tf.argsort(tf.argsort(noise, axis=-1), axis=-1)
    return rank < count


def random_mask(
    seed: tf.Tensor, num_patches: int, mask_ratio: float, num: int | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """MAE random masking: keep int(N * (1 - ratio)) patches chosen by uniform noise.

    One example's ids, or [num, K] and [num, M] for `num` examples from one stream.
    """
    num_keep = mask_sizes.num_keep(num_patches, mask_ratio, "patches")
    return _split_kept(_lowest(seed, num_patches, num_keep, num), num_keep)


def block_mask(
    seed: tf.Tensor,
    grid_h: int,
    grid_w: int,
    block: int,
    mask_ratio: float,
    num: int | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """CMAE block masking: keep int(C * (1 - ratio)) whole block x block cells at random."""
    mask_sizes.check_block(grid_h, grid_w, block)
    cells_h, cells_w = grid_h // block, grid_w // block
    num_cells = cells_h * cells_w
    keep_cells = mask_sizes.num_keep(num_cells, mask_ratio, "cells")
    cell_kept = _lowest(seed, num_cells, keep_cells, num)
    rows = tf.range(grid_h)[:, None] // block
    cols = tf.range(grid_w)[None, :] // block
    cell_of_patch = tf.reshape(rows * cells_w + cols, [-1])
    kept = tf.gather(cell_kept, cell_of_patch, axis=-1)
    return _split_kept(kept, keep_cells * block * block)


def sample_mask(
    seed: tf.Tensor, grid: int | tuple[int, int], input_cfg: Any, num: int | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Draws the mask selected by `config.input.mask_type` for one example (or `num`)."""
    grid_h, grid_w = mask_sizes.grid_hw(grid)
    mask_counts((grid_h, grid_w), input_cfg)  # validates type, ratio and block
    if input_cfg.mask_type == "random":
        return random_mask(seed, grid_h * grid_w, input_cfg.mask_ratio, num)
    block = input_cfg.get("mask_block", 2)
    return block_mask(seed, grid_h, grid_w, block, input_cfg.mask_ratio, num)
