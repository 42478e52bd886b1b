"""Fine-tuning parts (drop path, mixup / cutmix, RandAugment, erasing) and the pictures."""

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from cmae_jax import visualize
from cmae_jax.evaluation import augment, features, finetune
from cmae_jax.models import vit


def tiny_encoder(**overrides):
    return vit.Encoder(width=16, depth=3, num_heads=2, mlp_dim=32, patch_size=4, **overrides)


def test_drop_path_changes_only_training_outputs():
    images = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
    plain, dropping = tiny_encoder(), tiny_encoder(drop_path=0.5)
    params = plain.init(jax.random.key(1), images)
    reference = plain.apply(params, images).tokens
    # Same parameters, the same outputs at evaluation; examples differ while training.
    np.testing.assert_array_equal(dropping.apply(params, images).tokens, reference)
    trained = dropping.apply(params, images, train=True, rngs={"dropout": jax.random.key(2)})
    assert np.abs(np.asarray(trained.tokens - reference)).max() > 1e-3
    # Without a rate, training needs no rng and changes nothing.
    np.testing.assert_array_equal(plain.apply(params, images, train=True).tokens, reference)
    # Per example: dropped with probability `rate`, kept ones scaled by 1 / (1 - rate).
    x = jnp.ones((20000, 2, 3))
    y = np.asarray(vit.drop_path(x, 0.3, jax.random.key(4)))
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.7], rtol=1e-6)
    assert abs((y[:, 0, 0] == 0).mean() - 0.3) < 0.02 and np.all(y == y[:, :1, :1])
    scanned = vit.Encoder(16, 2, 2, 32, 4, drop_path=0.5, scan_layers=True)
    scanned_params = scanned.init(jax.random.key(1), images)
    out = scanned.apply(scanned_params, images, train=True, rngs={"dropout": jax.random.key(2)})
    assert np.isfinite(np.asarray(out.tokens)).all()


def test_mixup_and_cutmix_keep_soft_targets_consistent():
    images = jnp.stack([jnp.full((8, 8, 1), float(i)) for i in range(4)])
    targets = finetune.smooth_targets(jnp.arange(4), 4, 0.1)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[0], [0.925, 0.025, 0.025, 0.025], rtol=1e-6)
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        mixed, soft = finetune.mix_batch(
            jax.random.key(3), images, targets, mixup_alpha=mixup, cutmix_alpha=cutmix
        )
        np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-5)
        # Image 0 is mixed with image 3: its mean pixel is 3 x (1 - lambda), and its target
        # gives class 3 that share (plus smoothing).
        share = float(mixed[0].mean()) / 3.0
        np.testing.assert_allclose(soft[0, 3], 0.025 + 0.9 * share, rtol=1e-4, atol=1e-6)
        if cutmix:
            assert set(np.unique(np.asarray(mixed[0]))) <= {0.0, 3.0}


def test_rand_augment_and_erasing_are_seeded_and_keep_shapes():
    image = tf.random.stateless_uniform([16, 16, 3], seed=[0, 1])
    seed = tf.constant([0, 5], tf.int64)
    a = augment.rand_augment(image, seed, magnitude=9.0)
    np.testing.assert_array_equal(a.numpy(), augment.rand_augment(image, seed).numpy())
    assert a.shape == image.shape and 0.0 <= float(tf.reduce_min(a)) <= float(tf.reduce_max(a)) <= 1
    for op in range(len(augment._OPS)):
        out = augment._apply_op(image, tf.constant(op), tf.constant(9.0), tf.constant(1.0))
        assert out.shape == image.shape and np.isfinite(out.numpy()).all(), augment._OPS[op]
    erased = augment.random_erasing(image, seed, prob=1.0).numpy()
    changed = np.any(erased != image.numpy(), axis=-1)
    area = changed.sum() / changed.size
    assert 0.02 * 0.5 <= area <= 1 / 3 + 0.1
    np.testing.assert_array_equal(augment.random_erasing(image, seed, prob=0.0), image)


def test_attention_maps_and_pictures():
    model = features.FeatureEncoder(tiny_encoder())
    images = np.asarray(jax.random.normal(jax.random.key(0), (3, 8, 8, 1)))
    params = model.init(jax.random.key(1), images)["params"]
    maps = visualize.attention_maps(model, params, images)
    assert maps.shape == (3, 2, 2, 2)
    assert np.all(maps >= 0) and np.all(maps.sum(axis=(2, 3)) < 1.0)
    # Sowing the weights leaves the features as they were, up to float summation order
    # (the sown path spells the attention out; the other runs jax.nn.dot_product_attention).
    np.testing.assert_allclose(
        model.apply({"params": params}, images)["cls"],
        model.apply({"params": params}, images, mutable=["intermediates"])[0]["cls"],
        rtol=1e-5,
        atol=1e-6,
    )
    grid = visualize.attention_grid(images, maps, mean=(0.5,), std=(0.25,), upscale=2)
    assert grid.shape == (3 * 8 * 2, 4 * 8 * 2, 3) and grid.dtype == np.uint8
    rng = np.random.default_rng(0)
    plot = visualize.embedding_plot(rng.normal(size=(200, 5)), rng.integers(0, 3, 200))
    assert plot.dtype == np.uint8 and plot.shape == (600, 600, 3) and plot.std() > 0
    points = visualize.pca_2d(np.outer(np.arange(10.0), [1.0, 2.0, 0.0]))
    np.testing.assert_allclose(points[:, 1], 0.0, atol=1e-9)
