"""Flax linen models: ViT encoder, MAE-style decoder, MLP heads and the CMAE wrapper."""

from cmae_jax.models.cmae import CMAE, build_model
from cmae_jax.models.decoder import Decoder
from cmae_jax.models.encoder_spec import EncoderSpec
from cmae_jax.models.heads import MLPHead
from cmae_jax.models.vit import (
    ENCODER_SIZES,
    Encoder,
    EncoderOutput,
    encoder_from_variant,
    parse_variant,
    patchify,
    sincos_2d_posemb,
    unpatchify,
)

__all__ = [
    "CMAE",
    "ENCODER_SIZES",
    "Decoder",
    "Encoder",
    "EncoderOutput",
    "EncoderSpec",
    "MLPHead",
    "build_model",
    "encoder_from_variant",
    "parse_variant",
    "patchify",
    "sincos_2d_posemb",
    "unpatchify",
]
