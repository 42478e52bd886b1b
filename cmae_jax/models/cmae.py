"""CMAE: MAE (encoder + pixel decoder) plus a feature decoder and projector/predictor heads.

The online branch runs `__call__`; the target branch (EMA copies of params['encoder'] and
params['projector']) runs `target_projection`; evaluation uses `features`. With
`contrastive=False` the model is plain MAE (no feature decoder, no heads).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmae_jax.models import vit
from cmae_jax.models.decoder import Decoder
from cmae_jax.models.heads import MLPHead

Dtype = Any

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPE_NAMES = (*_DTYPES, "auto")


def resolve_dtype(name: str, platform: str | None = None) -> str:
    """config.model.dtype as a compute dtype name: 'auto' is bfloat16 on GPU and TPU (their
    matrix units run bf16 at full rate; parameters and optimiser state stay float32) and
    float32 on CPU, where bf16 gains nothing. `platform` defaults to JAX's backend."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"config.model.dtype={name!r} is not one of {sorted(DTYPE_NAMES)}.")
    if name != "auto":
        return name
    platform = jax.default_backend() if platform is None else platform
    return "float32" if platform == "cpu" else "bfloat16"


class CMAE(nn.Module):
    """Contrastive masked autoencoder; submodules: encoder, pixel_decoder, feature_decoder,
    projector, predictor (the last three only when `contrastive`)."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    channels: int = 3
    pixel_decoder_width: int = 512
    pixel_decoder_depth: int = 8
    pixel_decoder_heads: int = 16
    feature_decoder_depth: int = 2
    projector_hidden: int = 1536
    projection_dim: int = 256
    contrastive: bool = True
    dtype: Dtype = jnp.float32
    remat: bool | str = "none"  # remat policy of every transformer block (vit.REMAT_POLICIES)
    scan_layers: bool = False  # nn.scan over the blocks of encoder and decoders

    def setup(self):
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
        self.pixel_decoder = Decoder(
            out_dim=self.patch_size * self.patch_size * self.channels,
            width=self.pixel_decoder_width,
            depth=self.pixel_decoder_depth,
            num_heads=self.pixel_decoder_heads,
            mlp_dim=4 * self.pixel_decoder_width,
            dtype=self.dtype,
            remat=self.remat,
            scan_layers=self.scan_layers,
        )
        if self.contrastive:
            # Same structure as the pixel decoder (width, heads), own parameters, depth 2; its
            # output is projected to the encoder's width (768 in the official ViT-B code).
            self.feature_decoder = Decoder(
                out_dim=self.width,
                width=self.pixel_decoder_width,
                depth=self.feature_decoder_depth,
                num_heads=self.pixel_decoder_heads,
                mlp_dim=4 * self.pixel_decoder_width,
                dtype=self.dtype,
                remat=self.remat,
                scan_layers=self.scan_layers,
            )
            # The heads run in float32 whatever `dtype` is: they are tiny, and BatchNorm and the
            # InfoNCE logits (temperature 0.07) are sensitive to bf16 rounding.
            self.projector = MLPHead(self.projector_hidden, self.projection_dim, in_axis="embed")
            self.predictor = MLPHead(self.projector_hidden, self.projection_dim, in_axis="proj")

    def _grid(self, images: jax.Array) -> tuple[int, int]:
        return images.shape[1] // self.patch_size, images.shape[2] // self.patch_size

    def __call__(
        self, online: jax.Array, ids_keep: jax.Array, ids_mask: jax.Array, train: bool
    ) -> dict[str, jax.Array]:
        """Online branch: {'pixel_pred': [B, N, p*p*C], 'online_pred': [B, projection_dim]}.

        'pixel_pred' covers all N patches in row-major order (the loss picks the masked ones);
        'online_pred' is only present when `contrastive`.
        """
        grid = self._grid(online)
        latents = self.encoder(online, ids_keep).tokens
        out = {
            "pixel_pred": self.pixel_decoder(latents, ids_keep, ids_mask, grid).astype(jnp.float32)
        }
        if self.contrastive:
            feats = self.feature_decoder(latents, ids_keep, ids_mask, grid)
            online_repr = jnp.mean(feats.astype(jnp.float32), axis=1)  # all N positions
            projection = self.projector(online_repr, train)
            out["online_pred"] = self.predictor(projection, train)
        return out

    def target_projection(self, images: jax.Array, train: bool) -> jax.Array:
        """Target branch: whole view, pre-norm features mean-pooled over patches, projector.

        Needs only params {'encoder', 'projector'} (and the projector's batch_stats).
        """
        if not self.contrastive:
            raise ValueError("target_projection needs a contrastive CMAE (contrastive=True).")
        prenorm = self.encoder(images, None).prenorm
        pooled = jnp.mean(prenorm[:, 1:].astype(jnp.float32), axis=1)  # exclude cls
        return self.projector(pooled, train)

    def features(self, images: jax.Array) -> dict[str, jax.Array]:
        """Frozen-encoder features for evaluation: normed cls token and mean of normed patches."""
        return self.encoder(images, None).pooled()


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def build_model(model_cfg: Any, input_cfg: Any, contrastive: bool | None = None) -> CMAE:
    """Builds the CMAE module from config.model and config.input.

    `contrastive` (whether the feature decoder and heads exist) is normally decided by the
    caller from the method / contrastive loss weight; if None, model_cfg.contrastive is used,
    falling back to input_cfg.target_view, falling back to True.
    """
    sizes: dict[str, Any] = vit.parse_variant(model_cfg.variant)
    for key in ("width", "depth", "num_heads", "mlp_dim"):
        if _get(model_cfg, key) is not None:
            sizes[key] = int(_get(model_cfg, key))
    if _get(model_cfg, "width") is not None and _get(model_cfg, "mlp_dim") is None:
        sizes["mlp_dim"] = 4 * sizes["width"]
    patch = sizes["patch_size"]
    input_patch = _get(input_cfg, "patch_size", patch)
    if int(input_patch) != patch:
        raise ValueError(
            f"config.input.patch_size={input_patch} differs from the patch size {patch} of "
            f"config.model.variant={model_cfg.variant!r}; make them equal."
        )
    image_size = _get(input_cfg, "image_size")
    if image_size is not None and int(image_size) % patch:
        raise ValueError(
            f"config.input.image_size={image_size} is not divisible by the patch size {patch}."
        )
    dtype_name = resolve_dtype(_get(model_cfg, "dtype", "float32"))
    try:
        remat = vit.remat_policy_name(_get(model_cfg, "remat", "none"))
    except ValueError as e:
        raise ValueError(f"config.model.{e}") from None
    if contrastive is None:
        contrastive = _get(model_cfg, "contrastive", _get(input_cfg, "target_view", True))
    return CMAE(
        width=sizes["width"],
        depth=sizes["depth"],
        num_heads=sizes["num_heads"],
        mlp_dim=sizes["mlp_dim"],
        patch_size=patch,
        channels=int(_get(input_cfg, "channels", 3)),
        pixel_decoder_width=int(_get(model_cfg, "pixel_decoder_width", 512)),
        pixel_decoder_depth=int(_get(model_cfg, "pixel_decoder_depth", 8)),
        pixel_decoder_heads=int(_get(model_cfg, "pixel_decoder_heads", 16)),
        feature_decoder_depth=int(_get(model_cfg, "feature_decoder_depth", 2)),
        projector_hidden=int(_get(model_cfg, "projector_hidden", 1536)),
        projection_dim=int(_get(model_cfg, "projection_dim", 256)),
        contrastive=bool(contrastive),
        dtype=_DTYPES[dtype_name],
        remat=remat,
        scan_layers=bool(_get(model_cfg, "scan_layers", False)),
    )
