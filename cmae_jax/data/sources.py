"""Random-access data sources: a dataset index maps to one example inside tf.data.

Every source implements the `Source` protocol: `num_examples`, `channels`, `fallible`,
`tf_lookup(index) -> {'image': uint8 [H, W, C], 'label': int32 []}` and
`tf_lookup_crop(index, box_fn)`, which returns only the box `box_fn(H, W)` of the image so
that JPEG sources can decode just that part. Because examples are fetched by index, the
epoch order, the per-example randomness and the resume position are all pure functions of
(seed, epoch, index), independent of how files are sharded.

Implementations:
  * `InMemorySource`: numpy arrays held once as TF tensors; lookup is a `tf.gather`, all in
    the TF graph, no Python per example. Used for Fashion-MNIST (IDX files) and small
    fixed-shape TFDS datasets.
  * `ImageFolderSource`: FOLDER/SPLIT/CLASS/FILE.{jpg,jpeg,png}, one sub-folder per class
    (class index = position in the sorted folder names), like torchvision's ImageFolder.
    The sorted (path, label) list is held in memory; `tf_lookup` reads one file with
    `tf.io.read_file` (local or gs://) and decodes it in the graph, JPEGs with the fused
    `decode_and_crop_jpeg` (only the master crop's DCT blocks are decoded).
  * `TfdsArrayRecordSource`: a TFDS dataset prepared in the ArrayRecord format (random
    access on disk). The record bytes are read with `tf.numpy_function` (Python, holds the
    GIL, one record per call) and parsed + decoded in the TF graph, JPEG images with the
    same fused decode and crop. Trade-off: this keeps the exact, index-based, resumable
    pipeline for ImageNet-size data without holding it in memory, at the price of a Python
    call per example, which limits the throughput on many-core hosts; ImageFolder has no
    such call. A batched reader (`__getitems__`) or Grain is the later upgrade here; the
    `Source` protocol does not change for it.
  * `SyntheticSource`: generated images without any I/O or decoding, for benchmarks only
    (not selectable by config.dataset.name).

File and record sources are `fallible`: a corrupt or truncated file makes its lookup fail,
and the pipeline replaces that example (see `pipeline.py`) instead of stopping.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import tensorflow as tf
from absl import logging

from cmae_jax.data import views

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"): big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Fashion-MNIST's label names, in label order (zalandoresearch/fashion-mnist, README).
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

DATASET_NAMES = ("fashion_mnist", "tfds", "imagefolder")

# File name endings (case-insensitive) that an ImageFolder source reads; ImageNet's are
# ".JPEG". The decoder goes by the bytes, not the name: a PNG named .jpg decodes fine.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Folder listings on gs:// cost one round trip each; a thread pool overlaps them.
_LISTING_THREADS = 32

BoxFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

# Above this many bytes a TFDS dataset is not copied into memory (the in-memory path also
# serialises the array into tf.data's graph, which has a 2 GiB protobuf limit).
_MAX_IN_MEMORY_BYTES = 1 << 30


class Source(Protocol):
    """A random-access dataset split that tf.data can index."""

    name: str
    # True when lookups read files or records that may be corrupt, so they can fail at run
    # time; the pipeline then guards every lookup (and replaces failed examples).
    fallible: bool
    # (H, W, C) when every image of the split has that shape and the split is one array in
    # memory (tf_lookup then also takes a vector of indices): the pipeline makes the views
    # a batch at a time (pipeline.batches_views); else None.
    image_shape: tuple[int, int, int] | None

    @property
    def num_examples(self) -> int: ...

    @property
    def channels(self) -> int: ...

    def tf_lookup(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
        """Returns {'image': uint8 [H, W, C], 'label': int32 []} for a scalar index."""
        ...

    def tf_lookup_crop(self, index: tf.Tensor, box_fn: BoxFn) -> dict[str, tf.Tensor]:
        """Like `tf_lookup`, but 'image' is only the box [y, x, h, w] = box_fn(H, W)."""
        ...

    def describe(self, index: int) -> str:
        """Names example `index` for log messages (a file path where there is one)."""
        ...


def decode_image(data: tf.Tensor, channels: int) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes to uint8 [H, W, channels] (first frame of a GIF)."""
    image = tf.io.decode_image(data, channels=channels, dtype=tf.uint8, expand_animations=False)
    return tf.ensure_shape(image, [None, None, channels])


def decode_crop(data: tf.Tensor, box_fn: BoxFn, channels: int) -> tf.Tensor:
    """Decodes only the box box_fn(H, W) of encoded image bytes, fused for JPEG.

    JPEG: the size comes from the header (`extract_jpeg_shape`) and `decode_and_crop_jpeg`
    decodes just the DCT blocks under the box. With chroma subsampling (4:2:0, most
    photos) the colour of pixels next to the box edge can differ from decode-then-slice,
    because the upsampling filter does not see the chroma outside the box; 4:4:4 and
    grayscale JPEGs give identical pixels. Other formats: full decode, then slice.
    """

    def jpeg() -> tf.Tensor:
        shape = tf.image.extract_jpeg_shape(data)
        return tf.image.decode_and_crop_jpeg(data, box_fn(shape[0], shape[1]), channels=channels)

    def other() -> tf.Tensor:
        image = decode_image(data, channels)
        shape = tf.shape(image)
        return views.crop_image(image, box_fn(shape[0], shape[1]))

    crop = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    return tf.ensure_shape(crop, [None, None, channels])


def _crop_of(item: dict[str, tf.Tensor], box_fn: BoxFn) -> dict[str, tf.Tensor]:
    shape = tf.shape(item["image"])
    return {**item, "image": views.crop_image(item["image"], box_fn(shape[0], shape[1]))}


@dataclasses.dataclass(frozen=True, eq=False)
class InMemorySource:
    """A whole split held in memory: uint8 images [N, H, W, C] and int32 labels [N]."""

    images: np.ndarray
    labels: np.ndarray
    name: str
    fallible = False

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"{self.name}: images must be uint8 [N, H, W, C], got {self.images.dtype} "
                f"{self.images.shape}"
            )
        labels = np.asarray(self.labels)
        if labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"{self.name}: labels shape {labels.shape} does not match "
                f"{self.images.shape[0]} images"
            )
        object.__setattr__(self, "labels", labels.astype(np.int32))

    @property
    def num_examples(self) -> int:
        """Number of examples in the split."""
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        """Number of image channels."""
        return int(self.images.shape[-1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(int(d) for d in self.images.shape[1:])

    @functools.cached_property
    def _tensors(self) -> tuple[tf.Tensor, tf.Tensor]:
        # init_scope: create eager tensors even when first touched while tf.data traces a
        # map function, so the arrays are captured by reference rather than baked into
        # that function's graph as constants.
        with tf.init_scope():
            return tf.convert_to_tensor(self.images), tf.convert_to_tensor(self.labels)

    def tf_lookup(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
        """Returns {'image': uint8 [H, W, C], 'label': int32 []} for a scalar index
        (a leading axis for a vector of indices)."""
        images, labels = self._tensors
        return {"image": tf.gather(images, index), "label": tf.gather(labels, index)}

    def tf_lookup_crop(self, index: tf.Tensor, box_fn: BoxFn) -> dict[str, tf.Tensor]:
        """Like `tf_lookup`, but 'image' is only the box [y, x, h, w] = box_fn(H, W)."""
        return _crop_of(self.tf_lookup(index), box_fn)

    def describe(self, index: int) -> str:
        """Names example `index` for log messages."""
        return f"{self.name} example {index}"


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticSource:
    """Generated uint8 images, no I/O and no decoding: isolates augmentation in benchmarks.

    Image i is a cheap smooth pattern that depends on i (not a natural image), computed
    only inside the requested crop; labels are i % 1000.
    """

    num_examples: int
    height: int
    width: int
    channels: int = 3
    name: str = "synthetic"
    fallible = False
    image_shape = None  # it computes only the crop's pixels: views per example

    def _pattern(self, index: tf.Tensor, box: tf.Tensor) -> dict[str, tf.Tensor]:
        # Only the pixels of the box are computed, so the cost does not grow with H x W.
        index = tf.cast(index, tf.int32)
        rows = (box[0] + tf.range(box[2]))[:, None, None] * (1 + index % 3)
        cols = (box[1] + tf.range(box[3]))[None, :, None] * 2
        planes = tf.range(self.channels)[None, None, :] * 85
        image = tf.cast((rows + cols + planes + index * 7) % 256, tf.uint8)
        return {"image": image, "label": index % 1000}

    def tf_lookup(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
        """Returns {'image': uint8 [H, W, C], 'label': int32 []} for a scalar index."""
        return self._pattern(index, tf.constant([0, 0, self.height, self.width]))

    def tf_lookup_crop(self, index: tf.Tensor, box_fn: BoxFn) -> dict[str, tf.Tensor]:
        """Like `tf_lookup`, but 'image' is only the box [y, x, h, w] = box_fn(H, W)."""
        box = tf.cast(box_fn(tf.constant(self.height), tf.constant(self.width)), tf.int32)
        return self._pattern(index, box)

    def describe(self, index: int) -> str:
        """Names example `index` for log messages."""
        return f"{self.name} example {index}"


class ImageFolderSource:
    """One split of an ImageFolder tree, FOLDER/SPLIT/CLASS/FILE, decoded to RGB.

    Built by `load_image_folder`; the examples are the image files sorted by (class folder
    name, file name), so index -> (file, label) is the same on every host and every run.
    Grayscale, CMYK and RGBA files are converted to 3 channels, like torchvision's loader.
    """

    fallible = True
    image_shape = None  # views are made per example
    channels = 3

    def __init__(
        self, root: str, class_names: Sequence[str], files: Sequence[str], labels: np.ndarray
    ) -> None:
        self.root = root
        self.class_names = list(class_names)
        self.files = list(files)  # relative to root: "CLASS/FILE"
        self.labels = np.asarray(labels, np.int32)
        self.name = f"imagefolder:{root}"
        if self.labels.shape != (len(self.files),):
            raise ValueError(f"{root}: {len(self.files)} files but labels {self.labels.shape}")

    @property
    def num_examples(self) -> int:
        """Number of image files in the split."""
        return len(self.files)

    @functools.cached_property
    def _tensors(self) -> tuple[tf.Tensor, tf.Tensor]:
        # Eager tensors, captured by reference (see InMemorySource): ImageNet's 1.28M paths
        # would not fit into a 2 GiB graph as constants. Relative paths keep them small.
        with tf.init_scope():
            return tf.constant(self.files), tf.constant(self.labels)

    def _read(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        files, labels = self._tensors
        path = tf.strings.join([self.root.rstrip("/") + "/", tf.gather(files, index)])
        return tf.io.read_file(path), tf.gather(labels, index)

    def tf_lookup(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
        """Returns {'image': uint8 [H, W, 3], 'label': int32 []}; fails on a corrupt file."""
        data, label = self._read(index)
        return {"image": decode_image(data, self.channels), "label": label}

    def tf_lookup_crop(self, index: tf.Tensor, box_fn: BoxFn) -> dict[str, tf.Tensor]:
        """Reads one file and decodes only the box box_fn(H, W) (fused for JPEG)."""
        data, label = self._read(index)
        return {"image": decode_crop(data, box_fn, self.channels), "label": label}

    def describe(self, index: int) -> str:
        """The path of example `index`."""
        return self.root.rstrip("/") + "/" + self.files[index]


class TfdsArrayRecordSource:
    """A TFDS split stored as ArrayRecord, read record by record (see module docstring)."""

    fallible = True
    image_shape = None  # views are made per example

    def __init__(
        self,
        builder: Any,
        split: str,
        *,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        import tensorflow_datasets as tfds

        self.name = f"{builder.info.name}:{split}"
        self._records = builder.as_data_source(
            split=split,
            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
        )
        self._features = builder.info.features
        self._image_key = image_key
        self._label_key = label_key
        image_shape = self._features[image_key].shape
        self._channels = int(image_shape[-1])
        self._num_examples = len(self._records)
        # Encoded uint8 images (e.g. imagenet2012's JPEGs) can be decoded with the crop
        # fused; other image features go through TFDS's own decoding.
        image_feature = self._features[image_key]
        self._fused = (
            isinstance(image_feature, tfds.features.Image)
            and image_feature.dtype == tf.uint8
            and not image_feature.use_colormap
            and self._channels in (1, 3)
        )
        self._parser = tfds.core.example_parser.ExampleParser(self._features.get_serialized_info())

    @property
    def num_examples(self) -> int:
        """Number of examples in the split."""
        return self._num_examples

    @property
    def channels(self) -> int:
        """Number of image channels."""
        return self._channels

    def _read(self, index: np.ndarray) -> np.ndarray:
        # An object array keeps the bytes intact (np.bytes_ would drop trailing NULs).
        return np.array(self._records[int(index)], dtype=object)

    def tf_lookup(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
        """Returns {'image': uint8 [H, W, C], 'label': int32 []} for a scalar index."""
        record = tf.numpy_function(self._read, [index], tf.string, stateful=False)
        record = tf.ensure_shape(record, [])
        example = self._features.deserialize_example(record)
        image = tf.ensure_shape(example[self._image_key], [None, None, self._channels])
        return {"image": image, "label": tf.cast(example[self._label_key], tf.int32)}

    def tf_lookup_crop(self, index: tf.Tensor, box_fn: BoxFn) -> dict[str, tf.Tensor]:
        """Like `tf_lookup`, but 'image' is only the box box_fn(H, W) (fused for JPEG)."""
        if not self._fused:
            return _crop_of(self.tf_lookup(index), box_fn)
        record = tf.numpy_function(self._read, [index], tf.string, stateful=False)
        raw = self._parser.parse_example(tf.ensure_shape(record, []))
        label = self._features[self._label_key].decode_example(raw[self._label_key])
        return {
            "image": decode_crop(raw[self._image_key], box_fn, self._channels),
            "label": tf.cast(label, tf.int32),
        }

    def describe(self, index: int) -> str:
        """Names example `index` for log messages (the TFDS split and record number)."""
        return f"{self.name} record {index}"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (raw or gzip-compressed) into a native-endian numpy array."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number must start with two 0 bytes)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{type_code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX file with 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX header says {dims} x {dtype.itemsize} bytes = {expected} bytes of "
            f"data, the file has {len(data) - header}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _find_idx_file(idx_dir: str, stem: str) -> str | None:
    for candidate in (stem + ".gz", stem):
        path = os.path.join(idx_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def _missing_fashion_mnist_error(missing: str, idx_dir: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Fashion-MNIST IDX file {os.path.join(idx_dir, missing)}(.gz) not found "
        f"(config.dataset.idx_dir={idx_dir!r}). Fix: apt-get install dataset-fashion-mnist "
        "(Debian) or pass --config.dataset.idx_dir=FOLDER with the four IDX files, or "
        "--config.dataset.allow_tfds_download=True."
    )


def _fashion_mnist_paths(idx_dir: str, split: str) -> tuple[str, str]:
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(
            f"Fashion-MNIST has splits {sorted(_FASHION_MNIST_FILES)}, got {split!r} "
            "(config.dataset.train_split / config.dataset.eval_split)"
        )
    paths = []
    for stem in _FASHION_MNIST_FILES[split]:
        path = _find_idx_file(idx_dir, stem)
        if path is None:
            raise _missing_fashion_mnist_error(stem, idx_dir)
        paths.append(path)
    return paths[0], paths[1]


def load_fashion_mnist(idx_dir: str, split: str) -> InMemorySource:
    """Loads a Fashion-MNIST split ('train' or 'test') from IDX files; images [N, 28, 28, 1]."""
    images_path, labels_path = _fashion_mnist_paths(idx_dir, split)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected uint8 [N, H, W], got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{labels_path}: expected {images.shape[0]} labels, got shape {labels.shape}"
        )
    return InMemorySource(images[..., None], labels.astype(np.int32), f"fashion_mnist:{split}")


def _tfds_builder(name: str, data_dir: str | None) -> Any:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (config.dataset.tfds_name) is neither a registered TFDS "
            f"dataset nor prepared under data_dir={data_dir!r} (config.dataset.data_dir): "
            f"{str(e).splitlines()[0]}"
        ) from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared under {builder.data_dir} "
            f"(config.dataset.data_dir={data_dir!r}). Fix: run `tfds build {name} "
            "--file_format=array_record --data_dir=DIR` (or "
            "builder.download_and_prepare(file_format='array_record')) and pass "
            "--config.dataset.data_dir=DIR."
        )
    return builder


def _check_tfds_split(builder: Any, split: str) -> None:
    base = split.split("[")[0]
    if base not in builder.info.splits:
        raise ValueError(
            f"TFDS dataset {builder.info.name!r} has splits {sorted(builder.info.splits)}, "
            f"got {split!r} (config.dataset.train_split / config.dataset.eval_split)"
        )


def load_tfds(
    name: str,
    split: str,
    data_dir: str | None,
    *,
    image_key: str = "image",
    label_key: str = "label",
) -> Source:
    """Opens a prepared TFDS split for random access (ArrayRecord, else small in memory)."""
    import tensorflow_datasets as tfds

    builder = _tfds_builder(name, data_dir)
    _check_tfds_split(builder, split)
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" in formats:
        return TfdsArrayRecordSource(builder, split, image_key=image_key, label_key=label_key)

    image_shape = builder.info.features[image_key].shape
    num_examples = builder.info.splits[split].num_examples
    fixed_shape = all(d is not None for d in image_shape)
    if not fixed_shape or num_examples * int(np.prod(image_shape)) > _MAX_IN_MEMORY_BYTES:
        raise ValueError(
            f"TFDS dataset {name!r} is stored as {sorted(formats)} which has no random access, "
            "and it is too large (or its images vary in size) to load into memory. Fix: "
            f"convert it with `tfds convert_format --dataset_dir={builder.data_dir} "
            "--out_file_format=array_record`, or rebuild it with `tfds build "
            f"{name} --file_format=array_record`."
        )
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return InMemorySource(
        np.asarray(data[image_key], np.uint8),
        np.asarray(data[label_key], np.int32),
        f"{name}:{split}",
    )


def _is_image_file(name: str) -> bool:
    return not name.endswith("/") and name.lower().endswith(IMAGE_EXTENSIONS)


def _join(root: str, name: str) -> str:
    # "/" also for gs:// paths; os.path.join would be the same on Linux, this is explicit.
    return root.rstrip("/") + "/" + name


def _folder_layout(folder: str, split: str) -> str:
    return (
        f"expected {_join(folder or 'FOLDER', split)}/<class name>/<image>.jpg|.jpeg|.png, one "
        "sub-folder per class"
    )


def _split_root(folder: str | None, split: str) -> str:
    """FOLDER/SPLIT after checking both exist; raises FileNotFoundError naming the path."""
    if not folder:
        raise FileNotFoundError(
            "config.dataset.folder is not set (config.dataset.name='imagefolder'): "
            f"{_folder_layout('FOLDER', split)}. Fix: --config.dataset.folder=FOLDER."
        )
    if not tf.io.gfile.isdir(folder):
        raise FileNotFoundError(
            f"config.dataset.folder={folder!r} does not exist or is not a folder; "
            f"{_folder_layout(folder, split)}."
        )
    root = _join(folder, split)
    if not tf.io.gfile.isdir(root):
        found = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(folder))
        raise FileNotFoundError(
            f"config.dataset.folder={folder!r} has no split sub-folder {split!r} "
            f"(config.dataset.train_split / config.dataset.eval_split); it holds {found[:10]}"
            f"{' ...' if len(found) > 10 else ''}; {_folder_layout(folder, split)}."
        )
    return root


def _class_folders(root: str) -> list[str]:
    """Sorted names of the non-hidden sub-folders of `root`."""
    names = [n.rstrip("/") for n in tf.io.gfile.listdir(root)]
    names = [n for n in names if n and not n.startswith(".")]
    with concurrent.futures.ThreadPoolExecutor(_LISTING_THREADS) as pool:
        is_dir = list(pool.map(lambda n: tf.io.gfile.isdir(_join(root, n)), names))
    return sorted(n for n, d in zip(names, is_dir, strict=True) if d)


def _no_images_error(root: str, folder: str, split: str, classes: list[str]) -> FileNotFoundError:
    what = (
        f"has {len(classes)} class sub-folder(s) but none holds .jpg/.jpeg/.png files"
        if classes
        else "has no class sub-folders with .jpg/.jpeg/.png files"
    )
    return FileNotFoundError(
        f"{root} (config.dataset.folder={folder!r}, split {split!r}) {what}; "
        f"{_folder_layout(folder, split)}."
    )


def load_image_folder(folder: str, split: str) -> ImageFolderSource:
    """Lists FOLDER/SPLIT/CLASS/*.{jpg,jpeg,png} into an `ImageFolderSource`."""
    root = _split_root(folder, split)
    classes = _class_folders(root)

    def image_files(class_name: str) -> list[str]:
        return sorted(n for n in tf.io.gfile.listdir(_join(root, class_name)) if _is_image_file(n))

    with concurrent.futures.ThreadPoolExecutor(_LISTING_THREADS) as pool:
        per_class = list(pool.map(image_files, classes))
    files = [f"{c}/{n}" for c, names in zip(classes, per_class, strict=True) for n in names]
    if not files:
        raise _no_images_error(root, folder, split, classes)
    empty = [c for c, names in zip(classes, per_class, strict=True) if not names]
    if empty:
        # Kept as classes so that the label of every other folder stays the same as in
        # the other splits.
        logging.warning(
            "%s: %d class folder(s) without images, e.g. %s", root, len(empty), empty[:5]
        )
    labels = np.repeat(np.arange(len(classes), dtype=np.int32), [len(n) for n in per_class])
    return ImageFolderSource(root, classes, files, labels)


def _check_image_folder(dataset_cfg: Any, splits: Sequence[str]) -> None:
    """Checks the split folders and their classes, listing only until one image is found."""
    folder = dataset_cfg.get("folder", None)
    class_lists = {}
    for split in dict.fromkeys(splits):
        root = _split_root(folder, split)
        classes = _class_folders(root)
        if not any(
            any(_is_image_file(n) for n in tf.io.gfile.listdir(_join(root, c))) for c in classes
        ):
            raise _no_images_error(root, folder, split, classes)
        class_lists[split] = classes
    (first, first_classes), *others = class_lists.items()
    for split, classes in others:
        if classes != first_classes:
            only_first = sorted(set(first_classes) - set(classes))[:5]
            only_other = sorted(set(classes) - set(first_classes))[:5]
            raise ValueError(
                f"config.dataset.folder={folder!r}: splits {first!r} and {split!r} have "
                f"different class folders ({len(first_classes)} vs {len(classes)}; only in "
                f"{first!r}: {only_first}, only in {split!r}: {only_other}), so the same "
                "label would name different classes. Fix: give both the same class folders."
            )
    num_classes = dataset_cfg.get("num_classes", None)
    if num_classes is not None and len(first_classes) > num_classes:
        raise ValueError(
            f"config.dataset.folder={folder!r} has {len(first_classes)} class folders but "
            f"config.dataset.num_classes={num_classes}. Fix: "
            f"--config.dataset.num_classes={len(first_classes)}."
        )


def _fashion_mnist_available(idx_dir: str) -> str | None:
    """Returns the first missing IDX stem, or None when all four files exist."""
    for stems in _FASHION_MNIST_FILES.values():
        for stem in stems:
            if _find_idx_file(idx_dir, stem) is None:
                return stem
    return None


def fashion_mnist_origin(dataset_cfg: Any) -> str:
    """Where Fashion-MNIST is read from: 'idx' (config.dataset.idx_dir holds all four files)
    or 'tfds' (a TFDS download, allowed by config.dataset.allow_tfds_download); raises the
    error that names the fix when neither."""
    missing = _fashion_mnist_available(dataset_cfg.idx_dir)
    if missing is None:
        return "idx"
    if dataset_cfg.get("allow_tfds_download", False):
        return "tfds"
    raise _missing_fashion_mnist_error(missing, dataset_cfg.idx_dir)


def _unknown_dataset_error(name: str) -> ValueError:
    return ValueError(
        f"Unknown dataset {name!r} (config.dataset.name); allowed values: {list(DATASET_NAMES)}"
    )


def make_source(dataset_cfg: Any, split: str) -> Source:
    """Builds the random-access source for `split` as described by `config.dataset`."""
    name = dataset_cfg.name
    if name == "fashion_mnist":
        if fashion_mnist_origin(dataset_cfg) == "idx":
            return load_fashion_mnist(dataset_cfg.idx_dir, split)
        import tensorflow_datasets as tfds

        data = tfds.load(
            "fashion_mnist",
            split=split,
            batch_size=-1,
            data_dir=dataset_cfg.get("data_dir", None),
            download=True,
            as_supervised=False,
        )
        data = tfds.as_numpy(data)
        return InMemorySource(
            np.asarray(data["image"], np.uint8),
            np.asarray(data["label"], np.int32),
            f"fashion_mnist:{split}",
        )
    if name == "tfds":
        return load_tfds(dataset_cfg.tfds_name, split, dataset_cfg.get("data_dir", None))
    if name == "imagefolder":
        return load_image_folder(dataset_cfg.get("folder", None), split)
    raise _unknown_dataset_error(name)


def check_source_available(dataset_cfg: Any) -> None:
    """Checks that the configured data exists, without reading it; raises with the fix."""
    name = dataset_cfg.name
    splits = (dataset_cfg.get("train_split", "train"), dataset_cfg.get("eval_split", "test"))
    if name == "fashion_mnist":
        for split in splits:
            if split not in _FASHION_MNIST_FILES:
                raise ValueError(
                    f"Fashion-MNIST has splits {sorted(_FASHION_MNIST_FILES)}, got {split!r} "
                    "(config.dataset.train_split / config.dataset.eval_split)"
                )
        fashion_mnist_origin(dataset_cfg)
        return
    if name == "tfds":
        builder = _tfds_builder(dataset_cfg.tfds_name, dataset_cfg.get("data_dir", None))
        for split in splits:
            _check_tfds_split(builder, split)
        return
    if name == "imagefolder":
        _check_image_folder(dataset_cfg, splits)
        return
    raise _unknown_dataset_error(name)
