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


def encoder_flops(spec: Any, tokens: int, channels: int, depth: int | None = None) -> float:
    """Forward FLOPs of the ViT encoder `spec` (a models.encoder_spec.EncoderSpec) on cls +
    tokens - 1 patches of `channels`-channel images: patch embedding and `depth` blocks
    (default all)."""
    embed = 2 * (tokens - 1) * spec.patch_size * spec.patch_size * channels * spec.width
    depth = spec.depth if depth is None else depth
    return embed + transformer_flops(tokens, spec.width, depth, spec.mlp_dim)


def mlp_head_flops(widths: list[int]) -> float:
    """Forward FLOPs of one example through Linear layers of the given widths (in, ..., out)."""
    return float(sum(2 * a * b for a, b in itertools.pairwise(widths)))
