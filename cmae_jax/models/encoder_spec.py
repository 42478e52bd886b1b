"""The ViT encoder a config describes: its sizes, compute dtype and memory levers, checked.

Every model that holds an encoder (CMAE / MAE, MAE-CT, the feature extractor and the
fine-tuning classifier) takes an EncoderSpec, so the variant parsing, its overrides and
the size checks live here once, and a checkpoint's encoder fits whichever of them reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from cmae_jax.models import vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPE_NAMES = (*DTYPES, "auto")
OVERRIDES = ("width", "depth", "num_heads", "mlp_dim")


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


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Sizes, input geometry, compute dtype and memory levers of one ViT encoder."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    channels: int = 3
    image_size: int | None = None  # None: not fixed here (checked where images arrive)
    dtype: Any = jnp.float32  # compute dtype; parameters are float32 whatever it is
    remat: str = "none"  # remat policy of every transformer block (vit.REMAT_POLICIES)
    scan_layers: bool = False  # nn.scan over the blocks (stacked parameters)
    stem_channels: int = 0  # > 0: patch-local conv stem of this width (vit.conv_stem)

    def __post_init__(self) -> None:
        positive = ("width", "num_heads", "mlp_dim", "patch_size", "channels")
        bad = [f"{k}={getattr(self, k)}" for k in positive if getattr(self, k) < 1]
        bad += [f"depth={self.depth}"] if self.depth < 0 else []
        if bad:
            raise ValueError(
                f"Encoder {', '.join(bad)}: {', '.join(positive)} must be positive, depth >= 0."
            )
        if self.stem_channels < 0:
            raise ValueError(
                f"config.model.stem_channels={self.stem_channels}: 0 for the linear patch "
                "embedding, or a positive channel count for the conv stem (e.g. 16)."
            )
        if self.width % self.num_heads:
            raise ValueError(
                f"config.model.num_heads={self.num_heads} does not divide the width "
                f"{self.width}; pick a head count that does (e.g. width / 64)."
            )
        if self.width % 4:
            raise ValueError(
                f"config.model.width={self.width}: the 2-D sin-cos position table needs a "
                "multiple of 4."
            )
        if self.image_size is not None and self.image_size % self.patch_size:
            raise ValueError(
                f"config.input.image_size={self.image_size} is not divisible by the patch "
                f"size {self.patch_size}."
            )
        if self.remat not in vit.REMAT_POLICIES:
            raise ValueError(
                f"config.model.remat={self.remat!r} is not one of {', '.join(vit.REMAT_POLICIES)}."
            )

    @classmethod
    def from_config(cls, model_cfg: Any, input_cfg: Any) -> EncoderSpec:
        """The encoder config.model (variant, size overrides, dtype, remat, scan_layers,
        stem_channels) and config.input (patch_size, channels, image_size) describe;
        ValueError naming the key and the fix for one that cannot work."""
        sizes = vit.parse_variant(model_cfg.variant)
        for key in OVERRIDES:
            if model_cfg.get(key) is not None:
                sizes[key] = int(model_cfg[key])
        if model_cfg.get("width") is not None and model_cfg.get("mlp_dim") is None:
            sizes["mlp_dim"] = 4 * sizes["width"]  # MLP ratio 4 of the overridden width
        patch = sizes["patch_size"]
        input_patch = input_cfg.get("patch_size")
        if input_patch is not None and int(input_patch) != patch:
            raise ValueError(
                f"config.input.patch_size={input_patch} differs from the patch size {patch} of "
                f"config.model.variant={model_cfg.variant!r}; make them equal."
            )
        image_size = input_cfg.get("image_size")
        try:
            remat = vit.remat_policy_name(model_cfg.get("remat") or "none")
        except ValueError as e:
            raise ValueError(f"config.model.{e}") from None
        return cls(
            **sizes,
            channels=int(input_cfg.get("channels") or 3),
            image_size=None if image_size is None else int(image_size),
            dtype=DTYPES[resolve_dtype(model_cfg.get("dtype") or "float32")],
            remat=remat,
            scan_layers=bool(model_cfg.get("scan_layers") or False),
            stem_channels=int(model_cfg.get("stem_channels") or 0),
        )

    def encoder(self, **overrides: Any) -> vit.Encoder:
        """The vit.Encoder of this spec; `overrides` e.g. drop_path=0.1 (fine-tuning)."""
        return vit.Encoder(
            width=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            patch_size=self.patch_size,
            dtype=self.dtype,
            remat=self.remat,
            scan_layers=self.scan_layers,
            stem_channels=self.stem_channels,
            **overrides,
        )
