"""The architecture of a published checkpoint, inferred from its tensor shapes.

Shapes give the width, depth, MLP width, patch size, channels and (from the position
table) the image size, but not the number of attention heads: that comes from the file's
own config where it has one (HF config.json, MAE-CT's ctor_kwargs), else from the
standard ViT of that width (vit.ENCODER_SIZES) and, for decoders, from MAE's 16 heads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cmae_jax.interop import positions
from cmae_jax.interop.torch_layout import Part, block_indices
from cmae_jax.models import vit

# Every decoder of the official MAE and CMAE code has 16 heads (decoder_num_heads=16).
DECODER_HEADS = 16


class ArchitectureError(ValueError):
    """Shapes that fit no ViT this project builds (the message names key, shapes, fix)."""


@dataclasses.dataclass(frozen=True)
class DecoderSizes:
    """Width, depth, heads and output width of an MAE-style decoder."""

    width: int
    depth: int
    num_heads: int
    out_dim: int


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What config.model and config.input need to build the checkpoint's model."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    channels: int
    image_size: int | None
    pixel_decoder: DecoderSizes | None = None
    feature_decoder: DecoderSizes | None = None
    projector_hidden: int | None = None
    projection_dim: int | None = None

    @property
    def size_name(self) -> str:
        """The ENCODER_SIZES name of this width (closest width when none matches)."""
        return min(vit.ENCODER_SIZES, key=lambda n: abs(vit.ENCODER_SIZES[n][0] - self.width))

    @property
    def variant(self) -> str:
        """config.model.variant, e.g. 'B/16'."""
        return f"{self.size_name}/{self.patch_size}"

    def model_config(self) -> dict[str, Any]:
        """config.model keys: the variant, the sizes it does not imply, the decoders/heads."""
        width, depth, heads = vit.ENCODER_SIZES[self.size_name]
        out: dict[str, Any] = {
            "variant": self.variant,
            "width": None if width == self.width else self.width,
            "depth": None if depth == self.depth else self.depth,
            "num_heads": None if heads == self.num_heads else self.num_heads,
            "mlp_dim": None if self.mlp_dim == 4 * self.width else self.mlp_dim,
        }
        if self.pixel_decoder is not None:
            out.update(
                pixel_decoder_width=self.pixel_decoder.width,
                pixel_decoder_depth=self.pixel_decoder.depth,
                pixel_decoder_heads=self.pixel_decoder.num_heads,
            )
        if self.feature_decoder is not None:
            out["feature_decoder_depth"] = self.feature_decoder.depth
        if self.projector_hidden is not None:
            out.update(projector_hidden=self.projector_hidden, projection_dim=self.projection_dim)
        return out

    def describe(self) -> str:
        """One line, e.g. 'ViT-B/16 (768 wide, 12 blocks, 12 heads), 224 px, 3 channels'."""
        size = f"{self.image_size} px" if self.image_size else "image size not stored"
        return (
            f"ViT-{self.variant} ({self.width} wide, {self.depth} blocks, {self.num_heads} "
            f"heads, MLP {self.mlp_dim}), {size}, {self.channels} channel(s)"
        )


def standard_heads(width: int, what: str) -> int:
    """Heads of the standard ViT of this width; an error naming the widths that have one."""
    for size_width, _, heads in vit.ENCODER_SIZES.values():
        if size_width == width:
            return heads
    known = ", ".join(f"{n} {w}" for n, (w, _, _) in vit.ENCODER_SIZES.items())
    raise ArchitectureError(
        f"{what} is {width} wide: no ViT variant has that width ({known}) and the file does "
        "not say how many attention heads it has, so its shapes fit no variant here."
    )


def _check_heads(width: int, heads: int, what: str) -> None:
    if heads <= 0 or width % heads:
        raise ArchitectureError(f"{what}: width {width} is not divisible by {heads} heads.")


def encoder_architecture(
    part: Part, num_heads: int | None, what: str = "the encoder"
) -> Architecture:
    """Sizes of an encoder part (see torch_layout); `num_heads` None: the standard."""
    conv = part.get("patch_embed.proj.weight")
    if conv is None or conv.ndim != 4 or conv.shape[2] != conv.shape[3]:
        shape = None if conv is None else list(conv.shape)
        raise ArchitectureError(
            f"{what}: patch_embed.proj.weight has shape {shape}; expected a square "
            "Conv2d patch embedding [width, channels, patch, patch]."
        )
    width, channels, patch = int(conv.shape[0]), int(conv.shape[1]), int(conv.shape[2])
    if width % 4:
        raise ArchitectureError(
            f"{what}: width {width} (patch_embed.proj.weight {list(conv.shape)}) is not "
            "divisible by 4, which the fixed 2-D sin-cos position table needs."
        )
    depth = len(block_indices(part))
    if depth == 0:
        raise ArchitectureError(f"{what}: no transformer blocks (blocks.0.*) in the file.")
    fc1 = part.get("blocks.0.mlp.fc1.weight")
    if fc1 is None or fc1.shape[1:] != (width,):
        shape = None if fc1 is None else list(fc1.shape)
        raise ArchitectureError(
            f"{what}: blocks.0.mlp.fc1.weight has shape {shape}, expected [mlp, {width}]."
        )
    heads = num_heads or standard_heads(width, what)
    _check_heads(width, heads, what)
    image_size = None
    if "pos_embed" in part:
        _, _, side = positions.split_table(part["pos_embed"], what)
        image_size = side * patch
    return Architecture(
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=int(fc1.shape[0]),
        patch_size=patch,
        channels=channels,
        image_size=image_size,
    )


def decoder_sizes(part: Part, num_heads: int | None, what: str) -> DecoderSizes:
    """Sizes of a decoder part (see torch_layout); `num_heads` None: MAE's 16."""
    embed = part.get("embed.weight")
    pred = part.get("pred.weight")
    if embed is None or pred is None:
        raise ArchitectureError(f"{what}: embed.weight or pred.weight is missing.")
    width = int(embed.shape[0])
    heads = num_heads or DECODER_HEADS
    _check_heads(width, heads, what)
    return DecoderSizes(
        width=width,
        depth=len(block_indices(part)),
        num_heads=heads,
        out_dim=int(pred.shape[0]),
    )


def _tree_depth_and_heads(tree: dict[str, Any]) -> tuple[int, int]:
    blocks = [k for k in tree if k.startswith("block_")]
    return len(blocks), tree["block_0"]["attn"]["qkv"]["kernel"].shape[2]


def architecture_of(params: dict[str, Any], image_size: int) -> Architecture:
    """The architecture of this project's params (unrolled blocks): encoder and, when
    present, pixel decoder; ValueError for an encoder those formats cannot hold."""
    encoder = params["encoder"]
    stem = sorted(key for key in encoder if key.startswith(vit.STEM_PREFIX))
    if stem:
        raise ValueError(
            f"This encoder has a convolutional patch stem ({', '.join(stem)}: "
            "config.model.stem_channels > 0), which the ViT of MAE, timm and HF ViTMAE has "
            "no place for. Export an encoder trained with config.model.stem_channels=0."
        )
    patch, _, channels, width = encoder["embedding"]["kernel"].shape
    depth, heads = _tree_depth_and_heads(encoder)
    pixel_decoder = None
    if "pixel_decoder" in params:
        decoder = params["pixel_decoder"]
        decoder_depth, decoder_heads = _tree_depth_and_heads(decoder)
        pixel_decoder = DecoderSizes(
            width=decoder["mask_token"].shape[-1],
            depth=decoder_depth,
            num_heads=decoder_heads,
            out_dim=decoder["pred"]["kernel"].shape[-1],
        )
    return Architecture(
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=encoder["block_0"]["mlp"]["fc1"]["kernel"].shape[-1],
        patch_size=patch,
        channels=channels,
        image_size=image_size,
        pixel_decoder=pixel_decoder,
    )
