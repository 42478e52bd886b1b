"""MAE-style decoder: visible latents + mask tokens back in grid order, blocks, Linear out.

Used as CMAE's pixel decoder (out_dim = p*p*C) and as its feature decoder (depth 2,
out_dim = encoder width).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmae_jax.models import vit

Dtype = Any


def restore_order(
    visible: jax.Array, masked: jax.Array, ids_keep: jax.Array, ids_mask: jax.Array
) -> jax.Array:
    """Puts visible tokens [B,K,D] at ids_keep and masked tokens [B,M,D] at ids_mask -> [B,N,D].

    Token j of concat(visible, masked) belongs at grid position concat(ids_keep, ids_mask)[j];
    gathering with the inverse permutation (argsort, as MAE's ids_restore) puts it there.
    """
    ids_all = jnp.concatenate([ids_keep, ids_mask], axis=1).astype(jnp.int32)
    ids_restore = jnp.argsort(ids_all, axis=1)
    tokens = jnp.concatenate([visible, masked], axis=1)
    return jnp.take_along_axis(tokens, ids_restore[:, :, None], axis=1)


class Decoder(nn.Module):
    """Transformer decoder over all N grid positions; returns [B, N, out_dim] (cls dropped
    unless `keep_cls`).

    Params: embed (Dense from the encoder width), mask_token, block_i, norm, pred.
    """

    out_dim: int
    width: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_dim: int = 2048
    dtype: Dtype = jnp.float32
    remat: bool | str = "none"  # remat policy of the blocks (vit.REMAT_POLICIES)
    scan_layers: bool = False
    keep_cls: bool = False  # return [B, 1 + N, out_dim], the cls position first

    @nn.compact
    def __call__(
        self,
        latents: jax.Array,
        ids_keep: jax.Array,
        ids_mask: jax.Array,
        grid_hw: tuple[int, int],
    ) -> jax.Array:
        grid_h, grid_w = grid_hw
        b, k = ids_keep.shape
        if latents.shape[1] != k + 1:
            raise ValueError(f"latents {latents.shape} must hold cls + {k} visible tokens.")
        if k + ids_mask.shape[1] != grid_h * grid_w:
            raise ValueError(
                f"ids_keep ({k}) + ids_mask ({ids_mask.shape[1]}) != grid {grid_h}x{grid_w}."
            )
        # The input axis is the encoder's width, not the decoder's: leave it unnamed so the
        # kernel never names 'embed' twice.
        x = vit.dense(self.width, (None, "embed"), self.dtype, "embed")(latents)
        mask_token = self.param(
            "mask_token",
            nn.with_logical_partitioning(
                nn.initializers.normal(vit.TOKEN_INIT_STD), (None, None, "embed")
            ),
            (1, 1, self.width),
        )
        masked = jnp.broadcast_to(mask_token.astype(self.dtype), (b, ids_mask.shape[1], self.width))
        patches = restore_order(x[:, 1:], masked, ids_keep, ids_mask)
        pos = jnp.asarray(vit.sincos_2d_posemb(self.width, grid_h, grid_w), self.dtype)
        # The cls slot of the position embedding is zero: the cls token gets nothing added.
        x = jnp.concatenate([x[:, :1], patches + pos[None]], axis=1)
        x = nn.with_logical_constraint(x, vit.TOKENS)
        x = vit.block_stack(
            x, self.depth, self.num_heads, self.mlp_dim, self.dtype, self.remat, self.scan_layers
        )
        x = vit.layer_norm(self.dtype, "norm")(x)
        x = vit.dense(self.out_dim, ("embed", None), self.dtype, "pred")(x)
        return x if self.keep_cls else x[:, 1:]
