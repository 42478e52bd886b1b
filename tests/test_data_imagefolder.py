"""Tests of the ImageFolder source and of the pipeline's bad-file handling, on tiny files."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from test_data import make_config, take

from cmae_jax import config_validation
from cmae_jax.data import pipeline, sources, views

CLASSES = ("bird", "cat", "dog", "zebra")  # zebra/ stays empty: a class without images


def rgb(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def jpeg(image, *, chroma_downsampling=False):
    # 4:4:4 JPEGs decode to the same pixels with and without the fused crop.
    data = tf.io.encode_jpeg(image, quality=95, chroma_downsampling=chroma_downsampling)
    return data.numpy()


def png(image):
    return tf.io.encode_png(image).numpy()


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_tree(root, rng):
    """FOLDER/{train,val}/CLASS/FILE; returns {split: {relative path: pixels or None}}."""
    good_jpeg = jpeg(rgb(rng, 30, 26))
    train = {
        "bird/a.jpg": rgb(rng, 20, 28),
        "bird/b.JPEG": rgb(rng, 26, 22),
        "bird/c.png": rgb(rng, 24, 24),
        "bird/d.jpg": rgb(rng, 40, 32),
        "cat/e.jpeg": rng.integers(0, 256, (22, 30, 1), dtype=np.uint8),  # grayscale JPEG
        "cat/f.jpg": None,  # truncated JPEG
        "cat/g.jpg": rgb(rng, 18, 24),
        "cat/h.png": None,  # empty file
        "dog/i.png": rng.integers(0, 256, (21, 23, 1), dtype=np.uint8),  # grayscale PNG
        "dog/j.jpg": rgb(rng, 33, 21),
        "dog/k.jpg": rgb(rng, 24, 36),
        "dog/l.jpg": None,  # not an image at all
    }
    corrupt = {
        "cat/f.jpg": good_jpeg[: len(good_jpeg) * 6 // 10],
        "cat/h.png": b"",
        "dog/l.jpg": b"this is a text file\n" * 20,
    }
    val = {f"{c}/v{i}.png": rgb(rng, 20, 20) for i, c in enumerate(CLASSES[:3])}
    for split, files in (("train", train), ("val", val)):
        for rel, image in files.items():
            if image is None:
                data = corrupt[rel]
            elif rel.lower().endswith(".png"):
                data = png(image)
            else:
                data = jpeg(image)
            write(root / split / rel, data)
        (root / split / "zebra").mkdir()
    # Ignored: files that are no images, hidden folders, files beside the class folders.
    write(root / "train" / "bird" / "notes.txt", b"not listed")
    write(root / "train" / ".cache" / "x.jpg", jpeg(rgb(rng, 8, 8)))
    write(root / "train" / "stray.jpg", jpeg(rgb(rng, 8, 8)))
    return {"train": train, "val": val}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    return root, make_tree(root, np.random.default_rng(0))


def folder_config(root, global_batch_size=6, **kwargs):
    config = make_config(channels=3, global_batch_size=global_batch_size, **kwargs)
    config.dataset.name = "imagefolder"
    config.dataset.folder = str(root)
    config.dataset.train_split = "train"
    config.dataset.eval_split = "val"
    config.dataset.num_classes = 4
    return config


TRAIN_FILES = [
    *("bird/a.jpg", "bird/b.JPEG", "bird/c.png", "bird/d.jpg"),
    *("cat/e.jpeg", "cat/f.jpg", "cat/g.jpg", "cat/h.png"),
    *("dog/i.png", "dog/j.jpg", "dog/k.jpg", "dog/l.jpg"),
]
CORRUPT = {5: 6, 7: 8, 11: 0}  # corrupt index -> the readable index that replaces it


def test_listing_labels_and_decoding(tree):
    root, files = tree
    source = sources.make_source(folder_config(root).dataset, "train")
    assert isinstance(source, sources.ImageFolderSource)
    assert source.class_names == list(CLASSES)
    assert source.files == TRAIN_FILES
    assert source.num_examples == 12 and source.channels == 3 and source.fallible
    np.testing.assert_array_equal(source.labels, [0] * 4 + [1] * 4 + [2] * 4)
    assert source.describe(5) == f"{root}/train/cat/f.jpg"
    for index, rel in enumerate(TRAIN_FILES):
        expected = files["train"][rel]
        if expected is None:
            with pytest.raises(tf.errors.InvalidArgumentError):
                source.tf_lookup(tf.constant(index, tf.int64))
            continue
        item = source.tf_lookup(tf.constant(index, tf.int64))
        image = item["image"].numpy()
        assert int(item["label"]) == source.labels[index]
        assert image.shape == (*expected.shape[:2], 3)
        expected3 = np.broadcast_to(expected, image.shape)  # grayscale files -> 3 channels
        if rel.endswith(".png"):
            np.testing.assert_array_equal(image, expected3)
        else:  # lossy, but close to the pixels written
            assert np.abs(image.astype(int) - expected3).mean() < 6


def test_fused_crop_equals_decode_then_slice(tree):
    root, _ = tree
    source = sources.make_source(folder_config(root).dataset, "train")
    for index in (0, 1, 2, 4, 8, 10):
        full = source.tf_lookup(tf.constant(index, tf.int64))["image"].numpy()
        height, width = full.shape[:2]
        for i in range(3):
            seed = tf.constant([3, i], tf.int64)
            box = views.random_resized_crop_box(seed, height, width, (0.2, 1.0), (0.75, 4 / 3))
            y, x, h, w = (int(v) for v in box)
            crop = source.tf_lookup_crop(
                tf.constant(index, tf.int64),
                lambda hh, ww, seed=seed: tf.stack(
                    views.random_resized_crop_box(seed, hh, ww, (0.2, 1.0), (0.75, 4 / 3))
                ),
            )["image"].numpy()
            np.testing.assert_array_equal(crop, full[y : y + h, x : x + w], err_msg=str(index))


def test_folder_batches_equal_in_memory_batches(tmp_path):
    # Same pixels in memory and as files: the fused JPEG path changes nothing in the batches.
    rng = np.random.default_rng(1)
    images, labels = [], []
    for i in range(8):
        image = rgb(rng, 24, 20)
        name = f"c{i % 2}/{i}.{'png' if i % 3 == 0 else 'jpg'}"
        data = png(image) if name.endswith("png") else jpeg(image)
        write(tmp_path / "train" / name, data)
        images.append(tf.io.decode_image(data, channels=3).numpy())
        labels.append(i % 2)
    order = np.argsort([f"c{i % 2}/{i}" for i in range(8)], kind="stable")
    memory = sources.InMemorySource(
        np.stack(images)[order], np.asarray(labels, np.int32)[order], "memory"
    )
    config = folder_config(tmp_path, global_batch_size=4)
    # Both per example, so that the comparison is bit for bit; the batched views of the
    # in-memory source are checked against these in tests/test_batched_views.py.
    config.input.batched_views = False
    folder = sources.make_source(config.dataset, "train")
    from_files = take(pipeline.train_dataset(config, folder, start_step=0), 3)
    from_memory = take(pipeline.train_dataset(config, memory, start_step=0), 3)
    for a, b in zip(from_files, from_memory, strict=True):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_corrupt_files_are_replaced_and_counted(tree, caplog):
    root, _ = tree
    config = folder_config(root)
    source = sources.make_source(config.dataset, "train")
    batches = take(pipeline.train_dataset(config, source, start_step=0), 6)  # 3 epochs
    again = take(pipeline.train_dataset(config, source, start_step=0), 6)
    for a, b in zip(batches, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for epoch in range(3):
        epoch_batches = batches[2 * epoch : 2 * epoch + 2]
        index = np.concatenate([b["index"] for b in epoch_batches])
        corrupt = np.concatenate([b["corrupt"] for b in epoch_batches])
        label = np.concatenate([b["label"] for b in epoch_batches])
        online = np.concatenate([b["online"] for b in epoch_batches])
        np.testing.assert_array_equal(np.sort(index), np.arange(12))  # positions unchanged
        np.testing.assert_array_equal(corrupt, np.isin(index, list(CORRUPT)))
        # A replaced row holds the next readable example: its label, a real image.
        expected_labels = [source.labels[CORRUPT.get(i, i)] for i in index]
        np.testing.assert_array_equal(label, expected_labels)
        assert all(online[r].std() > 0.1 for r in range(12))
    for b in batches:
        assert b["online"].shape == b["target"].shape == (6, 16, 16, 3)
        assert np.all(np.isfinite(b["online"])) and np.all(np.isfinite(b["target"]))
    counter = pipeline.SkipCounter(iter(batches), source)
    caplog.clear()
    with caplog.at_level("WARNING"):
        seen = list(counter)
    assert counter.skipped == 9  # 3 bad files x 3 epochs
    assert all("corrupt" not in b for b in seen) and len(seen) == 6
    logged = sorted(r.getMessage().split(": ")[-1] for r in caplog.records)
    assert logged == [f"{root}/train/{rel}" for rel in ("cat/f.jpg", "cat/h.png", "dog/l.jpg")]


def test_all_unreadable_gives_black_images(tmp_path):
    for name in ("a/1.jpg", "a/2.jpg", "b/3.png"):
        write(tmp_path / "train" / name, b"garbage")
    config = folder_config(tmp_path, global_batch_size=3)
    source = sources.make_source(config.dataset, "train")
    (batch,) = take(pipeline.train_dataset(config, source, start_step=0), 1)
    assert batch["corrupt"].all()
    np.testing.assert_array_equal(batch["label"], [-1, -1, -1])
    pixels = pipeline.denormalize(batch["online"], config.input.mean, config.input.std)
    np.testing.assert_allclose(pixels, 0.0, atol=1e-6)


def test_processes_disjoint_and_complete_with_bad_files(tree):
    root, _ = tree
    config = folder_config(root)
    source = sources.make_source(config.dataset, "train")
    single = take(pipeline.train_dataset(config, source, start_step=0), 4)
    parts = [
        take(
            pipeline.train_dataset(config, source, start_step=0, process_index=p, process_count=2),
            4,
        )
        for p in range(2)
    ]
    for step in range(4):
        for key in single[step]:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, single[step][key], err_msg=key)
    for epoch in range(2):
        rows = [
            set(np.concatenate([parts[p][s]["index"] for s in (2 * epoch, 2 * epoch + 1)]))
            for p in range(2)
        ]
        assert len(rows[0]) == len(rows[1]) == 6 and not rows[0] & rows[1]
        assert rows[0] | rows[1] == set(range(12))


def test_resume_position_exact(tree):
    root, _ = tree
    config = folder_config(root)
    source = sources.make_source(config.dataset, "train")
    full = take(pipeline.train_dataset(config, source, start_step=0), 5)
    resumed = take(pipeline.train_dataset(config, source, start_step=3), 2)
    for step, batch in enumerate(resumed, start=3):
        for key in batch:
            np.testing.assert_array_equal(batch[key], full[step][key], err_msg=f"{key} {step}")


def test_eval_leaves_out_unreadable_files(tree):
    root, files = tree
    config = folder_config(root)
    source = sources.make_source(config.dataset, "train")
    batches = list(pipeline.eval_dataset(config, source, batch_size=5).as_numpy_iterator())
    valid = np.concatenate([b["valid"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    label = np.concatenate([b["label"] for b in batches])
    readable = [i for i in range(12) if i not in CORRUPT]
    np.testing.assert_array_equal(np.nonzero(valid)[0], readable)
    np.testing.assert_array_equal(index[valid], readable)
    np.testing.assert_array_equal(label[valid], source.labels[readable])
    image = np.concatenate([b["image"] for b in batches])
    assert np.all(np.isfinite(image))
    # A 20 x 20 PNG at image_size 16, crop fraction 1: the whole image resized.
    val = sources.make_source(config.dataset, "val")
    (batch,) = list(pipeline.eval_dataset(config, val, batch_size=3).as_numpy_iterator())
    assert batch["valid"].all()
    np.testing.assert_array_equal(batch["label"], [0, 1, 2])
    expected = views.eval_view(tf.constant(files["val"]["bird/v0.png"]), 16).numpy()
    np.testing.assert_allclose(
        batch["image"][0], pipeline.normalize(expected, (0.5,) * 3, (0.25,) * 3), atol=1e-5
    )


def test_non_local_filesystem():
    # ram:// goes through the same TF file system layer (tf.io.gfile, tf.io.read_file) as
    # gs://, so a folder on a bucket is listed and read the same way.
    root = "ram://cmae_imagefolder"
    for c, value in (("b", 200), ("a", 100)):
        for i in range(4):
            tf.io.gfile.makedirs(f"{root}/train/{c}")
            with tf.io.gfile.GFile(f"{root}/train/{c}/{i}.jpg", "wb") as f:
                f.write(jpeg(np.full((20, 24, 3), value + i, np.uint8)))
    config = folder_config(root, global_batch_size=8)
    source = sources.make_source(config.dataset, "train")
    assert source.files == [f"{c}/{i}.jpg" for c in "ab" for i in range(4)]
    assert source.describe(7) == f"{root}/train/b/3.jpg"
    (batch,) = take(pipeline.train_dataset(config, source, start_step=0), 1)
    assert not batch["corrupt"].any()
    np.testing.assert_array_equal(np.sort(batch["index"]), np.arange(8))
    # Flat images stay flat through crop, resize and flip: the online view shows the value.
    pixels = pipeline.denormalize(batch["online"], config.input.mean, config.input.std) * 255
    expected = np.where(batch["index"] < 4, 100, 200) + batch["index"] % 4
    np.testing.assert_allclose(pixels.mean(axis=(1, 2, 3)), expected, atol=1.0)


# ----------------------------------------------------------------------------- errors


def expect_error(dataset_cfg, split, kind, *fragments):
    for call in (
        lambda: sources.check_source_available(dataset_cfg),
        lambda: sources.make_source(dataset_cfg, split),
    ):
        with pytest.raises(kind) as info:
            call()
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))


def test_missing_dataset_errors(tmp_path):
    cfg = folder_config(tmp_path / "nowhere").dataset
    expect_error(
        cfg,
        "train",
        FileNotFoundError,
        f"config.dataset.folder={str(tmp_path / 'nowhere')!r} does not exist",
        "/train/<class name>/<image>.jpg|.jpeg|.png",
    )
    cfg.folder = None
    expect_error(cfg, "train", FileNotFoundError, "config.dataset.folder is not set")
    (tmp_path / "train").mkdir()
    (tmp_path / "other").mkdir()
    cfg.folder = str(tmp_path)
    cfg.train_split = cfg.eval_split = "val"
    expect_error(cfg, "val", FileNotFoundError, "no split sub-folder 'val'", "['other', 'train']")


def test_empty_dataset_errors(tmp_path):
    cfg = folder_config(tmp_path).dataset
    cfg.eval_split = "train"
    (tmp_path / "train").mkdir()
    expect_error(
        cfg,
        "train",
        FileNotFoundError,
        f"{tmp_path}/train (config.dataset.folder={str(tmp_path)!r}, split 'train') has no "
        "class sub-folders with .jpg/.jpeg/.png files",
    )
    write(tmp_path / "train" / "cat" / "readme.txt", b"x")
    (tmp_path / "train" / "dog").mkdir()
    expect_error(
        cfg, "train", FileNotFoundError, "has 2 class sub-folder(s) but none holds .jpg/.jpeg/.png"
    )


def test_split_class_mismatch_and_num_classes(tree, tmp_path):
    root, _ = tree
    cfg = folder_config(root).dataset
    sources.check_source_available(cfg)  # the good tree passes
    cfg.num_classes = 3
    with pytest.raises(ValueError, match=r"4 class folders but config\.dataset\.num_classes=3"):
        sources.check_source_available(cfg)
    for split, classes in (("train", ("a", "b")), ("val", ("a", "c"))):
        for c in classes:
            write(tmp_path / split / c / "x.png", png(np.zeros((4, 4, 3), np.uint8)))
    cfg = folder_config(tmp_path).dataset
    with pytest.raises(ValueError, match=r"only in 'train': \['b'\], only in 'val': \['c'\]"):
        sources.check_source_available(cfg)


def test_config_validation_names_the_folder(tmp_path):
    from cmae_jax import config_defaults

    config = config_defaults.base_config("cmae")
    config.dataset.name = "imagefolder"
    config.dataset.folder = str(tmp_path / "imagenet")
    with pytest.raises(config_validation.ConfigError, match="imagenet.*does not exist"):
        config_validation.validate(config, num_devices=1)


# ----------------------------------------------------------------------------- others


def test_synthetic_source():
    source = sources.SyntheticSource(num_examples=32, height=20, width=24)
    a = source.tf_lookup(tf.constant(5, tf.int64))["image"].numpy()
    assert a.shape == (20, 24, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, source.tf_lookup(tf.constant(5, tf.int64))["image"].numpy())
    assert not np.array_equal(a, source.tf_lookup(tf.constant(6, tf.int64))["image"].numpy())
    crop = source.tf_lookup_crop(tf.constant(5, tf.int64), lambda h, w: tf.constant([2, 3, 9, 7]))
    np.testing.assert_array_equal(crop["image"].numpy(), a[2:11, 3:10])
    config = make_config(channels=3, global_batch_size=8)
    (batch,) = take(pipeline.train_dataset(config, source, start_step=0), 1)
    assert batch["online"].shape == (8, 16, 16, 3) and not batch["corrupt"].any()


def smooth(i):
    y, x = np.mgrid[0:48, 0:40]
    image = np.stack([y * 4 + i, x * 5 + 2 * i, (x + y) * 2 + 3 * i], -1)
    return (image % 256).astype(np.uint8)


def test_tfds_jpeg_source_uses_fused_crop(tmp_path):
    import tensorflow_datasets as tfds

    class CmaeTinyJpegs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Smooth JPEG images stored as in imagenet2012 (encoded bytes, 4:2:0)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            image = tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
            label = tfds.features.ClassLabel(num_classes=10)
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"image": image, "label": label})
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                yield i, {"image": smooth(i), "label": i}

    CmaeTinyJpegs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = ml_collections.ConfigDict(
        dict(name="tfds", tfds_name="cmae_tiny_jpegs", data_dir=str(tmp_path))
    )
    source = sources.make_source(cfg, "train")
    assert source._fused
    box = tf.constant([5, 7, 30, 20])
    for i in range(6):
        item = source.tf_lookup(tf.constant(i, tf.int64))
        full, label = item["image"].numpy(), int(item["label"])
        crop = source.tf_lookup_crop(tf.constant(i, tf.int64), lambda h, w: box)
        assert int(crop["label"]) == label
        diff = np.abs(crop["image"].numpy().astype(int) - full[5:35, 7:27])
        # 4:2:0 chroma next to the box edge may differ slightly (see sources.decode_crop).
        assert diff.mean() < 1.0 and diff.max() <= 12
