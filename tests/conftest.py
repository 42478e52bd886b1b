"""Shared fixtures: one JAX compilation cache for the whole session, and a small
Fashion-MNIST-format IDX folder for end-to-end runs."""

import gzip
import os

import numpy as np
import pytest

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# XLA's cheap CPU compilation, for this process and every process the suite starts: the
# suite's programs are tiny and most run a few steps, so compile time is what it spends, and
# unoptimised code compiles faster than it runs slower (tests/test_maect.py's staged run:
# 226 s with XLA's defaults, 162 s with these, side by side on 2026-12-03).
CHEAP_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(host_devices: int | None = None) -> str:
    """XLA_FLAGS for a process of the suite: cheap compilation and `host_devices` CPU devices."""
    devices = f" --xla_force_host_platform_device_count={host_devices}" if host_devices else ""
    return CHEAP_COMPILE_FLAGS + devices


# Read when JAX starts its backend, after this file is imported (pytest imports it first).
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags()}".strip()


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent compilation cache, empty at the start of the run, for it and its children.

    The suite compiles the same few tiny programs again and again: in this process (each
    run jits its step afresh) and in every `python -m cmae_jax.main`, notebook kernel and
    worker it starts. The environment reaches the children (cmae_jax.compilation_cache
    takes JAX_COMPILATION_CACHE_DIR over the default folder; a test that names its own
    folder keeps it); the threshold 0 stores even programs that compile in milliseconds.
    A cache hit loads the executable XLA compiled for the same program, flags and devices,
    so every bit-exactness test compares the same numbers as with compilation.
    """
    import jax

    # Under pytest-xdist the workers share one cache: the same tiny programs (test_train's
    # tiny_config above all) are compiled in many files, which the workers split between them.
    # JAX reads an entry another worker is still writing as an error, warns and compiles.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_root = tmp_path_factory.getbasetemp().parent  # shared by the run's workers
        folder = str(run_root / "jax_compilation_cache")
        os.makedirs(folder, exist_ok=True)
    else:
        folder = str(tmp_path_factory.mktemp("jax_compilation_cache"))
    settings = {
        "JAX_COMPILATION_CACHE_DIR": folder,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield folder
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def write_idx(path, array, type_code, compress):
    """Writes `array` as an IDX file (type 0x08 uint8, 0x0C int32, 0x0D float32)."""
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    dtype = {0x08: np.uint8, 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    data = header + np.asarray(array, dtype).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if compress else data)


def _class_images(labels, rng):
    # Synthetic stand-in when the Debian package is absent: one bright bar per class.
    images = rng.integers(0, 40, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 + 2 * y : 6 + 2 * y, 4:24] = 220
    return images


@pytest.fixture(scope="session")
def small_fashion_mnist(tmp_path_factory):
    """A folder of IDX files: 512 training and 128 test images (real ones when installed)."""
    folder = tmp_path_factory.mktemp("fashion_mnist_small")
    sizes = {"train": 512, "t10k": 128}
    if os.path.exists(os.path.join(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz")):
        from cmae_jax.data import sources

        for stem, n in sizes.items():
            images = sources.read_idx(
                os.path.join(DEBIAN_FASHION_MNIST, f"{stem}-images-idx3-ubyte.gz")
            )
            labels = sources.read_idx(
                os.path.join(DEBIAN_FASHION_MNIST, f"{stem}-labels-idx1-ubyte.gz")
            )
            write_idx(folder / f"{stem}-images-idx3-ubyte", images[:n], 0x08, compress=False)
            write_idx(folder / f"{stem}-labels-idx1-ubyte", labels[:n], 0x08, compress=False)
    else:
        rng = np.random.default_rng(0)
        for stem, n in sizes.items():
            labels = rng.integers(0, 10, size=n).astype(np.uint8)
            write_idx(folder / f"{stem}-images-idx3-ubyte", _class_images(labels, rng), 0x08, False)
            write_idx(folder / f"{stem}-labels-idx1-ubyte", labels, 0x08, compress=False)
    return str(folder)
