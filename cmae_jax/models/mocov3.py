"""MoCo v3 (ViT)'s model: the ViT encoder read at its cls token, a projector and a predictor.

As the official MoCo_ViT (facebookresearch/moco-v3, moco/builder.py), every Linear without
bias and every head ending in a BatchNorm that only normalises (SimCLR's last BN, without
scale and bias):
  projector  Linear(d, 4096) -> BN -> ReLU -> Linear(4096, 4096) -> BN -> ReLU
             -> Linear(4096, 256) -> BN(no affine)
  predictor  Linear(256, 4096) -> BN -> ReLU -> Linear(4096, 256) -> BN(no affine)
The encoder's representation is the cls token after the final LayerNorm (timm's ViT head
input, which the official code replaces by the projector).

params['encoder'] has exactly the structure of the MAE/CMAE encoder, so evaluations,
exports and every reader of weights take a MoCo v3 run as any other. The momentum encoder
and projector are no parameters of this module: they are EMA copies of params['encoder']
and params['projector'] kept in the optimiser state (cmae_jax.ema), run through `project`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmae_jax.models.encoder_spec import EncoderSpec
from cmae_jax.models.heads import projector_and_predictor


class MoCoV3(nn.Module):
    """Encoder + MoCo v3 projector and predictor; submodules: encoder, projector, predictor."""

    encoder_spec: EncoderSpec
    projector_hidden: int = 4096
    predictor_hidden: int = 4096
    projection_dim: int = 256

    def setup(self):
        self.encoder = self.encoder_spec.encoder()
        self.projector, self.predictor = projector_and_predictor(
            self.projector_hidden,
            self.predictor_hidden,
            self.projection_dim,
            predictor_last_bn=True,
            last_bn_affine=False,
            in_axes=("embed", "proj"),
        )

    def project(self, images: jax.Array, train: bool) -> jax.Array:
        """Whole images -> encoder cls token -> projector, [B, projection_dim] float32.

        Needs only params {'encoder', 'projector'}: the momentum branch runs this on the
        EMA copies (the keys), the online branch inside `__call__`.
        """
        cls = self.encoder(images, None).tokens[:, 0].astype(jnp.float32)
        return self.projector(cls, train)

    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        """Online branch: projector then predictor (the queries), [B, projection_dim]."""
        return self.predictor(self.project(images, train), train)


def build_model(model_cfg: Any, input_cfg: Any, mocov3_cfg: Any) -> MoCoV3:
    """MoCoV3 from config.model, config.input and config.mocov3 (the encoder resolved and
    checked by EncoderSpec, so it is the one a MAE run of the same config.model has)."""
    return MoCoV3(
        encoder_spec=EncoderSpec.from_config(model_cfg, input_cfg),
        projector_hidden=int(mocov3_cfg.projector_hidden),
        predictor_hidden=int(mocov3_cfg.predictor_hidden),
        projection_dim=int(mocov3_cfg.projection_dim),
    )
