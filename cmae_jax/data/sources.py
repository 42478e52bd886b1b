"""Random-access data sources: a dataset index maps to one example inside tf.data.

Every source implements the `Source` protocol: `num_examples`, `channels` and
`tf_lookup(index) -> {'image': uint8 [H, W, C], 'label': int32 []}`. Because examples are
fetched by index, the epoch order, the per-example randomness and the resume position are
all pure functions of (seed, epoch, index), independent of how files are sharded.

Two implementations:
  * `InMemorySource`: numpy arrays held once as TF tensors; lookup is a `tf.gather`, all in
    the TF graph, no Python per example. Used for Fashion-MNIST (IDX files) and small
    fixed-shape TFDS datasets.
  * `TfdsArrayRecordSource`: a TFDS dataset prepared in the ArrayRecord format (random
    access on disk). The record bytes are read with `tf.numpy_function` (Python, holds the
    GIL, one record per call) and parsed + decoded in the TF graph. Trade-off: this keeps
    the exact, index-based, resumable pipeline for ImageNet-size data without holding it
    in memory, at the price of a Python call per example, which limits the throughput on
    many-core hosts. A batched reader (`__getitems__`) or Grain is the later upgrade for
    ImageNet-scale throughput; the `Source` protocol does not change for it.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
from typing import Any, Protocol

import numpy as np
import tensorflow as tf

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"): big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

DATASET_NAMES = ("fashion_mnist", "tfds")

# Above this many bytes a TFDS dataset is not copied into memory (the in-memory path also
# serialises the array into tf.data's graph, which has a 2 GiB protobuf limit).
_MAX_IN_MEMORY_BYTES = 1 << 30


class Source(Protocol):
    """A random-access dataset split that tf.data can index."""

    name: str

    @property
    def num_examples(self) -> int: ...

    @property
    def channels(self) -> int: ...

    def tf_lookup(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
        """Returns {'image': uint8 [H, W, C], 'label': int32 []} for a scalar index."""
        ...


@dataclasses.dataclass(frozen=True, eq=False)
class InMemorySource:
    """A whole split held in memory: uint8 images [N, H, W, C] and int32 labels [N]."""

    images: np.ndarray
    labels: np.ndarray
    name: str

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

    @functools.cached_property
    def _tensors(self) -> tuple[tf.Tensor, tf.Tensor]:
        # init_scope: create eager tensors even when first touched while tf.data traces a
        # map function, so the arrays are captured by reference rather than baked into
        # that function's graph as constants.
        with tf.init_scope():
            return tf.convert_to_tensor(self.images), tf.convert_to_tensor(self.labels)

    def tf_lookup(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
        """Returns {'image': uint8 [H, W, C], 'label': int32 []} for a scalar index."""
        images, labels = self._tensors
        return {"image": tf.gather(images, index), "label": tf.gather(labels, index)}


class TfdsArrayRecordSource:
    """A TFDS split stored as ArrayRecord, read record by record (see module docstring)."""

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


def _fashion_mnist_available(idx_dir: str) -> str | None:
    """Returns the first missing IDX stem, or None when all four files exist."""
    for stems in _FASHION_MNIST_FILES.values():
        for stem in stems:
            if _find_idx_file(idx_dir, stem) is None:
                return stem
    return None


def _unknown_dataset_error(name: str) -> ValueError:
    return ValueError(
        f"Unknown dataset {name!r} (config.dataset.name); allowed values: {list(DATASET_NAMES)}"
    )


def make_source(dataset_cfg: Any, split: str) -> Source:
    """Builds the random-access source for `split` as described by `config.dataset`."""
    name = dataset_cfg.name
    if name == "fashion_mnist":
        idx_dir = dataset_cfg.idx_dir
        missing = _fashion_mnist_available(idx_dir)
        if missing is None:
            return load_fashion_mnist(idx_dir, split)
        if not dataset_cfg.get("allow_tfds_download", False):
            raise _missing_fashion_mnist_error(missing, idx_dir)
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
        missing = _fashion_mnist_available(dataset_cfg.idx_dir)
        if missing is not None and not dataset_cfg.get("allow_tfds_download", False):
            raise _missing_fashion_mnist_error(missing, dataset_cfg.idx_dir)
        return
    if name == "tfds":
        builder = _tfds_builder(dataset_cfg.tfds_name, dataset_cfg.get("data_dir", None))
        for split in splits:
            _check_tfds_split(builder, split)
        return
    raise _unknown_dataset_error(name)
