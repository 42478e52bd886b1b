"""Tests of the tf.data input pipeline: sources, masks, views, determinism and resume."""

import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import write_idx

from cmae_jax.data import masking, pipeline, sources, views

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def make_config(
    *,
    channels=1,
    image_size=16,
    patch_size=4,
    shift=4,
    global_batch_size=16,
    mask_type="block",
    mask_ratio=0.65,
    target_view=True,
    colour=True,
    shuffle=True,
    seed=0,
):
    config = ml_collections.ConfigDict()
    config.method = "cmae"  # the masked views (cmae_jax.methods)
    config.seed = seed
    config.dataset = ml_collections.ConfigDict(
        dict(
            name="fashion_mnist",
            idx_dir=FASHION_MNIST_DIR,
            tfds_name="",
            data_dir=None,
            train_split="train",
            eval_split="test",
            allow_tfds_download=False,
        )
    )
    config.input = ml_collections.ConfigDict(
        dict(
            global_batch_size=global_batch_size,
            image_size=image_size,
            channels=channels,
            patch_size=patch_size,
            crop_scale=(0.2, 1.0),
            crop_ratio=(3 / 4, 4 / 3),
            shift=shift,
            flip=True,
            target_view=target_view,
            color_jitter=dict(
                prob=0.8 if colour else 0.0,
                brightness=0.4,
                contrast=0.4,
                saturation=0.4,
                hue=0.1,
            ),
            grayscale_prob=0.2 if colour else 0.0,
            blur_prob=0.5 if colour else 0.0,
            blur_sigma=(0.1, 2.0),
            mean=(0.5,) * channels,
            std=(0.25,) * channels,
            mask_type=mask_type,
            mask_ratio=mask_ratio,
            mask_block=2,
            shuffle=shuffle,
        )
    )
    return config


def synthetic_source(num=64, size=16, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, 10, (num,), dtype=np.int32)
    return sources.InMemorySource(images, labels, "synthetic")


def take(ds, n):
    it = ds.as_numpy_iterator()
    return [next(it) for _ in range(n)]


def seed_of(i):
    return tf.constant([7, i], tf.int64)


# ----------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    ints = rng.integers(-(2**31), 2**31 - 1, (4, 2), dtype=np.int64).astype(np.int32)
    floats = rng.normal(size=(6,)).astype(np.float32)
    for name, array, code in [("u8", images, 0x08), ("i32", ints, 0x0C), ("f32", floats, 0x0D)]:
        path = tmp_path / name
        write_idx(path, array, code, compress)
        got = sources.read_idx(path)
        assert got.shape == array.shape
        assert got.dtype.isnative
        np.testing.assert_array_equal(got, array)


def test_read_idx_rejects_malformed(tmp_path):
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x01\x00\x08\x01" + np.asarray([3], ">u4").tobytes() + b"abc")
    with pytest.raises(ValueError, match="not an IDX file"):
        sources.read_idx(bad_magic)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(b"\x00\x00\x08\x02" + np.asarray([3, 4], ">u4").tobytes() + b"x" * 11)
    with pytest.raises(ValueError, match="12 bytes of data, the file has 11"):
        sources.read_idx(truncated)
    bad_type = tmp_path / "bad_type"
    bad_type.write_bytes(b"\x00\x00\x07\x01" + np.asarray([1], ">u4").tobytes() + b"x")
    with pytest.raises(ValueError, match="type code 0x07"):
        sources.read_idx(bad_type)


@pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR), reason=f"{FASHION_MNIST_DIR} absent (Debian package)"
)
def test_real_fashion_mnist():
    for split, num in [("train", 60000), ("test", 10000)]:
        source = sources.load_fashion_mnist(FASHION_MNIST_DIR, split)
        assert source.images.shape == (num, 28, 28, 1)
        assert source.images.dtype == np.uint8
        assert source.labels.dtype == np.int32
        # Fashion-MNIST is balanced: 6000 / 1000 images of each of the 10 classes.
        np.testing.assert_array_equal(np.bincount(source.labels), [num // 10] * 10)
        assert source.images.max() == 255


def test_fashion_mnist_source_from_folder(tmp_path):
    rng = np.random.default_rng(1)
    for prefix, num, compress in [("train", 12, True), ("t10k", 5, False)]:
        suffix = ".gz" if compress else ""
        images = rng.integers(0, 256, (num, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (num,), dtype=np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x08, compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 0x08, compress)
        if prefix == "t10k":
            test_images, test_labels = images, labels
    cfg = make_config().dataset
    cfg.idx_dir = str(tmp_path)
    sources.check_source_available(cfg)
    source = sources.make_source(cfg, "test")
    assert source.num_examples == 5
    np.testing.assert_array_equal(source.images[..., 0], test_images)
    np.testing.assert_array_equal(source.labels, test_labels.astype(np.int32))
    item = source.tf_lookup(tf.constant(3))
    np.testing.assert_array_equal(item["image"].numpy()[..., 0], test_images[3])
    assert int(item["label"]) == test_labels[3]


def test_missing_idx_folder_error(tmp_path):
    cfg = make_config().dataset
    cfg.idx_dir = str(tmp_path / "nowhere")
    for call in (
        lambda: sources.check_source_available(cfg),
        lambda: sources.make_source(cfg, "train"),
    ):
        with pytest.raises(FileNotFoundError) as info:
            call()
        message = str(info.value)
        assert "config.dataset.idx_dir" in message
        assert str(tmp_path / "nowhere") in message
        assert "apt-get install dataset-fashion-mnist" in message
        assert "--config.dataset.idx_dir=FOLDER" in message
        assert "--config.dataset.allow_tfds_download=True" in message


def test_fashion_mnist_origin(small_fashion_mnist, tmp_path):
    cfg = make_config().dataset
    cfg.idx_dir = small_fashion_mnist
    assert sources.fashion_mnist_origin(cfg) == "idx"
    cfg.idx_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="allow_tfds_download=True"):
        sources.fashion_mnist_origin(cfg)
    cfg.allow_tfds_download = True
    assert sources.fashion_mnist_origin(cfg) == "tfds"
    assert len(sources.FASHION_MNIST_CLASSES) == 10


def test_unknown_dataset_name():
    cfg = make_config().dataset
    cfg.name = "imagenet"
    for call in (
        lambda: sources.check_source_available(cfg),
        lambda: sources.make_source(cfg, "train"),
    ):
        with pytest.raises(ValueError, match=r"config\.dataset\.name.*fashion_mnist.*tfds"):
            call()


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    ("num_patches", "ratio", "keep"), [(64, 0.75, 16), (196, 0.75, 49), (16, 0.5, 8)]
)
def test_random_mask_counts_and_cover(num_patches, ratio, keep):
    seen = set()
    for i in range(20):
        ids_keep, ids_mask = (
            t.numpy() for t in masking.random_mask(seed_of(i), num_patches, ratio)
        )
        assert ids_keep.dtype == np.int32 and ids_mask.dtype == np.int32
        assert ids_keep.shape == (keep,) and ids_mask.shape == (num_patches - keep,)
        assert np.all(np.diff(ids_keep) > 0) and np.all(np.diff(ids_mask) > 0)
        np.testing.assert_array_equal(
            np.sort(np.concatenate([ids_keep, ids_mask])), np.arange(num_patches)
        )
        seen.add(tuple(ids_keep))
    assert len(seen) == 20  # different seeds, different masks
    again = masking.random_mask(seed_of(3), num_patches, ratio)[0].numpy()
    np.testing.assert_array_equal(
        again, masking.random_mask(seed_of(3), num_patches, ratio)[0].numpy()
    )


@pytest.mark.parametrize(
    ("grid", "ratio", "kept_cells"), [(8, 0.65, 5), (14, 0.65, 17), (4, 0.5, 2)]
)
def test_block_mask_covers_whole_cells(grid, ratio, kept_cells):
    block = 2
    cells = grid // block
    for i in range(10):
        ids_keep, ids_mask = (
            t.numpy() for t in masking.block_mask(seed_of(i), grid, grid, block, ratio)
        )
        assert ids_keep.shape == (kept_cells * 4,)
        assert ids_mask.shape == (grid * grid - kept_cells * 4,)
        assert np.all(np.diff(ids_keep) > 0) and np.all(np.diff(ids_mask) > 0)
        np.testing.assert_array_equal(
            np.sort(np.concatenate([ids_keep, ids_mask])), np.arange(grid * grid)
        )
        visible = np.zeros(grid * grid, bool)
        visible[ids_keep] = True
        per_cell = (
            visible.reshape(cells, block, cells, block)
            .transpose(0, 2, 1, 3)
            .reshape(cells * cells, 4)
        )
        assert np.all(per_cell.all(axis=1) | ~per_cell.any(axis=1))  # whole cells only
        assert per_cell.all(axis=1).sum() == kept_cells


def test_mask_counts_and_errors():
    inp = make_config(mask_type="block", mask_ratio=0.65).input
    assert masking.mask_counts(14, inp) == (68, 128)
    assert masking.mask_counts((8, 8), inp) == (20, 44)
    inp.mask_type = "random"
    inp.mask_ratio = 0.75
    assert masking.mask_counts(14, inp) == (49, 147)
    for bad in (0.0, 1.0, 1.5):
        inp.mask_ratio = bad
        with pytest.raises(ValueError, match=r"config\.input\.mask_ratio"):
            masking.mask_counts(8, inp)
    inp.mask_ratio = 0.99  # keeps int(64 * 0.01) = 0 patches
    with pytest.raises(ValueError, match="keeps 0 of 64"):
        masking.mask_counts(8, inp)
    inp.mask_ratio = 0.75
    inp.mask_type = "grid"
    with pytest.raises(ValueError, match=r"config\.input\.mask_type"):
        masking.mask_counts(8, inp)
    with pytest.raises(ValueError, match=r"config\.input\.mask_block"):
        masking.block_mask(seed_of(0), 7, 7, 2, 0.5)


# ----------------------------------------------------------------------------- views


def test_random_resized_crop_box_constraints():
    height, width = 40, 60
    for i in range(50):
        y, x, h, w = (
            int(v)
            for v in views.random_resized_crop_box(
                seed_of(i), height, width, (0.2, 1.0), (3 / 4, 4 / 3)
            )
        )
        assert y >= 0 and y + h <= height and x >= 0 and x + w <= width
        # Same bounds as torchvision's accepted tries, up to the rounding of h and w.
        assert 0.2 * height * width * 0.85 <= h * w <= height * width
        assert 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15


def test_random_resized_crop_box_fallback():
    # A 1 x 100 strip admits no crop with aspect ratio in [3/4, 4/3] and area >= 20 pixels,
    # so torchvision's fallback applies: centre crop, h = 1, w = round(1 * 4/3) = 1.
    y, x, h, w = (
        int(v)
        for v in views.random_resized_crop_box(seed_of(0), 1, 100, (0.2, 1.0), (3 / 4, 4 / 3))
    )
    assert (y, x, h, w) == (0, 49, 1, 1)
    # 50 x 20: in_ratio 0.4 < 3/4, scale >= 0.9 makes every try too tall -> h = round(20 / 0.75).
    y, x, h, w = (
        int(v)
        for v in views.random_resized_crop_box(seed_of(0), 50, 20, (0.9, 1.0), (3 / 4, 4 / 3))
    )
    assert (y, x, h, w) == ((50 - 27) // 2, 0, 27, 20)


def test_the_mae_demo_crops_the_whole_image_and_maect_stages_the_usual_ratios():
    from cmae_jax.config_defaults import fashion_mnist_maect_config
    from cmae_jax.methods.maect import stage_config

    config = fashion_mnist_maect_config()

    def boxes(inp):
        seed = tf.constant([7, 8], tf.int64)
        box = views.random_resized_crop_box(
            seed, 28, 28, tuple(inp.crop_scale), tuple(inp.crop_ratio), num=64
        )
        return np.stack([b.numpy() for b in box], 1)  # [64, (y, x, h, w)]

    # The whole area: every try of another aspect ratio overflows a side, so each box is the
    # whole 28 x 28 image whatever crop_ratio allows.
    mae = stage_config(config, "1_mae").input
    np.testing.assert_array_equal(boxes(mae), [[0, 0, 28, 28]] * 64)
    # MAE-CT's contrastive stages set their own crop scale and keep RandomResizedCrop's ratios
    # (the measured recipe of configs/fashion_mnist_maect.py): not the MAE's whole image.
    for stage in ("2_head", "3_tune"):
        inp = stage_config(config, stage).input
        assert tuple(inp.crop_scale) == (0.2, 1.0)
        assert tuple(inp.crop_ratio) == pytest.approx((3 / 4, 4 / 3))
        h, w = boxes(inp)[:, 2:].T
        assert (h != w).any() and (h * w < 28 * 28).any()


def reference_master(image, box, flip, out_size):
    y, x, h, w = box
    crop = tf.cast(image[y : y + h, x : x + w], tf.float32) / 255.0
    master = tf.clip_by_value(
        tf.image.resize(crop, (out_size, out_size), "bicubic", antialias=True), 0, 1
    ).numpy()
    return master[:, ::-1] if flip else master


@pytest.mark.parametrize(
    "channels,master_size,master_mode",
    [(1, 0, "resize"), (3, 0, "resize"), (1, 20, "resize"), (1, 20, "pad"), (3, 0, "pad")],
)
def test_pixel_shift_views_geometry(channels, master_size, master_mode):
    cfg = make_config(channels=channels, image_size=16, shift=4, colour=False).input
    cfg.master_size = master_size
    cfg.master_mode = master_mode
    # 0: the official rule size + shift + 1 (256 = 224 + 31 + 1 on ImageNet); else as given.
    side = master_size or 21
    rng = np.random.default_rng(0)
    image = tf.constant(rng.integers(0, 256, (24, 20, channels), dtype=np.uint8))
    flips, offsets = set(), set()
    for i in range(24):
        online, target, params = views.pixel_shift_views_with_params(image, seed_of(i), cfg)
        online, target = online.numpy(), target.numpy()
        dy, dx, flip = int(params["dy"]), int(params["dx"]), bool(params["flip"])
        assert online.shape == target.shape == (16, 16, channels)
        assert 0 <= dy <= 4 and 0 <= dx <= 4
        flips.add(flip)
        offsets.update([dy, dx])
        # The master is the crop box resized to side x side, flipped once ('pad': resized
        # to the views' 16 x 16, flipped, black below and to the right); both views come
        # from it.
        if master_mode == "pad":
            crop = reference_master(image, params["box"].numpy(), flip, 16)
            master = np.zeros((side, side, channels), np.float32)
            master[:16, :16] = crop
            np.testing.assert_allclose(online, crop, atol=1e-6)  # the whole crop, unmagnified
        else:
            master = reference_master(image, params["box"].numpy(), flip, side)
        np.testing.assert_allclose(params["master"].numpy(), master, atol=1e-6)
        np.testing.assert_array_equal(online, master[:16, :16])
        np.testing.assert_array_equal(target, master[dy : dy + 16, dx : dx + 16])
        assert online.min() >= 0.0 and online.max() <= 1.0
        # The public function gives the same views.
        pub_online, pub_target = views.pixel_shift_views(image, seed_of(i), cfg)
        np.testing.assert_array_equal(pub_online.numpy(), online)
        np.testing.assert_array_equal(pub_target.numpy(), target)
    assert flips == {False, True}
    assert offsets == {0, 1, 2, 3, 4}


def test_online_view_without_target():
    cfg = make_config(channels=3, image_size=16, shift=4, target_view=False).input
    image = tf.constant(np.random.default_rng(2).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    online, target, params = views.pixel_shift_views_with_params(
        image, seed_of(1), cfg, with_target=False
    )
    assert target is None
    master = reference_master(image, params["box"].numpy(), bool(params["flip"]), 16)
    np.testing.assert_allclose(online.numpy(), master, atol=1e-6)
    np.testing.assert_array_equal(views.online_view(image, seed_of(1), cfg).numpy(), online.numpy())


def test_brightness_only_jitter_is_a_constant_factor():
    cfg = make_config(channels=3, colour=False).input
    cfg.color_jitter.update(prob=1.0, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    image = tf.constant(np.random.default_rng(3).uniform(0.05, 0.6, (16, 16, 3)).astype(np.float32))
    factors = []
    for i in range(10):
        out = views.target_augment(image, seed_of(i), cfg).numpy()
        ratio = out / image.numpy()
        np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
        factors.append(ratio.flat[0])
    assert min(factors) >= 0.6 and max(factors) <= 1.4 and np.ptp(factors) > 0.1


def test_grayscale_and_one_channel_colour():
    cfg = make_config(channels=3, colour=False).input
    cfg.grayscale_prob = 1.0
    image = tf.constant(np.random.default_rng(4).uniform(0, 1, (16, 16, 3)).astype(np.float32))
    out = views.target_augment(image, seed_of(0), cfg).numpy()
    expected = image.numpy() @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    np.testing.assert_allclose(out, np.repeat(expected[..., None], 3, -1), atol=1e-5)
    # One channel: the full colour recipe runs and stays an image in [0, 1].
    cfg1 = make_config(channels=1, colour=True).input
    gray = tf.constant(np.random.default_rng(5).uniform(0, 1, (16, 16, 1)).astype(np.float32))
    changed = 0
    for i in range(10):
        out = views.target_augment(gray, seed_of(i), cfg1).numpy()
        assert out.shape == (16, 16, 1) and out.min() >= 0.0 and out.max() <= 1.0
        changed += not np.allclose(out, gray.numpy())
    assert changed >= 5


def test_gaussian_blur_matches_numpy():
    image = np.zeros((9, 9, 1), np.float32)
    image[4, 4, 0] = 1.0
    sigma = 1.3
    out = views.gaussian_blur(tf.constant(image), tf.constant(sigma), 5).numpy()[..., 0]
    x = np.arange(-2, 3)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    expected = np.zeros((9, 9))
    expected[2:7, 2:7] = np.outer(k, k)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert views.blur_kernel_size(224) == 23 and views.blur_kernel_size(32) == 3


def test_random_erasing_fills_one_box_inside_the_view_with_the_mean():
    cfg = make_config(channels=3, colour=False).input
    cfg.update(erase_prob=1.0, erase_scale=(0.02, 0.33), erase_ratio=(0.3, 3.3))
    size = 32
    # No pixel of the image equals the fill (the mean, 0.5), so the box is exactly the change.
    image = np.random.default_rng(8).uniform(0.6, 1.0, (size, size, 3)).astype(np.float32)
    # Traced once per probability, as in the input pipeline (eager TF costs 50 ms a call).
    augment = tf.function(lambda seed: views.target_augment(tf.constant(image), seed, cfg))
    tops, bottoms = [], []
    for i in range(200):
        out = augment(seed_of(i)).numpy()
        changed = np.any(out != image, axis=-1)
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        h, w = len(rows), len(cols)
        assert h > 0, "erase_prob 1 erased nothing"
        # One solid rectangle, filled with the mean, strictly smaller than the view.
        assert np.ptp(rows) == h - 1 and np.ptp(cols) == w - 1 and changed.sum() == h * w
        np.testing.assert_array_equal(out[changed], 0.5)
        assert h < size and w < size
        # Area 2-33% of the view and aspect 0.3-3.3, up to the rounding of h and w.
        assert 0.02 * size**2 * 0.7 <= h * w <= 0.33 * size**2 * 1.15
        assert 0.3 / 1.3 <= h / w <= 3.3 * 1.3
        tops.append(rows[0])
        bottoms.append(rows[-1])
    # torch.randint(0, H - h + 1): the box reaches both edges.
    assert min(tops) == 0 and max(bottoms) == size - 1
    # The probability, and erase_prob 0 leaves the view bit for bit.
    cfg.erase_prob = 0.5
    augment = tf.function(lambda seed: views.target_augment(tf.constant(image), seed, cfg))
    erased = sum(not np.array_equal(augment(seed_of(i)).numpy(), image) for i in range(200))
    assert 70 <= erased <= 130
    cfg.erase_prob = 0.0
    np.testing.assert_array_equal(
        views.target_augment(tf.constant(image), seed_of(0), cfg).numpy(), image
    )
    # A grey view for a colour encoder (repeated later) is filled with the channels' mean.
    cfg.update(erase_prob=1.0, mean=(0.2, 0.3, 0.7))
    grey = views.target_augment(tf.constant(image[..., :1]), seed_of(0), cfg).numpy()
    assert grey.shape == (size, size, 1) and (grey != image[..., :1]).any()
    np.testing.assert_allclose(grey[grey != image[..., :1]], 0.4, rtol=1e-6)


def test_eval_view():
    image = np.random.default_rng(6).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    same = views.eval_view(tf.constant(image), 16).numpy()
    np.testing.assert_allclose(same, image / 255.0, atol=1e-5)
    wide = views.eval_view(tf.constant(np.zeros((28, 56, 1), np.uint8)), 32)
    assert wide.shape == (32, 32, 1)


def test_normalize_round_trip():
    x = np.random.default_rng(7).uniform(0, 1, (2, 4, 4, 3)).astype(np.float32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    y = pipeline.normalize(x, mean, std)
    np.testing.assert_allclose(y[..., 1], (x[..., 1] - 0.456) / 0.224, rtol=1e-6)
    np.testing.assert_allclose(pipeline.denormalize(y, mean, std), x, atol=1e-6)
    np.testing.assert_allclose(pipeline.normalize(tf.constant(x), mean, std).numpy(), y, atol=1e-6)


# ----------------------------------------------------------------------------- pipeline


def test_train_batches_format_and_content():
    config = make_config(channels=1)
    source = synthetic_source()
    (batch,) = take(pipeline.train_dataset(config, source, start_step=0), 1)
    assert set(batch) == {
        "online",
        "target",
        "ids_keep",
        "ids_mask",
        "label",
        "index",
        "corrupt",
    }
    assert batch["corrupt"].dtype == bool and not batch["corrupt"].any()
    assert batch["online"].shape == batch["target"].shape == (16, 16, 16, 1)
    assert batch["online"].dtype == np.float32
    assert batch["ids_keep"].shape == (16, 4) and batch["ids_mask"].shape == (
        16,
        12,
    )  # 4 cells, keep 1
    assert batch["ids_keep"].dtype == batch["ids_mask"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], source.labels[batch["index"]])
    pixels = pipeline.denormalize(batch["online"], (0.5,), (0.25,))
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    cover = np.sort(np.concatenate([batch["ids_keep"], batch["ids_mask"]], 1), 1)
    np.testing.assert_array_equal(cover, np.broadcast_to(np.arange(16), (16, 16)))


def test_train_mae_mode_three_channels():
    config = make_config(channels=3, target_view=False, mask_type="random", mask_ratio=0.75)
    (batch,) = take(pipeline.train_dataset(config, synthetic_source(channels=3), start_step=0), 1)
    assert "target" not in batch
    assert batch["online"].shape == (16, 16, 16, 3)
    assert batch["ids_keep"].shape == (16, 4) and batch["ids_mask"].shape == (16, 12)


def test_same_config_same_batches_and_seed_matters():
    config = make_config()
    source = synthetic_source()
    first = take(pipeline.train_dataset(config, source, start_step=0), 3)
    second = take(pipeline.train_dataset(config, source, start_step=0), 3)
    for a, b in zip(first, second, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = take(pipeline.train_dataset(make_config(seed=1), source, start_step=0), 1)[0]
    assert not np.array_equal(other["index"], first[0]["index"])


def test_resume_equals_uninterrupted_across_epochs():
    config = make_config()
    source = synthetic_source()  # 64 examples / batch 16 = 4 steps per epoch
    full = take(pipeline.train_dataset(config, source, start_step=0), 10)
    resumed = take(pipeline.train_dataset(config, source, start_step=3), 7)
    for step, batch in enumerate(resumed, start=3):
        for key in batch:
            np.testing.assert_array_equal(batch[key], full[step][key], err_msg=f"{key} step {step}")
    # Every epoch visits every index exactly once, in a different order each epoch.
    orders = [np.concatenate([b["index"] for b in full[e * 4 : (e + 1) * 4]]) for e in range(2)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(64))
    assert not np.array_equal(orders[0], orders[1])
    # The same example gets new views in a new epoch (seed includes the epoch).
    i = orders[0][0]
    row0 = np.nonzero(np.concatenate([b["index"] for b in full[:4]]) == i)[0][0]
    row1 = np.nonzero(orders[1] == i)[0][0]
    online0 = np.concatenate([b["online"] for b in full[:4]])[row0]
    online1 = np.concatenate([b["online"] for b in full[4:8]])[row1]
    assert not np.allclose(online0, online1)


def test_no_shuffle_and_dropped_remainder():
    config = make_config(shuffle=False, global_batch_size=24)
    source = synthetic_source(num=64)  # 2 steps per epoch, 16 examples dropped each epoch
    assert pipeline.steps_per_epoch(64, 24) == 2
    batches = take(pipeline.train_dataset(config, source, start_step=1), 2)
    np.testing.assert_array_equal(batches[0]["index"], np.arange(24, 48))
    np.testing.assert_array_equal(batches[1]["index"], np.arange(0, 24))


def test_processes_split_the_global_batch():
    config = make_config(channels=3, global_batch_size=16)
    source = synthetic_source(channels=3)
    single = take(pipeline.train_dataset(config, source, start_step=2), 3)
    parts = [
        take(
            pipeline.train_dataset(config, source, start_step=2, process_index=p, process_count=4),
            3,
        )
        for p in range(4)
    ]
    for step in range(3):
        for key in single[step]:
            joined = np.concatenate([parts[p][step][key] for p in range(4)])
            np.testing.assert_array_equal(joined, single[step][key], err_msg=key)
        rows = [set(parts[p][step]["index"]) for p in range(4)]
        assert sum(len(r) for r in rows) == len(set().union(*rows)) == 16
    with pytest.raises(ValueError, match=r"config\.input\.global_batch_size=16.*divisible.*3"):
        pipeline.train_dataset(config, source, start_step=0, process_index=0, process_count=3)


def test_train_config_errors():
    source = synthetic_source()
    # Grey sources feed 3-channel encoders (repeated); an RGB source cannot feed a grey one.
    with pytest.raises(ValueError, match=r"config\.input\.channels=1 .* has 3 channel"):
        pipeline.train_dataset(make_config(channels=1), synthetic_source(channels=3), start_step=0)
    config = make_config()
    config.input.patch_size = 5
    with pytest.raises(ValueError, match=r"config\.input\.image_size=16.*patch_size=5"):
        pipeline.train_dataset(config, source, start_step=0)
    with pytest.raises(ValueError, match="exceeds the 64 examples"):
        pipeline.train_dataset(make_config(global_batch_size=128), source, start_step=0)


@pytest.mark.parametrize("batched", [True, False])
def test_eval_dataset_sees_every_example_once(batched):
    """Per example (config.input.batched_views=False) and a batch at a time (the default
    for in-memory sources): every example once, padding rows marked, the same pixels."""
    config = make_config(channels=1)
    config.input.batched_views = batched
    source = synthetic_source(num=37)
    assert pipeline.eval_steps(37, 8, 3) == 2  # ceil(37 / 3) = 13 per process
    seen = []
    for p in range(3):
        batches = list(
            pipeline.eval_dataset(
                config, source, batch_size=8, process_index=p, process_count=3
            ).as_numpy_iterator()
        )
        assert len(batches) == 2
        for b in batches:
            assert b["image"].shape == (8, 16, 16, 1) and b["valid"].dtype == bool
            valid = b["valid"]
            idx = b["index"][valid]
            seen.extend(idx)
            np.testing.assert_array_equal(b["label"][valid], source.labels[idx])
            expected = (source.images[idx].astype(np.float32) / 255 - 0.5) / 0.25
            np.testing.assert_allclose(b["image"][valid], expected, atol=1e-4)
            assert np.all(b["index"][~valid] == -1) and np.all(b["label"][~valid] == -1)
            assert np.all(np.isfinite(b["image"]))
    assert sorted(seen) == list(range(37))


def test_grey_images_on_a_three_channel_encoder_repeat_the_grey_value():
    """A 3-channel encoder (e.g. a published ImageNet one) on grey images: each channel is
    the grey value normalised with that channel's mean and std (torchvision's Grayscale(3)
    then Normalize)."""
    config = make_config(channels=3, global_batch_size=8)
    config.input.mean, config.input.std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    source = synthetic_source(num=8, channels=1)
    (batch,) = list(pipeline.eval_dataset(config, source, batch_size=8).as_numpy_iterator())
    grey = source.images[batch["index"]].astype(np.float32) / 255
    expected = (grey - np.array(config.input.mean)) / np.array(config.input.std)
    assert batch["image"].shape == (8, 16, 16, 3)
    np.testing.assert_allclose(batch["image"], expected, atol=1e-4)
    (train,) = take(pipeline.train_dataset(config, source, start_step=0), 1)
    assert train["online"].shape[-1] == 3 and train["target"].shape[-1] == 3


# ----------------------------------------------------------------------------- TFDS


def tiny_image(split, i):
    return np.random.default_rng(1000 * split + i).integers(0, 256, (16, 16, 3), dtype=np.uint8)


class CmaeTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A handful of random images; the label is the generation number, to find each one."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(16, 16, 3)),
                    "label": tfds.features.ClassLabel(num_classes=40),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(0, 32), "test": self._generate_examples(1, 7)}

    def _generate_examples(self, split, num):
        for i in range(num):
            yield i, {"image": tiny_image(split, i), "label": i}


@pytest.mark.parametrize(
    ("file_format", "kind"),
    [("array_record", sources.TfdsArrayRecordSource), ("tfrecord", sources.InMemorySource)],
)
def test_tfds_source(tmp_path, file_format, kind):
    CmaeTinyImages(data_dir=str(tmp_path), file_format=file_format).download_and_prepare()
    config = make_config(channels=3, global_batch_size=8)
    config.dataset.name = "tfds"
    config.dataset.tfds_name = "cmae_tiny_images"
    config.dataset.data_dir = str(tmp_path)
    sources.check_source_available(config.dataset)
    train = sources.make_source(config.dataset, "train")
    assert isinstance(train, kind) and train.num_examples == 32 and train.channels == 3
    for i in (0, 5, 31):
        item = train.tf_lookup(tf.constant(i, tf.int64))
        np.testing.assert_array_equal(item["image"].numpy(), tiny_image(0, int(item["label"])))
    batches = take(pipeline.train_dataset(config, train, start_step=0), 5)  # 4 steps per epoch
    assert batches[0]["online"].shape == (8, 16, 16, 3) and batches[0]["ids_keep"].shape == (8, 4)
    labels = np.concatenate([b["label"] for b in batches[:4]])
    assert sorted(labels) == list(range(32))
    test = sources.make_source(config.dataset, "test")
    (batch,) = list(pipeline.eval_dataset(config, test, batch_size=8).as_numpy_iterator())
    assert batch["valid"].sum() == 7 and sorted(batch["label"][:7]) == list(range(7))
    for row in range(7):
        expected = (tiny_image(1, batch["label"][row]) / 255.0 - 0.5) / 0.25
        np.testing.assert_allclose(batch["image"][row], expected, atol=1e-4)


def test_tfds_not_prepared_error(tmp_path):
    config = make_config()
    config.dataset.name = "tfds"
    config.dataset.tfds_name = "mnist"
    config.dataset.data_dir = str(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"not prepared.*tfds build mnist.*config\.dataset\.data_dir"
    ):
        sources.check_source_available(config.dataset)
