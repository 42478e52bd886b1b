"""MAE-CT's model for stages 2 and 3: the MAE encoder (whole views, no masking) + NNCLR heads.

Parameters: params['encoder'] has exactly the structure of the MAE/CMAE encoder, so a
stage-1 checkpoint's encoder drops in; params['projector'] and params['predictor'] are the
NNCLR heads (SPEC, MAE-CT), every Linear without bias as in the official
models/contrastive_heads/base/contrastive_head_base.py (the SPEC's text leaves the last
Linear's bias unsaid):
  projector  Linear(d, 2048) -> BN -> ReLU -> Linear(2048, 2048) -> BN -> ReLU
             -> Linear(2048, 256) -> BN(256)
  predictor  Linear(256, 4096) -> BN -> ReLU -> Linear(4096, 256)
Their Linear layers start as torch.nn.Linear's default, as the official heads (models.heads).
The EMA copy of the projector (whose outputs fill the queue) lives in the optimiser state
(cmae_jax.ema) and runs through `project`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from cmae_jax.models.encoder_spec import EncoderSpec
from cmae_jax.models.heads import projector_and_predictor

POOLINGS = ("cls", "mean")


class MAECT(nn.Module):
    """Encoder + NNCLR projector and predictor; submodules: encoder, projector, predictor."""

    # The encoder: that of stage 1 from the same config.model (with scan_layers, its
    # params['encoder']['blocks'] stacked on a leading layers axis, as stage 1 saves them).
    encoder_spec: EncoderSpec
    pooling: str = "mean"  # 'cls' token or 'mean' of the patch tokens (after the final norm)
    projector_hidden: int = 2048
    predictor_hidden: int = 4096
    projection_dim: int = 256

    def setup(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLINGS}.")
        self.encoder = self.encoder_spec.encoder()
        self.projector, self.predictor = projector_and_predictor(
            self.projector_hidden,
            self.predictor_hidden,
            self.projection_dim,
            predictor_last_bn=False,
        )

    def pool(self, images: jax.Array) -> jax.Array:
        """The encoder's pooled representation of whole images, [B, width] float32."""
        return self.encoder(images, None).pooled()[self.pooling]

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


def build_model(model_cfg: Any, input_cfg: Any, maect_cfg: Any) -> MAECT:
    """MAECT from config.model, config.input and config.maect; the encoder is the one stage 1
    trains from the same config.model."""
    return MAECT(
        encoder_spec=EncoderSpec.from_config(model_cfg, input_cfg),
        pooling=maect_cfg.pooling,
        projector_hidden=int(maect_cfg.projector_hidden),
        predictor_hidden=int(maect_cfg.predictor_hidden),
        projection_dim=int(maect_cfg.projection_dim),
    )
