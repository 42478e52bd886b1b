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
    kernel_init: nn.initializers.Initializer = xavier_uniform,
    bias_init: nn.initializers.Initializer = zeros,
) -> nn.Dense:
    """Linear layer with logical names (kernel axes); by default xavier-uniform kernel and
    zero bias, the MAE family's rule."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)),
        name=name,
    )


# Activations carry their own logical names: the parameters' 'embed' is split over fsdp,
# while the tokens keep their whole width on each device (see cmae_jax.sharding).
TOKENS = ("batch", "length", "activation_embed")
HEADS = ("batch", "length", "activation_heads", "activation_kv")

# Rematerialisation of the transformer blocks in the backward pass: 'none' keeps every
# activation; 'full' keeps only each block's input and recomputes the rest; 'save_dots'
# keeps the outputs of the linear layers (matmuls without batch dimensions) and recomputes
# attention scores, softmax, norms and GELU.
REMAT_POLICIES = ("none", "full", "save_dots")


def remat_policy_name(remat: bool | str | None) -> str:
    """Normalises a remat setting (a policy name, or the older booleans) to a policy name."""
    if remat is None or remat is False:
        return "none"
    if remat is True:
        return "full"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not one of {', '.join(REMAT_POLICIES)}.")
    return remat


def _constrain_tokens(x: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x, TOKENS)


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


def attention_weights(q: jax.Array, k: jax.Array) -> jax.Array:
    """Softmax attention weights [B, heads, Lq, Lk] of q, k [B, L, heads, head_dim], float32.

    The logits are accumulated and the softmax taken in float32 even under bf16 compute:
    bf16 exp/sum loses too much precision.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    logits = nn.with_logical_constraint(logits, ("batch", "activation_heads", None, None))
    return jax.nn.softmax(logits, axis=-1)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v for q, k, v [B, L, heads, head_dim], as one op.

    On a GPU with 16-bit inputs this is cuDNN's fused (flash) attention, which never
    writes the [B, heads, L, L] weights to memory; where cuDNN refuses the shapes at trace
    time, and on CPU and TPU, it is XLA's einsum-softmax-einsum with float32 logits and
    softmax, the same computation as `attention_weights`.
    """
    scale = q.shape[-1] ** -0.5
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            pass
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")


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
        q = nn.with_logical_constraint(q, HEADS)
        k = nn.with_logical_constraint(k, HEADS)
        v = nn.with_logical_constraint(v, HEADS)
        if self.is_mutable_collection("intermediates"):
            # Attention maps were asked for: the weights must exist as an array.
            weights = attention_weights(q, k)
            self.sow("intermediates", "attention_weights", weights)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
        else:
            out = dot_product_attention(q, k, v)
        out = nn.with_logical_constraint(out, HEADS)
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


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), written as torch computes it: 0.5 x (1 + erf(x / sqrt 2)).

    The same function as nn.gelu(approximate=False) to float rounding, which goes through
    erfc (an exp and a rational function); XLA's erf is one polynomial, and in the demo's
    step on CPU each MLP's erfc took as long as its first matmul (this form: 1.03x the
    step's images/s).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


class PatchEmbedding(nn.Module):
    """Flattened (p, p, C) patches [..., p*p*C] -> tokens [..., width], one matmul.

    The parameters are a stride-p conv's (kernel [p, p, C, width], bias), as checkpoints,
    HF ViTMAE and timm store them; the same map as that conv, which XLA's CPU backend
    ran three times slower on the demo's 7 px patches.
    """

    width: int
    patch_size: int
    kernel_init: Any
    bias_init: Any
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        p = self.patch_size
        channels = patches.shape[-1] // (p * p)
        kernel = self.param("kernel", self.kernel_init, (p, p, channels, self.width))
        bias = self.param("bias", self.bias_init, (self.width,))
        kernel = kernel.reshape(p * p * channels, self.width).astype(self.dtype)
        return patches.astype(self.dtype) @ kernel + bias.astype(self.dtype)


class MlpBlock(nn.Module):
    """Transformer MLP: Linear -> exact GELU (as torch nn.GELU) -> Linear."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        y = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "fc1")(x)
        y = nn.with_logical_constraint(y, ("batch", "length", "activation_mlp"))
        y = gelu(y)
        return dense(width, ("mlp", "embed"), self.dtype, "fc2")(y)


def drop_path(x: jax.Array, rate: float | jax.Array, rng: jax.Array) -> jax.Array:
    """Stochastic depth: zeroes each example's residual branch with probability `rate`,
    scaling the kept ones by 1 / (1 - rate) (timm's DropPath)."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    With `carry` it returns (x, None), the form nn.scan needs for its body. With
    `drop_path` > 0 and not `deterministic`, each residual branch is dropped per example
    (stochastic depth; rng stream 'dropout') at the rate given as the second argument, or
    at `drop_path` when that is None.
    """

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    carry: bool = False
    drop_path: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, rate: jax.Array | None = None
    ) -> jax.Array | tuple[jax.Array, None]:
        stochastic = self.drop_path > 0 and not self.deterministic
        rate = self.drop_path if rate is None else rate
        residual = lambda y: drop_path(y, rate, self.make_rng("dropout")) if stochastic else y
        x = _constrain_tokens(x)
        y = layer_norm(self.dtype, "norm1")(x)
        x = x + residual(Attention(self.num_heads, self.dtype, name="attn")(y))
        y = layer_norm(self.dtype, "norm2")(x)
        x = x + residual(MlpBlock(self.mlp_dim, self.dtype, name="mlp")(y))
        x = _constrain_tokens(x)
        return (x, None) if self.carry else x


def block_class(remat: bool | str, scan: bool = False) -> type[Block]:
    """Block, wrapped in nn.remat with the named policy (see REMAT_POLICIES)."""
    name = remat_policy_name(remat)
    if name == "none":
        return Block
    policy = None if name == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    # Inside a scan the loop already keeps XLA from merging recomputation with the forward
    # pass, and prevent_cse would only block optimisations.
    return nn.remat(Block, policy=policy, prevent_cse=not scan)


def block_stack(
    x: jax.Array,
    depth: int,
    num_heads: int,
    mlp_dim: int,
    dtype: Dtype,
    remat: bool | str,
    scan: bool = False,
    drop_path: float = 0.0,
    deterministic: bool = True,
) -> jax.Array:
    """Applies `depth` blocks (call inside a compact method).

    Unrolled, the blocks are block_0 .. block_{depth-1}. With `scan` they are one module
    'blocks' run by nn.scan, each parameter stacked along a leading axis of length depth
    (logical name 'layers'): the step compiles one block instead of depth copies, which
    makes compile time and program size independent of depth. `drop_path` is the stochastic
    depth rate of the last block; block i gets drop_path * i / (depth - 1) (timm, MAE).
    """
    rates = np.linspace(0.0, drop_path, depth) if depth > 1 else np.full([depth], drop_path)
    options = dict(drop_path=drop_path, deterministic=deterministic)
    if scan:
        stack = nn.scan(
            block_class(remat, scan=True),
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            length=depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        xs = jnp.asarray(rates, jnp.float32) if drop_path > 0 else None
        x, _ = stack(num_heads, mlp_dim, dtype, carry=True, name="blocks", **options)(x, xs)
        return x
    block_cls = block_class(remat)
    for i in range(depth):
        rate = float(rates[i]) if drop_path > 0 else None
        x = block_cls(num_heads, mlp_dim, dtype, name=f"block_{i}", **options)(x, rate)
    return x


# Layers of the optional convolutional patch stem (Encoder.stem_channels > 0); its
# parameters are named STEM_PREFIX + conv<i> / norm<i>.
STEM_LAYERS = 2
STEM_PREFIX = "stem_"


def conv_stem(patches: jax.Array, channels: int, dtype: Dtype) -> jax.Array:
    """Patch-local 3x3 conv -> LayerNorm -> GELU layers (call inside a compact method).

    [M, p, p, C] single patches -> [M, p, p, channels]. Each patch is zero-padded at its own
    border, so a token never sees another patch's pixels: the encoder of the visible
    patches still knows nothing of the masked ones. Early convolutions help a ViT learn
    faster on small images (Xiao et al. 2021, "Early convolutions help transformers see
    better"); kept patch-local here, like the hMLP stem of Touvron et al. 2022, so that
    masked pretraining stays exact.
    """
    y = patches
    for i in range(STEM_LAYERS):
        y = nn.Conv(
            channels,
            kernel_size=(3, 3),
            padding="SAME",
            dtype=dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, None)
            ),
            bias_init=nn.with_logical_partitioning(zeros, (None,)),
            name=f"{STEM_PREFIX}conv{i}",
        )(y)
        y = nn.LayerNorm(
            epsilon=LN_EPS,
            dtype=dtype,
            scale_init=nn.with_logical_partitioning(ones, (None,)),
            bias_init=nn.with_logical_partitioning(zeros, (None,)),
            name=f"{STEM_PREFIX}norm{i}",
        )(y)
        # flax's erfc form here: with the erf form, XLA's CPU compiler (jax 0.10.2) gets this
        # step's gradients wrong on a data x tensor mesh even with CSE off (test_sharding).
        y = nn.gelu(y, approximate=False)
    return y


# The pooled features an encoder gives evaluations (EncoderOutput.pooled, config.eval.feature):
# the same for the evaluation command and for the k-NN that runs inside a pretraining.
# 'grid' and 'tokens' keep where on the image a token was: the cls token and the patch mean
# drop it, and on aligned images (Fashion-MNIST's centred garments) the raw pixels' k-NN
# wins by comparing position by position.
POOLINGS = ("cls", "mean", "cls+mean", "grid", "tokens")
# 'grid': the patch tokens averaged over GRID_CELLS x GRID_CELLS cells of the patch grid.
GRID_CELLS = 2


def cell_weights(grid_h: int, grid_w: int, cells: int = GRID_CELLS) -> np.ndarray:
    """[cells * cells, grid_h * grid_w] averaging weights of the patch grid's cells, row-major
    (torch's adaptive average pooling bins: cell i spans [floor(i n / c), ceil((i + 1) n / c)),
    so an odd grid's middle row or column belongs to two cells)."""

    def bins(n: int) -> list[range]:
        return [range(i * n // cells, -(-(i + 1) * n // cells)) for i in range(cells)]

    weights = np.zeros((cells * cells, grid_h * grid_w), np.float32)
    for r, rows in enumerate(bins(grid_h)):
        for c, cols in enumerate(bins(grid_w)):
            members = [y * grid_w + x for y in rows for x in cols]
            weights[r * cells + c, members] = 1.0 / len(members)
    return weights


def cell_means(patches: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """[B, K, D] patch tokens in raster order -> [B, GRID_CELLS^2 * D] float32: their means
    over the cells of `cell_weights`, concatenated row-major (the 'grid' feature)."""
    weights = cell_weights(*grid)
    cells = jnp.einsum("ck,bkd->bcd", weights, patches.astype(jnp.float32))
    return cells.reshape(len(patches), -1)


@flax.struct.dataclass
class EncoderOutput:
    """Encoder tokens, cls first: `tokens` after the final LayerNorm, `prenorm` before it;
    `grid` the (rows, columns) of the patch tokens when all patches were encoded."""

    tokens: jax.Array  # [B, 1 + K, width]
    prenorm: jax.Array  # [B, 1 + K, width]
    grid: tuple[int, int] | None = flax.struct.field(pytree_node=False, default=None)

    def pooled(self) -> dict[str, jax.Array]:
        """Evaluation features in float32, one per name of POOLINGS: 'cls' (normed cls token),
        'mean' (of the normed patch tokens), 'cls+mean' (the two concatenated), 'grid' (the
        patch tokens' means over GRID_CELLS^2 cells, concatenated row-major) and 'tokens'
        (every normed patch token, flattened in raster order: K x width numbers)."""
        if self.grid is None:
            raise ValueError("Pooled features need every patch encoded (ids_keep=None).")
        tokens = self.tokens.astype(jnp.float32)
        cls, patches = tokens[:, 0], tokens[:, 1:]
        mean = jnp.mean(patches, axis=1)
        return {
            "cls": cls,
            "mean": mean,
            "cls+mean": jnp.concatenate([cls, mean], axis=-1),
            "grid": cell_means(patches, self.grid),
            "tokens": patches.reshape(len(patches), -1),
        }


class Encoder(nn.Module):
    """ViT encoder that encodes only the visible patches `ids_keep` (all patches if None).

    Order (MAE): patch embed -> + sin-cos pos-emb -> gather ids_keep -> prepend cls (zero
    pos-emb) -> blocks -> final LayerNorm (the gather runs first, on the patches and their
    pos-embs: the same tokens, only the visible ones embedded). Params: embedding (a
    stride-p conv's kernel and bias, PatchEmbedding), cls, block_i, norm.
    With `stem_channels` > 0 the patches are gathered first and each goes through
    `conv_stem` (params stem_conv<i>, stem_norm<i>) before the embedding, which then maps
    the stem's [p, p, stem_channels] features of a patch to one token.
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    dtype: Dtype = jnp.float32
    remat: bool | str = "none"  # remat policy of the blocks (REMAT_POLICIES); saves memory
    scan_layers: bool = False  # run the blocks with nn.scan (stacked parameters)
    drop_path: float = 0.0  # stochastic depth rate of the last block (fine-tuning), with train
    stem_channels: int = 0  # > 0: conv_stem of this width before the patch embedding

    @nn.compact
    def __call__(
        self, images: jax.Array, ids_keep: jax.Array | None = None, *, train: bool = False
    ) -> EncoderOutput:
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
        embedding = PatchEmbedding(
            self.width,
            p,
            kernel_init=nn.with_logical_partitioning(patch_init, (None, None, None, "embed")),
            bias_init=nn.with_logical_partitioning(zeros, ("embed",)),
            dtype=self.dtype,
            name="embedding",
        )
        patches = patchify(images.astype(self.dtype), p)
        posemb = jnp.asarray(sincos_2d_posemb(self.width, grid_h, grid_w), self.dtype)[None]
        posemb = jnp.broadcast_to(posemb, (b, grid_h * grid_w, self.width))
        if ids_keep is not None:  # only the visible patches are embedded
            ids = ids_keep.astype(jnp.int32)
            patches = jnp.take_along_axis(patches, ids[:, :, None], axis=1)
            posemb = jnp.take_along_axis(posemb, ids[:, :, None], axis=1)
        if self.stem_channels:
            kept, c = patches.shape[1], images.shape[-1]
            features = conv_stem(patches.reshape(b * kept, p, p, c), self.stem_channels, self.dtype)
            patches = features.reshape(b, kept, -1)
        x = embedding(patches) + posemb
        cls = self.param(
            "cls",
            nn.with_logical_partitioning(
                nn.initializers.normal(TOKEN_INIT_STD), (None, None, "embed")
            ),
            (1, 1, self.width),
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width))
        x = _constrain_tokens(jnp.concatenate([cls, x], axis=1))
        x = block_stack(
            x,
            self.depth,
            self.num_heads,
            self.mlp_dim,
            self.dtype,
            self.remat,
            self.scan_layers,
            drop_path=self.drop_path,
            deterministic=not train,
        )
        tokens = _constrain_tokens(layer_norm(self.dtype, "norm")(x))
        grid = (grid_h, grid_w) if ids_keep is None else None
        return EncoderOutput(tokens=tokens, prenorm=x, grid=grid)


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
    "attention_weights",
    "block_class",
    "block_stack",
    "cell_means",
    "cell_weights",
    "conv_stem",
    "count_params",
    "dot_product_attention",
    "drop_path",
    "encoder_from_variant",
    "parse_variant",
    "patchify",
    "remat_policy_name",
    "sincos_2d_posemb",
    "unpatchify",
)
