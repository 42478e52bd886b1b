"""Analytic FLOP counts of ViT parts: what the methods' `flops_per_example` add up.

Matmuls and attention only, 2 FLOPs per multiply-add; norms, softmax and GELU are left out.
"""

import itertools
from typing import Any


def transformer_flops(tokens: int, width: int, depth: int, mlp: int) -> float:
    """Forward FLOPs of `depth` pre-norm blocks on one sequence of `tokens` tokens.

    Per token: qkv (3 w^2), output projection (w^2) and the two MLP matmuls (2 w mlp),
    2 FLOPs per multiply-add; per block the attention scores and their weighted sum
    (2 x tokens^2 x w each). Norms, softmax and GELU are left out.
    """
    per_token = 2 * (4 * width * width + 2 * width * mlp)
    attention = 2 * 2 * tokens * tokens * width
    return float(depth * (tokens * per_token + attention))


def patch_projection_flops(spec: Any, tokens: int, channels: int) -> float:
    """Forward FLOPs of the patch embedding's projection alone (each patch's pixels, or its
    conv stem's features, to one token) for tokens - 1 patches."""
    pixels = spec.patch_size * spec.patch_size
    return float(2 * (tokens - 1) * pixels * (spec.stem_channels or channels) * spec.width)


def encoder_flops(spec: Any, tokens: int, channels: int, depth: int | None = None) -> float:
    """Forward FLOPs of the ViT encoder `spec` (a models.encoder_spec.EncoderSpec) on cls +
    tokens - 1 patches of `channels`-channel images: patch embedding (with its conv stem,
    if any) and `depth` blocks (default all)."""
    pixels = spec.patch_size * spec.patch_size
    stem = spec.stem_channels
    embed = patch_projection_flops(spec, tokens, channels)
    if stem:  # two 3x3 conv layers on every pixel of every patch (models.vit.conv_stem)
        embed += 2 * (tokens - 1) * pixels * 9 * (channels * stem + stem * stem)
    depth = spec.depth if depth is None else depth
    return embed + transformer_flops(tokens, spec.width, depth, spec.mlp_dim)


def mlp_head_flops(widths: list[int]) -> float:
    """Forward FLOPs of one example through Linear layers of the given widths (in, ..., out)."""
    return float(sum(2 * a * b for a, b in itertools.pairwise(widths)))


def view_tokens(image_size: int, patch_size: int) -> int:
    """Tokens of a whole (unmasked) view: its patches and the cls token."""
    grid = image_size // patch_size
    return grid * grid + 1


def projector_predictor_flops(model: Any) -> tuple[float, float]:
    """Forward FLOPs of one example through a 3-layer projector (encoder width ->
    projection_dim) and a 2-layer predictor, the heads of MoCo v3 and MAE-CT: (projector,
    predictor). `model` has encoder_spec, projector_hidden, predictor_hidden, projection_dim."""
    width, dim = model.encoder_spec.width, model.projection_dim
    projector = mlp_head_flops([width, model.projector_hidden, model.projector_hidden, dim])
    predictor = mlp_head_flops([dim, model.predictor_hidden, dim])
    return projector, predictor


def two_view_update_flops(trained: float, forward_only: float, pass_through: float = 0.0) -> float:
    """FLOPs of one example's update in a two-view step from one view's forward FLOPs: the
    trained part runs forward and backward (3x), the rest forward only, each for both views;
    `pass_through` is frozen but has trained layers below it, so its backward pass computes
    the gradient of its input and not of its weights (2x)."""
    return float(2 * (3 * trained + 2 * pass_through + forward_only))
