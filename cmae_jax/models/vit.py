"""ViT encoder of the MAE family: patch embedding, fixed 2-D sin-cos position embedding, cls token.

Conventions shared by every model in this package:
  * images are NHWC; the patch grid is row-major (patch index n = row * grid_w + col);
  * within a patch, pixels are ordered (pixel row, pixel col, channel) as in MAE's ``patchify``;
  * parameters are float32 and carry logical axis names (``nn.with_logical_partitioning``);
    ``dtype`` is only the compute dtype.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# (width, depth, num_heads); MLP width is always 4 * width (MLP ratio 4).
ENCODER_SIZES: dict[str, tuple[int, int, int]] = {
    "Mu": (96, 4, 3),  # not a published size: the CPU demo encoder (Fashion-MNIST)
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}

# Every Linear of the MAE family: xavier uniform kernel, zero bias (SPEC "Shared backbone").
# For a 2-D kernel this equals torch.nn.init.xavier_uniform_ on the transposed weight.
xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones

LN_EPS = 1e-6
TOKEN_INIT_STD = 0.02  # cls and mask tokens


def parse_variant(variant: str) -> dict[str, int]:
    """Turns a variant string such as "B/16" into encoder sizes (width, depth, heads, mlp, p)."""
    match = re.fullmatch(r"([A-Za-z]+)/(\d+)", variant.strip())
    if match is None or match.group(1) not in ENCODER_SIZES or int(match.group(2)) <= 0:
        valid = ", ".join(f"{name}/<patch>" for name in ENCODER_SIZES)
        raise ValueError(
            f"Unknown ViT variant {variant!r}; expected one of {valid} "
            '(e.g. "B/16", "H/14", "Ti/4"), patch a positive integer.'
        )
    width, depth, num_heads = ENCODER_SIZES[match.group(1)]
    return dict(
        width=width,
        depth=depth,
        num_heads=num_heads,
        mlp_dim=4 * width,
        patch_size=int(match.group(2)),
    )


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE's get_1d_sincos_pos_embed_from_grid: [M] positions -> [M, dim] (sin half, cos half)."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_posemb(width: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding of MAE, [grid_h * grid_w, width] in row-major order.

    Reproduces MAE's get_2d_sincos_pos_embed (temperature 10000) including its axis
    convention: MAE builds ``grid = np.meshgrid(grid_w, grid_h)`` ("w goes first"), so the
    array it calls ``emb_h`` (from ``grid[0]``) actually encodes the *column* index. Hence
    channels [0, width/2) are sin/cos of the column and channels [width/2, width) sin/cos of
    the row; the entry of patch (r, c) is at index r * grid_w + c. The cls slot is not
    included (it is an all-zero vector; callers add nothing to the cls token).
    """
    if width % 4:
        raise ValueError(f"sin-cos position embedding needs width % 4 == 0, got {width}.")
    grid = np.meshgrid(
        np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64)
    )  # each [grid_h, grid_w]; grid[0][r, c] = c, grid[1][r, c] = r
    emb = np.concatenate([_sincos_1d(width // 2, grid[0]), _sincos_1d(width // 2, grid[1])], axis=1)
    return emb.astype(np.float32)


def patchify(images: jax.Array, p: int) -> jax.Array:
    """[B, H, W, C] images -> [B, N, p*p*C] patches, row-major grid, (p, p, C) order inside."""
    b, h, w, c = images.shape
    if h % p or w % p:
        raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {p}.")
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, p: int, grid_h: int, grid_w: int, channels: int) -> jax.Array:
    """Inverse of `patchify`: [B, grid_h*grid_w, p*p*C] -> [B, grid_h*p, grid_w*p, C]."""
    b = patches.shape[0]
    x = patches.reshape(b, grid_h, grid_w, p, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid_h * p, grid_w * p, channels)


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm of the MAE family (eps 1e-6, weight 1, bias 0) with logical axis names."""
    return nn.LayerNorm(
        epsilon=LN_EPS,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(zeros, ("embed",)),
        name=name,
    )


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    dtype: Dtype,
    name: str,
    use_bias: bool = True,
) -> nn.Dense:
    """Linear layer with xavier-uniform kernel, zero bias and logical names (kernel axes)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(xavier_uniform, axes),
        bias_init=nn.with_logical_partitioning(zeros, (axes[1],)),
        name=name,
    )


def _constrain_tokens(x: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class HeadsProjection(nn.Module):
    """A linear map with a multi-axis kernel, as one einsum (with bias).

    Written out instead of nn.DenseGeneral: DenseGeneral initialises a flattened kernel and
    reshapes it, which breaks logical-axis constraints inside a mesh context. The fan-in and
    fan-out axes make the init exactly torch's xavier on the equivalent fused Linear.
    """

    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    bias_axes: tuple[str | None, ...]
    equation: str
    fan_in_axes: tuple[int, ...]
    fan_out_axes: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=self.fan_in_axes, out_axis=self.fan_out_axes
        )
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, self.kernel_axes), self.kernel_shape
        )
        bias_shape = tuple(self.kernel_shape[i] for i in self.fan_out_axes)
        bias = self.param("bias", nn.with_logical_partitioning(zeros, self.bias_axes), bias_shape)
        y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (with bias) as in timm's ViT."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}.")
        head_dim = width // self.num_heads
        # Kernel [width, 3, heads, head_dim]: fan_in width, fan_out 3 * width, as torch's
        # xavier on the fused Linear(width, 3 * width).
        qkv = HeadsProjection(
            kernel_shape=(width, 3, self.num_heads, head_dim),
            kernel_axes=("embed", None, "heads", "kv"),
            bias_axes=(None, "heads", "kv"),
            equation="bld,dthk->blthk",
            fan_in_axes=(0,),
            fan_out_axes=(1, 2, 3),
            dtype=self.dtype,
            name="qkv",
        )(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, L, heads, head_dim]
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
        v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (head_dim**-0.5), k)
        # Softmax in float32 even under bf16 compute: bf16 exp/sum loses too much precision.
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        # Only stored when the caller makes 'intermediates' mutable (for attention maps).
        self.sow("intermediates", "attention_weights", weights)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
        # Kernel [heads, head_dim, width]: fan_in = fan_out = width (xavier on [width, width]).
        return HeadsProjection(
            kernel_shape=(self.num_heads, head_dim, width),
            kernel_axes=("heads", "kv", "embed"),
            bias_axes=("embed",),
            equation="blhk,hkd->bld",
            fan_in_axes=(0, 1),
            fan_out_axes=(2,),
            dtype=self.dtype,
            name="proj",
        )(out)


class MlpBlock(nn.Module):
    """Transformer MLP: Linear -> exact GELU (as torch nn.GELU) -> Linear."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        y = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "fc1")(x)
        y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
        y = nn.gelu(y, approximate=False)
        return dense(width, ("mlp", "embed"), self.dtype, "fc2")(y)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _constrain_tokens(x)
        y = layer_norm(self.dtype, "norm1")(x)
        x = x + Attention(self.num_heads, self.dtype, name="attn")(y)
        y = layer_norm(self.dtype, "norm2")(x)
        x = x + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(y)
        return _constrain_tokens(x)


def block_stack(
    x: jax.Array,
    depth: int,
    num_heads: int,
    mlp_dim: int,
    dtype: Dtype,
    remat: bool,
) -> jax.Array:
    """Applies `depth` blocks named block_0 .. block_{depth-1} (call inside a compact method)."""
    block_cls = nn.remat(Block) if remat else Block
    for i in range(depth):
        x = block_cls(num_heads, mlp_dim, dtype, name=f"block_{i}")(x)
    return x


@flax.struct.dataclass
class EncoderOutput:
    """Encoder tokens, cls first: `tokens` after the final LayerNorm, `prenorm` before it."""

    tokens: jax.Array  # [B, 1 + K, width]
    prenorm: jax.Array  # [B, 1 + K, width]


class Encoder(nn.Module):
    """ViT encoder that encodes only the visible patches `ids_keep` (all patches if None).

    Order (MAE): patch embed -> + sin-cos pos-emb -> gather ids_keep -> prepend cls (zero
    pos-emb) -> blocks -> final LayerNorm. Params: embedding (Conv), cls, block_i, norm.
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    dtype: Dtype = jnp.float32
    remat: bool = False  # rematerialise each block in the backward pass (saves memory)

    @nn.compact
    def __call__(self, images: jax.Array, ids_keep: jax.Array | None = None) -> EncoderOutput:
        p = self.patch_size
        b, h, w, _ = images.shape
        if h % p or w % p:
            raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {p}.")
        grid_h, grid_w = h // p, w // p
        # A stride-p conv is a Linear on the flattened (p, p, C) patch; torch's xavier on the
        # [width, p*p*C] matrix has fan_in = p*p*C, fan_out = width, which needs the spatial
        # and input-channel axes all counted as in_axis (flax's default would multiply the
        # receptive field into fan_out too).
        patch_init = nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
        )
        x = nn.Conv(
            self.width,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(patch_init, (None, None, None, "embed")),
            bias_init=nn.with_logical_partitioning(zeros, ("embed",)),
            name="embedding",
        )(images.astype(self.dtype))
        x = x.reshape(b, grid_h * grid_w, self.width)
        x = x + jnp.asarray(sincos_2d_posemb(self.width, grid_h, grid_w), self.dtype)[None]
        if ids_keep is not None:
            x = jnp.take_along_axis(x, ids_keep[:, :, None].astype(jnp.int32), axis=1)
        cls = self.param(
            "cls",
            nn.with_logical_partitioning(
                nn.initializers.normal(TOKEN_INIT_STD), (None, None, "embed")
            ),
            (1, 1, self.width),
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width))
        x = _constrain_tokens(jnp.concatenate([cls, x], axis=1))
        x = block_stack(x, self.depth, self.num_heads, self.mlp_dim, self.dtype, self.remat)
        tokens = _constrain_tokens(layer_norm(self.dtype, "norm")(x))
        return EncoderOutput(tokens=tokens, prenorm=x)


def encoder_from_variant(variant: str, **overrides: Any) -> Encoder:
    """Builds an `Encoder` from a variant string; keyword overrides replace any size or dtype."""
    kwargs: dict[str, Any] = parse_variant(variant)
    kwargs.update(overrides)
    return Encoder(**kwargs)


def count_params(tree: Any) -> int:
    """Number of scalars in a (possibly abstract or logically boxed) parameter tree."""
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(tree))
    return int(sum(np.prod(leaf.shape) for leaf in leaves))


__all__: Sequence[str] = (
    "ENCODER_SIZES",
    "Attention",
    "Block",
    "Encoder",
    "EncoderOutput",
    "MlpBlock",
    "count_params",
    "encoder_from_variant",
    "parse_variant",
    "patchify",
    "sincos_2d_posemb",
    "unpatchify",
)
