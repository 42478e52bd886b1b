"""CMAE: MAE (encoder + pixel decoder) plus a feature decoder and projector/predictor heads.

The online branch runs `__call__`; the target branch (EMA copies of params['encoder'] and
params['projector']) runs `target_projection`; evaluations read params['encoder'] alone
(evaluation.features.encoder_embed). With `contrastive=False` the model is plain MAE (no
feature decoder, no heads).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmae_jax.models.decoder import Decoder
from cmae_jax.models.encoder_spec import EncoderSpec
from cmae_jax.models.heads import MLPHead
from cmae_jax.models.vit import GRID_CELLS, cell_means

# What the contrastive branch pools its tokens into before the projector: 'mean' over the
# patches (the paper's); 'cls', the cls position alone (the feature decoder's cls output
# against the target encoder's cls token: the token the papers' evaluations read, which
# the paper's pooling never trains directly); 'grid', the patches' means over the 2 x 2
# cells of the patch grid, concatenated (the `grid` evaluation read), so the InfoNCE also
# sees where things are; 'cells', each cell's mean a query of its own (rows image-major),
# whose positive is the same cell of the target view and whose negatives are every other
# cell of the batch.
# Each pooling's (InfoNCE rows per image, encoder widths per row).
_POOLED_SHAPES = {
    "mean": (1, 1),
    "cls": (1, 1),
    "grid": (1, GRID_CELLS * GRID_CELLS),
    "cells": (GRID_CELLS * GRID_CELLS, 1),
}
CONTRASTIVE_POOLINGS = tuple(_POOLED_SHAPES)


class CMAE(nn.Module):
    """Contrastive masked autoencoder; submodules: encoder, pixel_decoder, feature_decoder,
    projector, predictor (the last three only when `contrastive`)."""

    encoder_spec: EncoderSpec
    pixel_decoder_width: int = 512
    pixel_decoder_depth: int = 8
    pixel_decoder_heads: int = 16
    feature_decoder_depth: int = 2
    projector_hidden: int = 1536
    projection_dim: int = 256
    contrastive: bool = True
    contrastive_pooling: str = "mean"

    def setup(self):
        # The decoders share the encoder's compute dtype, remat policy and scan layout.
        spec = self.encoder_spec
        self.encoder = spec.encoder()
        self.pixel_decoder = Decoder(
            out_dim=spec.patch_size * spec.patch_size * spec.channels,
            width=self.pixel_decoder_width,
            depth=self.pixel_decoder_depth,
            num_heads=self.pixel_decoder_heads,
            mlp_dim=4 * self.pixel_decoder_width,
            dtype=spec.dtype,
            remat=spec.remat,
            scan_layers=spec.scan_layers,
        )
        if self.contrastive:
            # Same structure as the pixel decoder (width, heads), own parameters, depth 2; its
            # output is projected to the encoder's width (768 in the official ViT-B code).
            self.feature_decoder = Decoder(
                out_dim=spec.width,
                width=self.pixel_decoder_width,
                depth=self.feature_decoder_depth,
                num_heads=self.pixel_decoder_heads,
                mlp_dim=4 * self.pixel_decoder_width,
                dtype=spec.dtype,
                remat=spec.remat,
                scan_layers=spec.scan_layers,
                keep_cls=True,
            )
            # The heads run in float32 whatever `dtype` is: they are tiny, and BatchNorm and the
            # InfoNCE logits (temperature 0.07) are sensitive to bf16 rounding.
            self.projector = MLPHead(self.projector_hidden, self.projection_dim, in_axis="embed")
            self.predictor = MLPHead(self.projector_hidden, self.projection_dim, in_axis="proj")

    def _grid(self, images: jax.Array) -> tuple[int, int]:
        patch = self.encoder_spec.patch_size
        return images.shape[1] // patch, images.shape[2] // patch

    def _pool(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """[B, 1 + N, D] tokens (cls first) -> the contrastive branch's float32 representation."""
        if self.contrastive_pooling == "cls":
            return tokens[:, 0].astype(jnp.float32)
        patches = tokens[:, 1:]
        if self.contrastive_pooling == "grid":
            return cell_means(patches, grid)
        if self.contrastive_pooling == "cells":
            return cell_means(patches, grid).reshape(-1, patches.shape[-1])
        if self.contrastive_pooling == "mean":
            return jnp.mean(patches.astype(jnp.float32), axis=1)
        raise ValueError(f"Unknown contrastive_pooling {self.contrastive_pooling!r}.")

    def contrastive_width(self) -> int:
        """Width of the pooled representation the projector reads."""
        return _POOLED_SHAPES[self.contrastive_pooling][1] * self.encoder_spec.width

    def contrastive_rows(self) -> int:
        """InfoNCE queries (and keys) per image."""
        return _POOLED_SHAPES[self.contrastive_pooling][0]

    def __call__(
        self, online: jax.Array, ids_keep: jax.Array, ids_mask: jax.Array, train: bool
    ) -> dict[str, jax.Array]:
        """Online branch: {'pixel_pred': [B, N, p*p*C], 'online_pred': [B * R, projection_dim]}.

        'pixel_pred' covers all N patches in row-major order (the loss picks the masked ones);
        'online_pred' is only present when `contrastive`; R = `contrastive_rows()` queries
        per image, image-major, as the target branch's keys.
        """
        grid = self._grid(online)
        latents = self.encoder(online, ids_keep).tokens
        out = {
            "pixel_pred": self.pixel_decoder(latents, ids_keep, ids_mask, grid).astype(jnp.float32)
        }
        if self.contrastive:
            feats = self.feature_decoder(latents, ids_keep, ids_mask, grid)
            online_repr = self._pool(feats, grid)  # cls and all N positions
            projection = self.projector(online_repr, train)
            out["online_pred"] = self.predictor(projection, train)
        return out

    def target_projection(self, images: jax.Array, train: bool) -> jax.Array:
        """Target branch: whole view, pre-norm tokens pooled as the online branch's
        (`contrastive_pooling`), projector.

        Needs only params {'encoder', 'projector'} (and the projector's batch_stats).
        """
        if not self.contrastive:
            raise ValueError("target_projection needs a contrastive CMAE (contrastive=True).")
        prenorm = self.encoder(images, None).prenorm
        pooled = self._pool(prenorm, self._grid(images))
        return self.projector(pooled, train)


def build_model(model_cfg: Any, input_cfg: Any, contrastive: bool | None = None) -> CMAE:
    """Builds the CMAE module from config.model and config.input (the encoder: EncoderSpec).

    `contrastive` (whether the feature decoder and heads exist) is normally decided by the
    caller from the method / contrastive loss weight; if None, model_cfg.contrastive is used,
    falling back to input_cfg.target_view, falling back to True.
    """
    spec = EncoderSpec.from_config(model_cfg, input_cfg)
    pooling = str(model_cfg.get("contrastive_pooling", "mean"))
    if pooling not in CONTRASTIVE_POOLINGS:
        raise ValueError(
            f"config.model.contrastive_pooling={pooling!r} is not one of "
            f"{CONTRASTIVE_POOLINGS}: 'mean' pools the patch tokens (the paper's), 'cls' "
            "takes the cls position, 'grid' "
            f"concatenates their means over {GRID_CELLS} x {GRID_CELLS} cells of the patch grid, "
            "'cells' contrasts each cell's mean on its own."
        )
    if contrastive is None:
        contrastive = model_cfg.get("contrastive")
    if contrastive is None:
        contrastive = input_cfg.get("target_view")
    return CMAE(
        encoder_spec=spec,
        pixel_decoder_width=int(model_cfg.get("pixel_decoder_width", 512)),
        pixel_decoder_depth=int(model_cfg.get("pixel_decoder_depth", 8)),
        pixel_decoder_heads=int(model_cfg.get("pixel_decoder_heads", 16)),
        feature_decoder_depth=int(model_cfg.get("feature_decoder_depth", 2)),
        projector_hidden=int(model_cfg.get("projector_hidden", 1536)),
        projection_dim=int(model_cfg.get("projection_dim", 256)),
        contrastive=True if contrastive is None else bool(contrastive),
        contrastive_pooling=pooling,
    )
