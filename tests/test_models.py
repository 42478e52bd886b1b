"""Model tests against NumPy formulas and hand computations (tiny shapes, CPU)."""

from __future__ import annotations

import math
from dataclasses import replace

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cmae_jax.evaluation.features import encoder_embed
from cmae_jax.models import vit
from cmae_jax.models.cmae import CMAE, build_model
from cmae_jax.models.decoder import Decoder
from cmae_jax.models.encoder_spec import EncoderSpec
from cmae_jax.models.heads import MLPHead
from cmae_jax.models.maect import MAECT


def _params(variables):
    return nn.meta.unbox(variables["params"])


def _np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def _ln(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _init(module, seed, *args, **kwargs):
    """module.init under jit: one compile instead of one per eager initializer op."""
    # rbg keys compile several times faster than threefry on CPU; same distributions.
    key = jax.random.key(seed, impl="rbg")
    return jax.jit(lambda key: module.init(key, *args, **kwargs))(key)


def _apply(module, variables, *args, **kwargs):
    """module.apply under jit (static non-array args closed over)."""
    return jax.jit(lambda v: module.apply(v, *args, **kwargs))(variables)


def _ids(batch, n, keep, seed=0):
    """Sorted visible / masked index arrays as the input pipeline produces them."""
    rng = np.random.default_rng(seed)
    keep_rows, mask_rows = [], []
    for _ in range(batch):
        perm = rng.permutation(n)
        keep_rows.append(np.sort(perm[:keep]))
        mask_rows.append(np.sort(perm[keep:]))
    return np.stack(keep_rows).astype(np.int32), np.stack(mask_rows).astype(np.int32)


# ----------------------------------------------------------------------------- variants


def test_parse_variant():
    assert vit.parse_variant("B/16") == dict(
        width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16
    )
    assert vit.parse_variant("H/14") == dict(
        width=1280, depth=32, num_heads=16, mlp_dim=5120, patch_size=14
    )
    assert vit.parse_variant("Ti/4")["width"] == 192
    assert vit.parse_variant("Mu/4") == dict(
        width=96, depth=4, num_heads=3, mlp_dim=384, patch_size=4
    )
    for bad in ("X/16", "B16", "B/0", "B/", "b/16"):
        with pytest.raises(ValueError, match="Ti/<patch>"):
            vit.parse_variant(bad)


# ----------------------------------------------------------------------------- sin-cos


def _mae_posemb_reference(width, grid_h, grid_w):
    """Written out from MAE's formula: first half of channels = column, second half = row."""
    quarter = width // 4
    omega = [1.0 / 10000 ** (d / quarter) for d in range(quarter)]
    rows = []
    for r in range(grid_h):
        for c in range(grid_w):
            rows.append(
                [math.sin(c * o) for o in omega]
                + [math.cos(c * o) for o in omega]
                + [math.sin(r * o) for o in omega]
                + [math.cos(r * o) for o in omega]
            )
    return np.array(rows)


def test_sincos_matches_mae_formula_non_square():
    emb = vit.sincos_2d_posemb(8, 3, 4)
    assert emb.shape == (12, 8) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, _mae_posemb_reference(8, 3, 4), atol=1e-6)
    # Patch at row 2, col 1 (index 2*4+1): omega = [1, 1/100] for width 8.
    expected = [
        math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01),
        math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02),
    ]  # fmt: skip
    np.testing.assert_allclose(emb[9], expected, atol=1e-6)
    # Orientation: first half depends only on the column, second half only on the row.
    grid = emb.reshape(3, 4, 8)
    np.testing.assert_allclose(grid[0, :, :4], grid[2, :, :4])
    np.testing.assert_allclose(grid[:, 0, 4:], grid[:, 3, 4:])
    np.testing.assert_allclose(emb[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
    np.testing.assert_allclose(
        vit.sincos_2d_posemb(32, 5, 5), _mae_posemb_reference(32, 5, 5), atol=1e-6
    )
    with pytest.raises(ValueError):
        vit.sincos_2d_posemb(6, 2, 2)


# ----------------------------------------------------------------------------- patchify


def test_patchify_known_image_and_round_trip():
    image = np.arange(4 * 4 * 2, dtype=np.float32).reshape(1, 4, 4, 2)  # value (r*4+c)*2+ch
    patches = np.asarray(vit.patchify(jnp.asarray(image), 2))
    assert patches.shape == (1, 4, 8)
    np.testing.assert_array_equal(patches[0, 0], [0, 1, 2, 3, 8, 9, 10, 11])
    np.testing.assert_array_equal(patches[0, 1], [4, 5, 6, 7, 12, 13, 14, 15])
    np.testing.assert_array_equal(patches[0, 2], [16, 17, 18, 19, 24, 25, 26, 27])
    np.testing.assert_array_equal(patches[0, 3], [20, 21, 22, 23, 28, 29, 30, 31])

    images = jax.random.normal(jax.random.key(0), (2, 12, 8, 3))
    p = vit.patchify(images, 4)
    assert p.shape == (2, 6, 48)
    np.testing.assert_array_equal(vit.unpatchify(p, 4, 3, 2, 3), images)
    # Patch (row 1, col 1) of a 3x2 grid is index 3 and covers rows 4..7, cols 4..7.
    np.testing.assert_array_equal(p[:, 3], images[:, 4:8, 4:8].reshape(2, 48))
    with pytest.raises(ValueError):
        vit.patchify(images, 5)


# ----------------------------------------------------------------------------- blocks


def test_block_matches_numpy_reference():
    width, heads, mlp = 8, 2, 16
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 5, width)))
    block = vit.Block(heads, mlp)
    variables = _init(block, 2, x)
    # Random non-trivial LN and bias values so that every parameter matters.
    params = jax.tree_util.tree_map(
        lambda a: np.asarray(a) + 0.1 * np.random.default_rng(a.size).normal(size=a.shape),
        _np(_params(variables)),
    )
    out = np.asarray(_apply(block, {"params": params}, x))

    def reference(x):
        hd = width // heads
        a = params["attn"]
        y = _ln(x, params["norm1"]["scale"], params["norm1"]["bias"])
        # torch layout: Linear(width, 3*width) output reshaped to (3, heads, head_dim).
        qkv = y @ a["qkv"]["kernel"].reshape(width, 3 * width) + a["qkv"]["bias"].reshape(-1)
        qkv = qkv.reshape(2, 5, 3, heads, hd).transpose(2, 0, 3, 1, 4)  # 3, B, h, L, hd
        q, k, v = qkv
        logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = (w @ v).transpose(0, 2, 1, 3).reshape(2, 5, width)
        x = x + o @ a["proj"]["kernel"].reshape(width, width) + a["proj"]["bias"]
        y = _ln(x, params["norm2"]["scale"], params["norm2"]["bias"])
        m = params["mlp"]
        h = y @ m["fc1"]["kernel"] + m["fc1"]["bias"]
        h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))  # exact GELU
        return x + h @ m["fc2"]["kernel"] + m["fc2"]["bias"]

    np.testing.assert_allclose(out, reference(x), rtol=1e-5, atol=1e-5)


def test_gelu_is_the_exact_gelu_to_float_rounding():
    """vit.gelu (the erf form, torch's) against math.erf per value and against flax's erfc
    form, values and gradients, over the body and both tails."""
    x = np.concatenate([np.linspace(-12, 12, 2001), [-40.0, -1e-3, 0.0, 1e-3, 40.0]])
    x = x.astype(np.float32)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(vit.gelu(jnp.asarray(x)), exact, rtol=1e-6, atol=1e-6)
    flax_gelu = lambda v: nn.gelu(v, approximate=False)
    np.testing.assert_allclose(vit.gelu(x), flax_gelu(x), rtol=1e-6, atol=1e-6)
    grad = jax.vmap(jax.grad(vit.gelu))(x)
    # d/dx x Phi(x) = Phi(x) + x phi(x)
    phi = np.exp(-0.5 * x.astype(np.float64) ** 2) / math.sqrt(2 * math.pi)
    expected_grad = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x]) + x * phi
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, jax.vmap(jax.grad(flax_gelu))(x), rtol=1e-5, atol=1e-6)


def test_patch_embedding_is_the_strided_conv_it_replaced():
    """PatchEmbedding on patchified images = a stride-p VALID conv with the same kernel, and
    its parameters are those an nn.Conv of that name drew (checkpoints and seeds unchanged)."""
    p, width = 4, 8
    images = np.asarray(jax.random.normal(jax.random.key(0), (3, 8, 12, 2)))
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", (0, 1, 2), 3)

    class Old(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(
                width,
                (p, p),
                strides=(p, p),
                padding="VALID",
                kernel_init=init,
                bias_init=nn.initializers.normal(1.0),
                name="embedding",
            )(x)

    class New(nn.Module):
        @nn.compact
        def __call__(self, x):
            return vit.PatchEmbedding(
                width, p, init, nn.initializers.normal(1.0), name="embedding"
            )(vit.patchify(x, p))

    key = jax.random.key(7)
    old_vars, new_vars = Old().init(key, images), New().init(key, images)
    jax.tree.map(np.testing.assert_array_equal, old_vars, new_vars)
    old_out = Old().apply(old_vars, images).reshape(3, -1, width)
    np.testing.assert_allclose(New().apply(new_vars, images), old_out, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- encoder


def test_encoder_depth0_matches_numpy_patch_embed_posemb_gather():
    enc = vit.Encoder(width=8, depth=0, num_heads=2, mlp_dim=16, patch_size=2)
    images = np.asarray(jax.random.normal(jax.random.key(3), (2, 4, 6, 3)))  # grid 2x3
    ids_keep, _ = _ids(2, 6, 2)
    variables = _init(enc, 4, images, ids_keep)
    params = _np(_params(variables))
    out = _apply(enc, variables, images, ids_keep)
    assert out.tokens.shape == out.prenorm.shape == (2, 3, 8)

    kernel = params["embedding"]["kernel"].reshape(2 * 2 * 3, 8)  # (p, p, C) rows
    embedded = np.asarray(vit.patchify(images, 2)) @ kernel + params["embedding"]["bias"]
    embedded = embedded + vit.sincos_2d_posemb(8, 2, 3)[None]  # pos-emb before the gather
    visible = np.take_along_axis(embedded, ids_keep[:, :, None], axis=1)
    cls = np.broadcast_to(params["cls"], (2, 1, 8))  # zero pos-emb on cls
    prenorm = np.concatenate([cls, visible], axis=1)
    np.testing.assert_allclose(out.prenorm, prenorm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        out.tokens,
        _ln(prenorm, params["norm"]["scale"], params["norm"]["bias"]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_encoder_all_ids_equals_none():
    enc = vit.Encoder(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4)
    images = jax.random.normal(jax.random.key(5), (2, 8, 12, 1))
    variables = _init(enc, 6, images)
    full = _apply(enc, variables, images)
    assert full.tokens.shape == (2, 1 + 6, 16)
    all_ids = jnp.tile(jnp.arange(6, dtype=jnp.int32)[None], (2, 1))
    same = _apply(enc, variables, images, all_ids)
    np.testing.assert_allclose(same.tokens, full.tokens, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(same.prenorm, full.prenorm, rtol=1e-6, atol=1e-6)
    part = _apply(enc, variables, images, all_ids[:, :2])
    assert part.tokens.shape == (2, 3, 16)


@pytest.mark.parametrize("height, width", [(16, 16), (12, 20)])
def test_pooled_grid_and_tokens_match_torch_adaptive_pooling(height, width):
    # 'grid' must be torch's adaptive_avg_pool2d to 2 x 2 of the patch-token map (an odd
    # side shares its middle row or column between two cells), flattened cell by cell;
    # 'tokens' the patch tokens in raster order.
    torch = pytest.importorskip("torch")
    enc = vit.Encoder(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4)
    images = jax.random.normal(jax.random.key(7), (3, height, width, 1))
    out = _apply(enc, _init(enc, 8, images), images)
    rows, cols = height // 4, width // 4
    assert out.grid == (rows, cols)
    pooled = out.pooled()
    patches = np.array(out.tokens[:, 1:])  # [B, rows * cols, 16], a writable copy for torch
    token_map = torch.from_numpy(patches.reshape(3, rows, cols, 16)).permute(0, 3, 1, 2)
    cells = torch.nn.functional.adaptive_avg_pool2d(token_map, (2, 2))  # [B, 16, 2, 2]
    expected = cells.permute(0, 2, 3, 1).reshape(3, 4 * 16).numpy()
    np.testing.assert_allclose(pooled["grid"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pooled["tokens"], patches.reshape(3, -1))
    assert set(pooled) == set(vit.POOLINGS)
    # Visible patches only: no grid to pool over.
    ids = jnp.tile(jnp.arange(2, dtype=jnp.int32)[None], (3, 1))
    with pytest.raises(ValueError, match="every patch"):
        _apply(enc, _init(enc, 8, images), images, ids).pooled()


def test_cell_weights_cover_every_patch():
    weights = vit.cell_weights(3, 5)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
    # Rows {0, 1} and {1, 2}; columns {0, 1, 2} and {2, 3, 4}: the middle ones in two cells.
    members = [set(np.flatnonzero(w)) for w in weights]
    assert members[0] == {0, 1, 2, 5, 6, 7} and members[3] == {7, 8, 9, 12, 13, 14}


def _conv3x3_same(x, kernel, bias):
    """Flax's 3x3 'SAME' convolution (cross-correlation) of one [h, w, c] image, by loops."""
    h, w, _ = x.shape
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    out = np.empty((h, w, kernel.shape[-1]))
    for r in range(h):
        for c in range(w):
            out[r, c] = np.einsum("ijk,ijko->o", padded[r : r + 3, c : c + 3], kernel) + bias
    return out


def test_conv_stem_encoder_matches_numpy_convs_on_each_visible_patch_alone():
    """Each visible patch, cut out and zero-padded alone, goes through 3x3 conv -> LN ->
    GELU twice, then the patch embedding: what no pixel of another patch can reach."""
    enc = vit.Encoder(width=8, depth=0, num_heads=2, mlp_dim=16, patch_size=3, stem_channels=4)
    images = np.asarray(jax.random.normal(jax.random.key(7), (2, 6, 9, 2)))  # grid 2x3
    ids_keep, _ = _ids(2, 6, 2, seed=1)
    variables = _init(enc, 8, images, ids_keep)
    params = _np(_params(variables))
    assert sorted(k for k in params if k.startswith(vit.STEM_PREFIX)) == [
        "stem_conv0", "stem_conv1", "stem_norm0", "stem_norm1"
    ]  # fmt: skip
    out = _apply(enc, variables, images, ids_keep)

    gelu = np.vectorize(lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))))
    patches = np.asarray(vit.patchify(images, 3)).reshape(2, 6, 3, 3, 2)
    posemb = vit.sincos_2d_posemb(8, 2, 3)
    prenorm = np.zeros((2, 3, 8))
    for b in range(2):
        prenorm[b, 0] = params["cls"][0, 0]
        for slot, n in enumerate(ids_keep[b]):
            y = patches[b, n]
            for i in range(vit.STEM_LAYERS):
                conv, norm = params[f"stem_conv{i}"], params[f"stem_norm{i}"]
                y = gelu(_ln(_conv3x3_same(y, conv["kernel"], conv["bias"]), **norm))
            kernel = params["embedding"]["kernel"]  # [3, 3, 4, 8]: one token per patch
            token = np.einsum("ijk,ijko->o", y, kernel) + params["embedding"]["bias"]
            prenorm[b, 1 + slot] = token + posemb[n]
    np.testing.assert_allclose(out.prenorm, prenorm, rtol=1e-4, atol=1e-5)
    # All patches (the target branch's call) give the same tokens where they are kept.
    full = _apply(enc, variables, images).prenorm
    kept = np.take_along_axis(np.asarray(full[:, 1:]), ids_keep[:, :, None], axis=1)
    np.testing.assert_allclose(out.prenorm[:, 1:], kept, rtol=1e-5, atol=1e-6)


def test_encoder_sows_float32_attention_in_bf16():
    enc = vit.Encoder(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4, dtype=jnp.bfloat16)
    images = jax.random.normal(jax.random.key(7), (2, 8, 8, 1))
    variables = _init(enc, 8, images)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(_params(variables)))
    out, state = _apply(enc, variables, images, mutable=["intermediates"])
    assert out.tokens.dtype == jnp.bfloat16
    (weights,) = state["intermediates"]["block_1"]["attn"]["attention_weights"]
    assert weights.shape == (2, 2, 5, 5) and weights.dtype == jnp.float32
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------- decoder


def test_decoder_unshuffle_depth0_matches_numpy():
    dec = Decoder(out_dim=5, width=8, depth=0, num_heads=2, mlp_dim=16)
    b, n, k = 2, 6, 2
    ids_keep, ids_mask = _ids(b, n, k, seed=1)
    latents = np.asarray(jax.random.normal(jax.random.key(9), (b, 1 + k, 12)))
    variables = _init(dec, 10, latents, ids_keep, ids_mask, (2, 3))
    params = _np(_params(variables))
    out = np.asarray(_apply(dec, variables, latents, ids_keep, ids_mask, (2, 3)))
    assert out.shape == (b, n, 5)

    embedded = latents @ params["embed"]["kernel"] + params["embed"]["bias"]
    tokens = np.zeros((b, n, 8))
    for i in range(b):
        for j in range(k):
            tokens[i, ids_keep[i, j]] = embedded[i, j + 1]  # latent j+1 -> position ids_keep[j]
        for j in range(n - k):
            tokens[i, ids_mask[i, j]] = params["mask_token"][0, 0]
    tokens = tokens + vit.sincos_2d_posemb(8, 2, 3)[None]
    y = _ln(tokens, params["norm"]["scale"], params["norm"]["bias"])
    expected = y @ params["pred"]["kernel"] + params["pred"]["bias"]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_decoder_depth2_shapes_and_cls_dropped():
    dec = Decoder(out_dim=16, width=8, depth=2, num_heads=2, mlp_dim=16)
    ids_keep, ids_mask = _ids(3, 4, 1)
    latents = jax.random.normal(jax.random.key(11), (3, 2, 12))
    variables = _init(dec, 12, latents, ids_keep, ids_mask, (2, 2))
    assert _apply(dec, variables, latents, ids_keep, ids_mask, (2, 2)).shape == (3, 4, 16)
    with pytest.raises(ValueError):
        _apply(dec, variables, latents, ids_keep, ids_mask[:, :2], (2, 2))


# ----------------------------------------------------------------------------- init


def test_init_statistics():
    width, p, c = 64, 4, 3
    enc = vit.Encoder(width=width, depth=1, num_heads=4, mlp_dim=4 * width, patch_size=p)
    variables = _init(enc, 13, jnp.zeros((1, 8, 8, c)))
    params = _np(_params(variables))

    def check_xavier(kernel, fan_in, fan_out):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(kernel).max() <= bound
        assert np.abs(kernel).max() > 0.97 * bound
        assert abs(kernel.std() - bound / math.sqrt(3)) < 0.05 * bound

    check_xavier(params["embedding"]["kernel"], p * p * c, width)
    blk = params["block_0"]
    check_xavier(blk["attn"]["qkv"]["kernel"], width, 3 * width)
    check_xavier(blk["attn"]["proj"]["kernel"], width, width)
    check_xavier(blk["mlp"]["fc1"]["kernel"], width, 4 * width)
    check_xavier(blk["mlp"]["fc2"]["kernel"], 4 * width, width)
    biases = [
        params["embedding"]["bias"],
        blk["attn"]["qkv"]["bias"],
        blk["attn"]["proj"]["bias"],
        blk["mlp"]["fc1"]["bias"],
        blk["mlp"]["fc2"]["bias"],
    ]
    for name in ("norm1", "norm2"):
        biases.append(blk[name]["bias"])
        np.testing.assert_array_equal(blk[name]["scale"], 1.0)
    biases.append(params["norm"]["bias"])
    np.testing.assert_array_equal(params["norm"]["scale"], 1.0)
    for bias in biases:
        np.testing.assert_array_equal(bias, 0.0)

    big = vit.Encoder(width=1024, depth=0, num_heads=4, mlp_dim=8, patch_size=p)
    cls = np.asarray(_params(_init(big, 14, jnp.zeros((1, 4, 4, 1))))["cls"])
    assert abs(cls.std() - 0.02) < 0.002 and abs(cls.mean()) < 0.003
    dec = Decoder(out_dim=4, width=1024, depth=0, num_heads=4, mlp_dim=8)
    mask_token = np.asarray(
        _params(
            _init(
                dec,
                15,
                jnp.zeros((1, 2, 8)),
                jnp.zeros((1, 1), jnp.int32),
                jnp.ones((1, 1), jnp.int32),
                (1, 2),
            )
        )["mask_token"]
    )
    assert abs(mask_token.std() - 0.02) < 0.002

    # Every parameter carries logical axis names, one per dimension.
    boxed = jax.tree_util.tree_leaves(
        variables["params"], is_leaf=lambda a: isinstance(a, nn.Partitioned)
    )
    assert all(isinstance(a, nn.LogicallyPartitioned) for a in boxed)
    assert all(len(a.names) == a.value.ndim for a in boxed)


# ----------------------------------------------------------------------------- counts


def _expected_encoder_params(d, depth, p, c=3):
    per_block = 12 * d * d + 13 * d
    return p * p * c * d + d + d + depth * per_block + 2 * d


@pytest.mark.parametrize(
    ("variant", "image", "paper_m"),
    [("B/16", 224, 86), ("L/16", 224, 304), ("H/14", 224, 632)],
)
def test_encoder_param_counts(variant, image, paper_m):
    sizes = vit.parse_variant(variant)
    enc = vit.encoder_from_variant(variant)
    shapes = jax.eval_shape(
        enc.init, jax.random.key(0), jax.ShapeDtypeStruct((1, image, image, 3), jnp.float32)
    )
    count = vit.count_params(shapes["params"])
    assert count == _expected_encoder_params(sizes["width"], sizes["depth"], sizes["patch_size"])
    assert abs(count / (paper_m * 1e6) - 1) < 0.01, count


# ----------------------------------------------------------------------------- heads


def test_mlp_head_batchnorm_train_and_eval():
    head = MLPHead(hidden_dim=6, out_dim=3)
    x = np.asarray(jax.random.normal(jax.random.key(16), (8, 4))) * 3 + 1
    variables = _init(head, 17, x, train=True)
    params = _np(_params(variables))
    assert "bias" not in params["dense_1"]  # CMAE: last Linear without bias
    np.testing.assert_array_equal(variables["batch_stats"]["bn_0"]["var"], 1.0)

    out, updates = _apply(head, variables, x, train=True, mutable=["batch_stats"])
    h = x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"]
    mean, var = h.mean(0), h.var(0)  # biased batch variance
    stats = updates["batch_stats"]["bn_0"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)
    bn = params["bn_0"]
    hidden = np.maximum((h - mean) / np.sqrt(var + 1e-5) * bn["scale"] + bn["bias"], 0)
    np.testing.assert_allclose(out, hidden @ params["dense_1"]["kernel"], rtol=1e-4, atol=1e-5)

    # Eval uses the running statistics and leaves them alone.
    new_vars = {"params": variables["params"], **updates}
    out_eval = _apply(head, new_vars, x, train=False)
    hidden = np.maximum((h - stats["mean"]) / np.sqrt(stats["var"] + 1e-5), 0)
    np.testing.assert_allclose(out_eval, hidden @ params["dense_1"]["kernel"], rtol=1e-4, atol=1e-5)


def test_nnclr_heads_expressible():
    projector = MLPHead(32, 8, num_layers=3, hidden_bias=False, last_bias=True, last_bn=True)
    x = jnp.ones((4, 16))
    variables = jax.eval_shape(lambda: projector.init(jax.random.key(0), x, train=True))
    params = nn.meta.unbox(variables["params"])
    assert set(params) == {"dense_0", "bn_0", "dense_1", "bn_1", "dense_2", "bn_2"}
    assert "bias" not in params["dense_0"] and "bias" not in params["dense_1"]
    assert params["dense_2"]["bias"].shape == (8,)
    assert set(variables["batch_stats"]) == {"bn_0", "bn_1", "bn_2"}
    predictor = MLPHead(64, 8, hidden_bias=False, last_bias=True)
    out = jax.eval_shape(
        lambda: predictor.init_with_output(jax.random.key(0), jnp.ones((4, 8)), True)
    )
    assert out[0].shape == (4, 8)


def test_nnclr_heads_start_as_torch_linear_default():
    # torch.nn.Linear's default (kaiming_uniform, a = sqrt(5)): U(-b, b), b = 1 / sqrt(fan_in),
    # variance b^2 / 3, for the weight and the bias alike.
    model = MAECT(
        EncoderSpec(width=64, depth=1, num_heads=2, mlp_dim=32, patch_size=4),
        projector_hidden=256,
        predictor_hidden=512,
        projection_dim=128,
    )
    variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), False))()
    params = nn.meta.unbox(variables["params"])
    dense = {
        f"{head}/{name}": layer
        for head in ("projector", "predictor")
        for name, layer in params[head].items()
        if name.startswith("dense_")
    }
    assert all(set(layer) == {"kernel"} for layer in dense.values())  # no bias anywhere
    kernels = {name: np.asarray(layer["kernel"]) for name, layer in dense.items()}
    assert sorted(kernels) == [
        "predictor/dense_0", "predictor/dense_1",
        "projector/dense_0", "projector/dense_1", "projector/dense_2",
    ]  # fmt: skip
    for name, kernel in kernels.items():
        bound = 1 / math.sqrt(kernel.shape[0])
        assert np.abs(kernel).max() <= bound, name
        assert np.abs(kernel).max() > 0.99 * bound, name
        assert abs(kernel.var() / (bound**2 / 3) - 1) < 0.05, name
        assert abs(kernel.mean()) < 0.05 * bound, name
    # A head with biases draws them from the same range; the default stays xavier / zero.
    head = MLPHead(64, 32, last_bias=True, torch_init=True)
    biased = nn.meta.unbox(head.init(jax.random.key(1), jnp.zeros((4, 400)), False)["params"])
    bias = np.asarray(biased["dense_0"]["bias"])
    assert np.abs(bias).max() <= 1 / math.sqrt(400) and np.abs(bias).max() > 0.5 / math.sqrt(400)
    xavier = nn.meta.unbox(MLPHead(64, 32).init(jax.random.key(1), jnp.zeros((4, 400)), False))
    kernel, zero = (np.asarray(xavier["params"]["dense_0"][k]) for k in ("kernel", "bias"))
    assert np.abs(kernel).max() <= math.sqrt(6 / (400 + 64)) and not zero.any()


# ----------------------------------------------------------------------------- CMAE


TINY_ENCODER = EncoderSpec(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4, channels=1)
TINY = dict(
    encoder_spec=TINY_ENCODER,
    pixel_decoder_width=8,
    pixel_decoder_depth=1,
    pixel_decoder_heads=2,
    feature_decoder_depth=1,
    projector_hidden=12,
    projection_dim=6,
)


def _cmae_inputs(b=4, size=8, keep=1):
    images = jax.random.normal(jax.random.key(18), (b, size, size, 1))
    ids_keep, ids_mask = _ids(b, (size // 4) ** 2, keep)
    return images, ids_keep, ids_mask


@pytest.fixture(scope="module")
def cmae_variables():
    """One (compile-heavy) init shared by the CMAE tests; params do not depend on dtype."""
    images, ids_keep, ids_mask = _cmae_inputs()
    return _init(CMAE(**TINY), 19, images, ids_keep, ids_mask, train=True)


def test_cmae_forward_target_and_features(cmae_variables):
    model = CMAE(**TINY)
    images, ids_keep, ids_mask = _cmae_inputs()
    variables = cmae_variables
    assert set(variables["params"]) == {
        "encoder", "pixel_decoder", "feature_decoder", "projector", "predictor"
    }  # fmt: skip
    assert variables["params"]["feature_decoder"]["pred"]["kernel"].value.shape == (8, 16)
    assert set(variables["batch_stats"]) == {"projector", "predictor"}
    out, _ = _apply(
        model, variables, images, ids_keep, ids_mask, train=True, mutable=["batch_stats"]
    )
    assert out["pixel_pred"].shape == (4, 4, 16) and out["pixel_pred"].dtype == jnp.float32
    assert out["online_pred"].shape == (4, 6)

    # Pixel decoder = Decoder on the encoder's normed tokens of the visible patches.
    params = variables["params"]
    enc = vit.Encoder(16, 2, 2, 32, 4)
    latents = _apply(enc, {"params": params["encoder"]}, images, ids_keep).tokens
    pixel_decoder = Decoder(out_dim=16, width=8, depth=1, num_heads=2, mlp_dim=32)
    pixels = _apply(
        pixel_decoder, {"params": params["pixel_decoder"]}, latents, ids_keep, ids_mask, (2, 2)
    )
    np.testing.assert_allclose(out["pixel_pred"], pixels, rtol=1e-5, atol=1e-6)

    target_vars = {
        "params": {k: params[k] for k in ("encoder", "projector")},
        "batch_stats": {"projector": variables["batch_stats"]["projector"]},
    }
    proj, updates = _apply(
        model,
        target_vars,
        images,
        train=True,
        method=CMAE.target_projection,
        mutable=["batch_stats"],
    )
    assert proj.shape == (4, 6)
    assert set(updates["batch_stats"]) == {"projector"}
    # Matches the hand-composed pipeline: pre-norm tokens, mean over patches, projector.
    prenorm = _apply(enc, {"params": params["encoder"]}, images).prenorm
    head_vars = {
        "params": params["projector"],
        "batch_stats": variables["batch_stats"]["projector"],
    }
    expected, _ = _apply(
        MLPHead(12, 6), head_vars, prenorm[:, 1:].mean(1), train=True, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(proj, expected, rtol=1e-5, atol=1e-6)

    # What every trainer's periodic k-NN reads from the whole parameter tree.
    feats = jax.jit(encoder_embed(model.encoder_spec))(params, images)
    tokens = _apply(enc, {"params": params["encoder"]}, images).tokens
    np.testing.assert_allclose(feats["cls"], tokens[:, 0], rtol=1e-6)
    np.testing.assert_allclose(feats["mean"], tokens[:, 1:].mean(1), rtol=1e-5, atol=1e-6)
    # Every feature an evaluation may read (config.eval.feature), also the k-NN inside a
    # pretraining: before 2026-12-05 'cls+mean' was missing here and that k-NN died on it.
    assert set(feats) == set(vit.POOLINGS)
    np.testing.assert_array_equal(
        feats["cls+mean"], np.concatenate([feats["cls"], feats["mean"]], axis=-1)
    )


@pytest.mark.parametrize("pooling", ["grid", "cells"])
def test_cmae_cell_pooling_feeds_the_projector_cell_means(pooling):
    # contrastive_pooling 'grid' / 'cells': both branches pool their patch tokens into the
    # 2 x 2 cells' means (here a 4 x 4 grid: each cell four patches); 'grid' concatenates
    # them (the projector reads 4 x 16 numbers per image), 'cells' makes each cell a row of
    # its own (4 rows of 16 per image, image-major). Checked against NumPy means.
    model = CMAE(**TINY, contrastive_pooling=pooling)
    images, ids_keep, ids_mask = _cmae_inputs(size=16, keep=4)
    variables = _init(model, 20, images, ids_keep, ids_mask, train=False)
    params = nn.meta.unbox(variables["params"])
    width = 4 * 16 if pooling == "grid" else 16
    assert params["projector"]["dense_0"]["kernel"].shape == (width, 12)
    assert model.contrastive_width() == width and CMAE(**TINY).contrastive_width() == 16
    assert model.contrastive_rows() == (4 if pooling == "cells" else 1)

    def numpy_cells(tokens):  # [B, 16, D] raster order -> [B, 4 * D] or [B * 4, D]
        grid = np.asarray(tokens).reshape(len(tokens), 2, 2, 2, 2, -1)  # b, R, r, C, c, d
        cells = grid.mean(axis=(2, 4))  # [B, 2, 2, D]
        return cells.reshape(len(tokens), -1) if pooling == "grid" else cells.reshape(-1, 16)

    enc = vit.Encoder(16, 2, 2, 32, 4)
    prenorm = _apply(enc, {"params": params["encoder"]}, images).prenorm
    head = {"params": params["projector"], "batch_stats": variables["batch_stats"]["projector"]}
    expected = _apply(MLPHead(12, 6), head, numpy_cells(prenorm[:, 1:]), False)
    target = _apply(model, variables, images, False, method=CMAE.target_projection)
    assert target.shape == (4 * model.contrastive_rows(), 6)
    np.testing.assert_allclose(target, expected, rtol=1e-5, atol=1e-6)

    latents = _apply(enc, {"params": params["encoder"]}, images, ids_keep).tokens
    decoder = Decoder(out_dim=16, width=8, depth=1, num_heads=2, mlp_dim=32)
    feats = _apply(
        decoder, {"params": params["feature_decoder"]}, latents, ids_keep, ids_mask, (4, 4)
    )
    projection = _apply(MLPHead(12, 6), head, numpy_cells(feats), False)
    stats = variables["batch_stats"]["predictor"]
    predictor = {"params": params["predictor"], "batch_stats": stats}
    expected = _apply(MLPHead(12, 6, in_axis="proj"), predictor, projection, False)
    out = _apply(model, variables, images, ids_keep, ids_mask, train=False)
    np.testing.assert_allclose(out["online_pred"], expected, rtol=1e-5, atol=1e-6)


def test_cmae_cls_pooling_contrasts_the_cls_positions():
    # contrastive_pooling 'cls': the target branch projects the target encoder's pre-norm cls
    # token, the online branch the feature decoder's output at the cls position; the pixel
    # decoder still returns the N patches alone.
    model = CMAE(**TINY, contrastive_pooling="cls")
    images, ids_keep, ids_mask = _cmae_inputs(size=16, keep=4)
    variables = _init(model, 21, images, ids_keep, ids_mask, train=False)
    params = nn.meta.unbox(variables["params"])
    assert model.contrastive_width() == 16 and model.contrastive_rows() == 1

    enc = vit.Encoder(16, 2, 2, 32, 4)
    prenorm = _apply(enc, {"params": params["encoder"]}, images).prenorm
    head = {"params": params["projector"], "batch_stats": variables["batch_stats"]["projector"]}
    expected = _apply(MLPHead(12, 6), head, prenorm[:, 0], False)
    target = _apply(model, variables, images, False, method=CMAE.target_projection)
    np.testing.assert_allclose(target, expected, rtol=1e-5, atol=1e-6)

    latents = _apply(enc, {"params": params["encoder"]}, images, ids_keep).tokens
    decoder = Decoder(out_dim=16, width=8, depth=1, num_heads=2, mlp_dim=32, keep_cls=True)
    tokens = _apply(
        decoder, {"params": params["feature_decoder"]}, latents, ids_keep, ids_mask, (4, 4)
    )
    assert tokens.shape == (4, 1 + 16, 16)
    projection = _apply(MLPHead(12, 6), head, tokens[:, 0], False)
    stats = variables["batch_stats"]["predictor"]
    predictor = {"params": params["predictor"], "batch_stats": stats}
    expected = _apply(MLPHead(12, 6, in_axis="proj"), predictor, projection, False)
    out = _apply(model, variables, images, ids_keep, ids_mask, train=False)
    np.testing.assert_allclose(out["online_pred"], expected, rtol=1e-5, atol=1e-6)
    assert out["pixel_pred"].shape == (4, 16, 4 * 4 * 1)


def test_cmae_bf16_and_plain_mae(cmae_variables):
    images, ids_keep, ids_mask = _cmae_inputs()
    model = CMAE(**{**TINY, "encoder_spec": replace(TINY_ENCODER, dtype=jnp.bfloat16)})
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), images, ids_keep, ids_mask, train=True)
    )
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(shapes))
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)  # params stay float32
    out, _ = _apply(
        model, cmae_variables, images, ids_keep, ids_mask, train=True, mutable=["batch_stats"]
    )
    assert out["pixel_pred"].dtype == jnp.float32 and out["online_pred"].dtype == jnp.float32
    ref, _ = _apply(
        CMAE(**TINY),
        cmae_variables,
        images,
        ids_keep,
        ids_mask,
        train=True,
        mutable=["batch_stats"],
    )
    # bf16 compute stays close to float32 (about 3 significant digits).
    np.testing.assert_allclose(out["pixel_pred"], ref["pixel_pred"], rtol=0.1, atol=0.05)

    mae = CMAE(**{**TINY, "contrastive": False})
    shapes = jax.eval_shape(
        lambda: mae.init(jax.random.key(0), images, ids_keep, ids_mask, train=True)
    )
    assert set(shapes["params"]) == {"encoder", "pixel_decoder"}
    assert "batch_stats" not in shapes
    mae_vars = {"params": {k: cmae_variables["params"][k] for k in ("encoder", "pixel_decoder")}}
    out = _apply(mae, mae_vars, images, ids_keep, ids_mask, train=True)
    assert set(out) == {"pixel_pred"}
    np.testing.assert_allclose(out["pixel_pred"], ref["pixel_pred"], rtol=1e-6)


def test_encoder_spec_from_config_and_its_checks():
    model_cfg = ml_collections.ConfigDict(dict(variant="S/8", depth=None, dtype="float32"))
    input_cfg = ml_collections.ConfigDict(dict(channels=3, patch_size=8, image_size=32))
    spec = EncoderSpec.from_config(model_cfg, input_cfg)
    assert (spec.width, spec.depth, spec.num_heads, spec.mlp_dim) == (384, 12, 6, 1536)
    assert (spec.patch_size, spec.channels, spec.image_size, spec.remat) == (8, 3, 32, "none")
    model_cfg.num_heads = 5
    with pytest.raises(ValueError, match="num_heads=5 does not divide the width 384"):
        EncoderSpec.from_config(model_cfg, input_cfg)
    model_cfg.num_heads, model_cfg.width = 2, 66
    with pytest.raises(ValueError, match="width=66.*multiple of 4"):
        EncoderSpec.from_config(model_cfg, input_cfg)
    with pytest.raises(ValueError, match="Encoder mlp_dim=0: .* must be positive"):
        EncoderSpec(width=8, depth=1, num_heads=2, mlp_dim=0, patch_size=4)
    model_cfg.width, model_cfg.stem_channels = None, 16
    assert EncoderSpec.from_config(model_cfg, input_cfg).encoder().stem_channels == 16
    model_cfg.stem_channels = -1
    with pytest.raises(ValueError, match="stem_channels=-1: 0 for the linear patch"):
        EncoderSpec.from_config(model_cfg, input_cfg)
    # The spec builds the encoder the models hold: same sizes, its own overrides on top.
    encoder = TINY_ENCODER.encoder(drop_path=0.2)
    assert (encoder.width, encoder.depth, encoder.num_heads, encoder.mlp_dim) == (16, 2, 2, 32)
    assert (encoder.patch_size, encoder.drop_path, encoder.dtype) == (4, 0.2, jnp.float32)


def test_build_model_from_config():
    model_cfg = ml_collections.ConfigDict(
        dict(
            variant="Mu/4",
            pixel_decoder_width=64,
            pixel_decoder_depth=2,
            pixel_decoder_heads=4,
            feature_decoder_depth=1,
            projector_hidden=128,
            projection_dim=32,
            dtype="bfloat16",
            width=None,
            depth=3,
            num_heads=None,
        )
    )
    input_cfg = ml_collections.ConfigDict(dict(channels=1, patch_size=4, image_size=28))
    model = build_model(model_cfg, input_cfg, contrastive=True)
    spec = model.encoder_spec
    assert (spec.width, spec.depth, spec.num_heads, spec.mlp_dim) == (96, 3, 3, 384)
    assert spec.dtype == jnp.bfloat16 and spec.channels == 1 and model.contrastive
    assert not build_model(model_cfg, input_cfg, contrastive=False).contrastive
    model_cfg.width, model_cfg.num_heads = 64, 4  # heads must divide the width
    assert build_model(model_cfg, input_cfg).encoder_spec.mlp_dim == 256
    input_cfg.patch_size = 7
    with pytest.raises(ValueError, match="patch_size"):
        build_model(model_cfg, input_cfg)
    input_cfg.patch_size = 4
    input_cfg.image_size = 30
    with pytest.raises(ValueError, match="image_size"):
        build_model(model_cfg, input_cfg)
    input_cfg.image_size = 28
    model_cfg.dtype = "float16"
    with pytest.raises(ValueError, match="dtype"):
        build_model(model_cfg, input_cfg)
    model_cfg.dtype, model_cfg.contrastive_pooling = "float32", "max"
    with pytest.raises(ValueError, match="contrastive_pooling='max' is not one of"):
        build_model(model_cfg, input_cfg)
    model_cfg.contrastive_pooling = "grid"
    assert build_model(model_cfg, input_cfg).contrastive_pooling == "grid"
