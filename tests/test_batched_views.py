"""The batched views (cmae_jax.data.batched_views) against the per-example views.

Both paths draw with the same functions: drawn for one example (num=1) from its seed, the
batched draws are that example's per-example draws, and then the batched image ops must
give its per-example views up to float rounding. Drawn for a whole batch from one seed,
they must have the per-example draws' distribution. The resize weights are checked
against tf.image.resize itself, up- and downsampling.
"""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from test_data import make_config, synthetic_source, take

from cmae_jax.data import batched_views, example_views, pipeline, sources, views


def seeds(n):
    return [tf.constant([11, i], tf.int64) for i in range(n)]


def images(n, height, width, channels, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, height, width, channels), dtype=np.uint8)


def per_example_and_batched(view_fn, image_batch, seed_list):
    """Columns of every example by the per-example path, and by the batched one."""
    per_example, draws = [], []
    for image, seed in zip(image_batch, seed_list, strict=True):
        image = tf.constant(image)
        as_read = image
        if view_fn.crop_box is not None:  # what the source cuts while decoding
            as_read = views.crop_image(image, view_fn.crop_box(seed, *image.shape[:2]))
        per_example.append(view_fn.columns(as_read, seed))
        draws.append(view_fn.batched.draws(seed, 1, tuple(image.shape)))
    stacked = {k: tf.concat([d[k] for d in draws], 0) for k in draws[0]}
    batched = view_fn.batched.columns({**stacked, "image": tf.constant(image_batch)})
    expected = {k: np.stack([c[k].numpy() for c in per_example]) for k in per_example[0]}
    return expected, {k: v.numpy() for k, v in batched.items()}, stacked


@pytest.mark.parametrize("out_size", [9, 16, 64])
def test_resize_weights_match_tf_resize(out_size):
    rng = np.random.default_rng(out_size)
    image = rng.random((40, 50, 2), dtype=np.float32)
    boxes = [(0, 0, 40, 50), (3, 7, 12, 30), (20, 1, 20, 9), (39, 49, 1, 1)]
    for y, x, h, w in boxes:
        expected = views._resize(tf.constant(image[y : y + h, x : x + w]), (out_size, out_size))
        rows = batched_views.resize_weights(tf.constant([y]), tf.constant([h]), out_size, 40)
        cols = batched_views.resize_weights(tf.constant([x]), tf.constant([w]), out_size, 50)
        got = batched_views.resample(tf.constant(image[None]), rows, cols)[0]
        np.testing.assert_allclose(got, expected, atol=2e-6, err_msg=f"box {(y, x, h, w)}")
        # Each output pixel's weights sum to 1 and lie inside the box.
        np.testing.assert_allclose(tf.reduce_sum(rows, -1), 1.0, atol=1e-6)
        outside = np.ones(40, bool)
        outside[y : y + h] = False
        assert not np.any(rows.numpy()[0][:, outside])


def colour_config(**overrides):
    """A CMAE config on RGB images with every target op switched on, erasing included."""
    config = make_config(channels=3, image_size=16, shift=5, mask_type="random", mask_ratio=0.75)
    config.input.color_jitter.prob = 0.9
    config.input.grayscale_prob = 0.3
    config.input.blur_prob = 0.5
    config.input.erase_prob = 0.5
    config.input.erase_scale = (0.02, 0.33)
    config.input.erase_ratio = (0.3, 3.3)
    config.input.update(overrides)
    return config


@pytest.mark.parametrize(
    "name,config,shape",
    [
        ("CMAE, RGB, every op", colour_config(), (23, 31, 3)),
        ("CMAE, grey", make_config(channels=1, image_size=28, patch_size=7), (28, 28, 1)),
        ("CMAE, RGB, every op, padded master", colour_config(master_mode="pad"), (23, 31, 3)),
        (
            "MAE, grey",
            make_config(
                channels=1,
                image_size=28,
                patch_size=7,
                target_view=False,
                mask_type="random",
                mask_ratio=0.75,
            ),
            (28, 28, 1),
        ),
    ],
)
def test_masked_views_batched_equal_per_example(name, config, shape):
    view_fn = example_views.masked_views(config)
    expected, got, draws = per_example_and_batched(view_fn, images(24, *shape), seeds(24))
    assert set(got) == set(expected), name
    for key in ("ids_keep", "ids_mask"):
        np.testing.assert_array_equal(got[key], expected[key])
    for key in [k for k in expected if k not in ("ids_keep", "ids_mask")]:
        np.testing.assert_allclose(got[key], expected[key], atol=2e-5, err_msg=f"{name}: {key}")
    if "target" in expected:
        # The draws exercise both sides of every decision the config turns on.
        for decision in ("flip", "target_jitter", "target_blur"):
            assert 0 < np.mean(draws[decision]) < 1, decision
        if shape[-1] == 3:
            assert 0 < np.mean(draws["target_grayscale"]) < 1
            assert 0 < np.mean(draws["target_erase"]) < 1
            orders = draws["target_jitter_order"].numpy()
            assert len({tuple(o) for o in orders}) > 5  # the op order varies per example


@pytest.mark.parametrize("channels,aug", [(1, False), (3, True)])
def test_two_crop_views_batched_equal_per_example(channels, aug):
    config = make_config(channels=channels)
    config.input.views = "two_crops_aug" if aug else "two_crops"
    config.input.view_augment = ml_collections.ConfigDict(
        dict(
            color_jitter=dict(prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1),
            grayscale_prob=0.2,
            blur_prob=(1.0, 0.1),
            blur_sigma=(0.1, 2.0),
            solarize_prob=(0.0, 0.5),
        )
    )
    view_fn = example_views.two_crop_views(config)
    expected, got, draws = per_example_and_batched(view_fn, images(24, 20, 26, channels), seeds(24))
    assert set(got) == set(expected) == {"view1", "view2"}
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=2e-5, err_msg=key)
    if aug:
        assert 0 < np.mean(draws["solarize1"]) < 1


def test_pipeline_batches_views_only_for_one_shape_in_memory():
    config = make_config(channels=1)
    view_fn = example_views.masked_views(config)
    assert pipeline.batches_views(config.input, synthetic_source(), view_fn)
    config.input.batched_views = False
    assert not pipeline.batches_views(config.input, synthetic_source(), view_fn)
    config.input.batched_views = True
    generated = sources.SyntheticSource(num_examples=64, height=16, width=16, channels=1)
    assert not pipeline.batches_views(config.input, generated, view_fn)
    evaluation = example_views.from_view_fn(lambda image, seed: {"image": image})
    assert not pipeline.batches_views(config.input, synthetic_source(), evaluation)


@pytest.mark.parametrize("image_size, crop_fraction", [(16, 1.0), (24, 0.875), (12, 1.0)])
def test_eval_batches_are_the_per_example_eval_views(image_size, crop_fraction):
    """The evaluation's batches of an in-memory source, made a batch at a time, against
    the per-example path (resized up and down, centre-cropped), two processes' slices."""
    config = make_config(channels=3, image_size=image_size, patch_size=4)
    config.input.eval_crop_fraction = crop_fraction
    source = sources.InMemorySource(
        images(45, 20, 26, 3), np.arange(45, dtype=np.int32) % 10, "synthetic"
    )
    assert pipeline.in_memory_batches(config.input, source)
    for process in range(2):
        kwargs = dict(batch_size=8, process_index=process, process_count=2)
        batched = take(pipeline.eval_dataset(config, source, **kwargs), 3)
        config.input.batched_views = False
        per_example = take(pipeline.eval_dataset(config, source, **kwargs), 3)
        config.input.batched_views = True
        for got, expected in zip(batched, per_example, strict=True):
            assert got["image"].shape == (8, image_size, image_size, 3)
            for key in ("label", "valid", "index"):
                np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
            np.testing.assert_allclose(got["image"], expected["image"], atol=1e-5)


def draw_statistics(draws):
    """Summaries of a set of draws whose per-example and batched values must agree."""
    box = draws["box"].numpy().astype(np.float64)
    kept = np.zeros((box.shape[0], 16))
    np.put_along_axis(kept, draws["ids_keep"].numpy(), 1.0, axis=1)
    return {
        "box area": box[:, 2] * box[:, 3] / (23 * 31),
        "box log aspect": np.log(box[:, 3] / box[:, 2]),
        "box top": box[:, 0],
        "flip": draws["flip"].numpy(),
        "shift": draws["offset"].numpy().ravel(),
        "jitter": draws["target_jitter"].numpy(),
        "brightness": draws["target_jitter_factors"].numpy()[:, 0],
        "first op": draws["target_jitter_order"].numpy()[:, 0],
        "blur": draws["target_blur"].numpy(),
        "erase": draws["target_erase"].numpy(),
        "erase height": draws["target_erase_box"].numpy()[:, 2],
        "patch 0 kept": kept[:, 0],
        "patch 15 kept": kept[:, 15],
    }


def test_batched_draws_have_the_per_example_distribution():
    config = colour_config()
    view_fn = example_views.masked_views(config)
    shape = (23, 31, 3)
    num = 2048
    batched = view_fn.batched.draws(tf.constant([5, 6], tf.int64), num, shape)
    one = tf.function(lambda seed: view_fn.batched.draws(seed, 1, shape))
    singles = [one(seed) for seed in seeds(num)]
    per_example = {k: tf.concat([d[k] for d in singles], 0) for k in singles[0]}
    for key, value in batched.items():
        assert value.shape == per_example[key].shape, key
    stats_batched, stats_single = draw_statistics(batched), draw_statistics(per_example)
    for name in stats_batched:
        a, b = stats_batched[name].astype(np.float64), stats_single[name].astype(np.float64)
        # The two means differ by at most 5 standard errors of their difference.
        error = np.sqrt((a.var() + b.var()) / num)
        assert abs(a.mean() - b.mean()) <= 5 * error + 1e-9, (name, a.mean(), b.mean())
    # Each row is an example of its own: no two boxes and masks repeat across the batch.
    rows = {
        tuple(b) + tuple(k) for b, k in zip(batched["box"].numpy(), batched["ids_keep"].numpy())
    }
    assert len(rows) > 0.9 * num
    # Every box lies in the image, inside torchvision's scale and ratio ranges.
    y, x, h, w = batched["box"].numpy().T
    assert (y >= 0).all() and (x >= 0).all() and (y + h <= 23).all() and (x + w <= 31).all()
    area = h * w / (23 * 31)
    assert area.min() >= 0.2 * 0.9 and area.max() <= 1.0


def test_pipeline_batched_stream_draws_once_per_global_batch():
    # The same local rows whatever the number of processes (each draws the global batch),
    # every index once per epoch, and the same images as the per-example stream's order.
    config = make_config(channels=1)
    source = synthetic_source()  # 64 examples, batch 16
    batched = take(pipeline.train_dataset(config, source, start_step=0), 4)
    halves = [
        take(
            pipeline.train_dataset(config, source, start_step=0, process_index=p, process_count=2),
            4,
        )
        for p in range(2)
    ]
    for step, batch in enumerate(batched):
        for key in batch:
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key], err_msg=key)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([b["index"] for b in batched])), np.arange(64)
    )
    config.input.batched_views = False
    per_example = take(pipeline.train_dataset(config, source, start_step=0), 4)
    for got, expected in zip(batched, per_example, strict=True):
        assert set(got) == set(expected)
        for key in ("index", "label", "corrupt"):
            np.testing.assert_array_equal(got[key], expected[key])
        for key in ("online", "target", "ids_keep", "ids_mask"):
            assert got[key].shape == expected[key].shape and got[key].dtype == expected[key].dtype
