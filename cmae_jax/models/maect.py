"""MAE-CT's model for stages 2 and 3: the MAE encoder (whole views, no masking) + NNCLR heads.

Parameters: params['encoder'] has exactly the structure of the MAE/CMAE encoder, so a
stage-1 checkpoint's encoder drops in; params['projector'] and params['predictor'] are the
NNCLR heads (SPEC, MAE-CT):
  projector  Linear(d, 2048, no bias) -> BN -> ReLU -> Linear(2048, 2048, no bias) -> BN
             -> ReLU -> Linear(2048, 256) -> BN(256)
  predictor  Linear(256, 4096, no bias) -> BN -> ReLU -> Linear(4096, 256)
The EMA copy of the projector (whose outputs fill the queue) lives in the optimiser state
(cmae_jax.ema) and runs through `project`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmae_jax.models import cmae as cmae_model
from cmae_jax.models import vit
from cmae_jax.models.heads import MLPHead

Dtype = Any

POOLINGS = ("cls", "mean")


class MAECT(nn.Module):
    """Encoder + NNCLR projector and predictor; submodules: encoder, projector, predictor."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    pooling: str = "mean"  # 'cls' token or 'mean' of the patch tokens (after the final norm)
    projector_hidden: int = 2048
    predictor_hidden: int = 4096
    projection_dim: int = 256
    dtype: Dtype = jnp.float32
    remat: bool | str = "none"  # remat policy of the encoder blocks (vit.REMAT_POLICIES)
    # nn.scan over the encoder blocks: params['encoder']['blocks'] stacked on a leading
    # layers axis, the layout a stage-1 run with the same config.model saves.
    scan_layers: bool = False

    def setup(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLINGS}.")
        self.encoder = vit.Encoder(
            width=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            patch_size=self.patch_size,
            dtype=self.dtype,
            remat=self.remat,
            scan_layers=self.scan_layers,
        )
        # The heads run in float32 whatever `dtype` is (BatchNorm, temperature-scaled logits).
        self.projector = MLPHead(
            self.projector_hidden,
            self.projection_dim,
            num_layers=3,
            hidden_bias=False,
            last_bias=True,
            last_bn=True,
        )
        self.predictor = MLPHead(
            self.predictor_hidden, self.projection_dim, hidden_bias=False, last_bias=True
        )

    def pool(self, images: jax.Array) -> jax.Array:
        """The encoder's pooled representation of whole images, [B, width] float32."""
        return self.features(images)[self.pooling]

    def project(self, pooled: jax.Array, train: bool) -> jax.Array:
        """Projector only (needs params['projector']); the EMA target branch runs this."""
        return self.projector(pooled, train)

    def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        """{'pooled': [B, width], 'projection': [B, P], 'prediction': [B, P]}."""
        pooled = self.pool(images)
        projection = self.projector(pooled, train)
        return {
            "pooled": pooled,
            "projection": projection,
            "prediction": self.predictor(projection, train),
        }

    def features(self, images: jax.Array) -> dict[str, jax.Array]:
        """Frozen-encoder features for evaluation: normed cls token and mean of normed patches."""
        return self.encoder(images, None).pooled()


def build_model(model_cfg: Any, input_cfg: Any, maect_cfg: Any) -> MAECT:
    """MAECT from config.model, config.input and config.maect.

    The encoder sizes, remat policy and scan layout are resolved (and checked) by the MAE
    model builder, so the encoder is the one stage 1 trains from the same config.model.
    """
    mae = cmae_model.build_model(model_cfg, input_cfg, contrastive=False)
    return MAECT(
        width=mae.width,
        depth=mae.depth,
        num_heads=mae.num_heads,
        mlp_dim=mae.mlp_dim,
        patch_size=mae.patch_size,
        pooling=maect_cfg.pooling,
        projector_hidden=int(maect_cfg.projector_hidden),
        predictor_hidden=int(maect_cfg.predictor_hidden),
        projection_dim=int(maect_cfg.projection_dim),
        dtype=mae.dtype,
        remat=mae.remat,
        scan_layers=mae.scan_layers,
    )
