"""Input pipeline throughput: CMAE two-view batches per second per CPU core.

Measures, on a folder of JPEG files (generated unless --folder is given):
  * our tf.data pipeline (`cmae_jax.data.pipeline.train_dataset` on an ImageFolder source:
    fused JPEG decode + crop, views, colour augmentation, masks), pinned to 1 core and on
    all the cores this process may use;
  * the same pipeline with a full decode before the crop (no `decode_and_crop_jpeg`) and on
    a synthetic source (no file, no decode), to show where the time goes;
  * a straightforward PIL + NumPy implementation of the same views and masks in one Python
    process pinned to 1 core (PIL decode, RandomResizedCrop with bicubic resize, flip,
    top-left and shifted crops, colour jitter / grayscale / blur with ImageEnhance and
    ImageFilter, block mask with NumPy);
and prints batches and images per second, per core, and the ratio to PIL.

"Per core" divides by the CPU time the process used (all its threads), so it is robust
to other work on a shared machine; wall-clock rates are printed too. Each measurement
runs in a fresh process restricted to its cores (sched_setaffinity) before TF starts.

    python benchmarks/input_pipeline.py                       # 256 generated 300x400 JPEGs
    python benchmarks/input_pipeline.py --folder=/data/imagenet --split=train --batches=50
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------- files


def write_jpeg_folder(folder: str, num_images: int, height: int, width: int, classes: int) -> None:
    """Writes num_images photo-like JPEGs (smooth colour fields + grain, quality 90)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for i in range(num_images):
        # Low-frequency colour field plus sensor-like noise: file sizes near ImageNet's
        # (a random-noise JPEG would be several times larger and slower to decode).
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.float32)
        field = tf.image.resize(coarse, (height, width), method="bicubic").numpy()
        image = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        class_dir = os.path.join(folder, "train", f"class_{i % classes:03d}")
        os.makedirs(class_dir, exist_ok=True)
        data = tf.io.encode_jpeg(image, quality=90).numpy()
        with open(os.path.join(class_dir, f"img_{i:05d}.jpg"), "wb") as f:
            f.write(data)


# ----------------------------------------------------------------------------- tf.data


def pipeline_config(folder: str, split: str, args: argparse.Namespace) -> Any:
    """The CMAE ImageNet recipe (224 px, shift 31, block masks, colour aug) on the folder."""
    from cmae_jax import config_defaults

    config = config_defaults.base_config("cmae")
    config.dataset.name = "imagefolder"
    config.dataset.folder = folder
    config.dataset.train_split = split
    config.input.global_batch_size = args.batch_size
    config.input.image_size = args.image_size
    config.input.shift = args.shift
    return config


class FullDecode:
    """Wraps a source so that the master crop is cut after a full decode (no fusion)."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self.name, self.fallible, self.channels = source.name, source.fallible, source.channels
        self.num_examples = source.num_examples

    def tf_lookup_crop(self, index: Any, box_fn: Any) -> dict[str, Any]:
        """Decodes the whole image, then cuts the box."""
        import tensorflow as tf

        from cmae_jax.data import views

        item = self._source.tf_lookup(index)
        dims = tf.shape(item["image"])
        return {**item, "image": views.crop_image(item["image"], box_fn(dims[0], dims[1]))}

    def describe(self, index: int) -> str:
        """Names example `index`."""
        return self._source.describe(index)


def measure_tfdata(args: argparse.Namespace, variant: str) -> dict[str, float]:
    """Batches of the real train pipeline: warm up, then time `args.batches` of them."""
    from cmae_jax.data import pipeline, sources

    config = pipeline_config(args.folder, args.split, args)
    if variant == "synthetic":
        source = sources.SyntheticSource(args.num_images, args.height, args.width)
    else:
        source = sources.make_source(config.dataset, args.split)
        if variant == "full_decode":
            source = FullDecode(source)
    batches = pipeline.train_dataset(config, source, start_step=0).as_numpy_iterator()
    for _ in range(args.warmup):
        next(batches)
    return timed(lambda: next(batches), args.batches)


def timed(next_batch: Any, num_batches: int) -> dict[str, float]:
    """Wall and CPU seconds for `num_batches` calls of next_batch."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(num_batches):
        next_batch()
    return {
        "batches": num_batches,
        "wall_s": time.perf_counter() - wall,
        "cpu_s": cpu_seconds() - cpu,
    }


# ----------------------------------------------------------------------------- PIL


class PilViews:
    """The same CMAE views and block masks with PIL and NumPy, one image at a time."""

    def __init__(self, args: argparse.Namespace, files: list[str]) -> None:
        self.args = args
        self.files = files
        self.rng = np.random.default_rng(0)
        self.mean = np.asarray((0.485, 0.456, 0.406), np.float32)
        self.std = np.asarray((0.229, 0.224, 0.225), np.float32)
        self.position = 0

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """torchvision RandomResizedCrop.get_params: (top, left, h, w)."""
        area = width * height
        for _ in range(10):
            target = area * self.rng.uniform(0.2, 1.0)
            aspect = math.exp(self.rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return (
                    int(self.rng.integers(0, height - h + 1)),
                    int(self.rng.integers(0, width - w + 1)),
                    h,
                    w,
                )
        side = min(width, height)
        return (height - side) // 2, (width - side) // 2, side, side

    def jitter(self, image: Any) -> Any:
        """torchvision ColorJitter(0.4, 0.4, 0.4, 0.1) on a PIL image, random order."""
        from PIL import Image, ImageEnhance

        def hue(img: Any) -> Any:
            h, s, v = img.convert("HSV").split()
            shift = np.uint8(round(self.rng.uniform(-0.1, 0.1) * 255) % 256)
            h = Image.fromarray((np.asarray(h, np.uint8) + shift).astype(np.uint8), "L")
            return Image.merge("HSV", (h, s, v)).convert("RGB")

        ops = [
            lambda img: ImageEnhance.Brightness(img).enhance(self.rng.uniform(0.6, 1.4)),
            lambda img: ImageEnhance.Contrast(img).enhance(self.rng.uniform(0.6, 1.4)),
            lambda img: ImageEnhance.Color(img).enhance(self.rng.uniform(0.6, 1.4)),
            hue,
        ]
        for i in self.rng.permutation(4):
            image = ops[i](image)
        return image

    def block_mask(self, grid: int, block: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
        """Keeps int(C * (1 - ratio)) random block x block cells; sorted index arrays."""
        cells = (grid // block) ** 2
        keep = np.zeros(cells, bool)
        keep[self.rng.permutation(cells)[: int(cells * (1 - ratio))]] = True
        rows = np.arange(grid)[:, None] // block
        cols = np.arange(grid)[None, :] // block
        kept = keep[(rows * (grid // block) + cols).reshape(-1)]
        return np.nonzero(kept)[0].astype(np.int32), np.nonzero(~kept)[0].astype(np.int32)

    def example(self, path: str) -> dict[str, np.ndarray]:
        """Online view, target view and mask of one file."""
        from PIL import Image, ImageFilter

        size, shift = self.args.image_size, self.args.shift
        with Image.open(path) as f:
            image = f.convert("RGB")
        top, left, h, w = self.crop_box(*image.size)
        master = image.crop((left, top, left + w, top + h)).resize(
            (size + shift, size + shift), Image.BICUBIC
        )
        if self.rng.uniform() < 0.5:
            master = master.transpose(Image.FLIP_LEFT_RIGHT)
        online = master.crop((0, 0, size, size))
        dy, dx = self.rng.integers(0, shift + 1, 2)
        target = master.crop((dx, dy, dx + size, dy + size))
        if self.rng.uniform() < 0.8:
            target = self.jitter(target)
        if self.rng.uniform() < 0.2:
            target = target.convert("L").convert("RGB")
        if self.rng.uniform() < 0.5:
            target = target.filter(ImageFilter.GaussianBlur(radius=self.rng.uniform(0.1, 2.0)))
        ids_keep, ids_mask = self.block_mask(size // 16, 2, 0.65)
        return {
            "online": (np.asarray(online, np.float32) / 255 - self.mean) / self.std,
            "target": (np.asarray(target, np.float32) / 255 - self.mean) / self.std,
            "ids_keep": ids_keep,
            "ids_mask": ids_mask,
        }

    def batch(self) -> dict[str, np.ndarray]:
        """The next batch of args.batch_size examples, files in a cycle."""
        examples = []
        for _ in range(self.args.batch_size):
            examples.append(self.example(self.files[self.position % len(self.files)]))
            self.position += 1
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def measure_pil(args: argparse.Namespace) -> dict[str, float]:
    """The PIL + NumPy baseline on the same files."""
    from cmae_jax.data import sources

    source = sources.load_image_folder(args.folder, args.split)
    files = [source.describe(i) for i in range(source.num_examples)]
    np.random.default_rng(0).shuffle(files)
    views = PilViews(args, files)
    views.batch()  # warm-up: imports, page cache
    return timed(views.batch, args.pil_batches)


# ----------------------------------------------------------------------------- driver


def worker(args: argparse.Namespace) -> None:
    """Runs one measurement in this (fresh) process on `args.cores` cores; prints JSON."""
    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cores)
    result = measure_pil(args) if args.worker == "pil" else measure_tfdata(args, args.worker)
    result["cores"] = len(cores)
    print("RESULT " + json.dumps(result))


def run_worker(args: argparse.Namespace, kind: str, cores: int) -> dict[str, float]:
    """Starts `worker` in a child process and returns its result."""
    argv = [sys.executable, os.path.abspath(__file__), f"--worker={kind}", f"--cores={cores}"]
    for key in ("folder", "split", "batch_size", "image_size", "shift", "batches"):
        argv.append(f"--{key}={getattr(args, key)}")
    argv += [
        f"--warmup={args.warmup}",
        f"--pil_batches={args.pil_batches}",
        f"--num_images={args.num_images}",
        f"--height={args.height}",
        f"--width={args.width}",
    ]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{kind} on {cores} core(s) failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1][len("RESULT ") :])


def report(name: str, result: dict[str, float], batch_size: int) -> float:
    """Prints one row; returns batches per CPU-second."""
    per_cpu_s = result["batches"] / result["cpu_s"]
    wall = result["batches"] / result["wall_s"]
    print(
        f"{name:<44} {result['cores']:>5} {wall:>9.3f} {wall * batch_size:>9.1f} "
        f"{per_cpu_s:>11.3f} {per_cpu_s * batch_size:>11.1f}"
    )
    return per_cpu_s


def main() -> None:
    """Parses flags; generates the folder if needed; runs and prints every measurement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", default="", help="ImageFolder root; default: generate")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--height", type=int, default=300)
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--shift", type=int, default=31)
    parser.add_argument("--batches", type=int, default=12, help="timed tf.data batches")
    parser.add_argument("--warmup", type=int, default=3, help="tf.data batches before timing")
    parser.add_argument("--pil_batches", type=int, default=3, help="timed PIL batches")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory(prefix="cmae_bench_") as tmp:
        if not args.folder:
            args.folder = tmp
            args.split = "train"
            write_jpeg_folder(tmp, args.num_images, args.height, args.width, classes=4)
            sizes = [
                os.path.getsize(os.path.join(d, f))
                for d, _, fs in os.walk(os.path.join(tmp, "train"))
                for f in fs
            ]
            print(
                f"Generated {len(sizes)} JPEGs of {args.height}x{args.width} px, mean "
                f"{np.mean(sizes) / 1024:.0f} KiB, in {tmp}"
            )
        all_cores = len(os.sched_getaffinity(0))
        print(
            f"CMAE batches: {args.batch_size} x 2 views of {args.image_size} px (master "
            f"{args.image_size + args.shift}), block masks, colour augmentation; "
            f"{all_cores} core(s) available"
        )
        print(
            f"{'':<44} {'cores':>5} {'batch/s':>9} {'img/s':>9} "
            f"{'batch/cpu-s':>11} {'img/cpu-s':>11}"
        )
        rows = [
            ("tf.data, ImageFolder, fused decode+crop", "folder", 1),
            ("tf.data, ImageFolder, fused decode+crop", "folder", all_cores),
            ("tf.data, ImageFolder, full decode then crop", "full_decode", 1),
            ("tf.data, synthetic images (no decode)", "synthetic", 1),
            ("PIL + NumPy, one Python process", "pil", 1),
        ]
        rates = {}
        for name, kind, cores in dict.fromkeys(rows):  # one row when all_cores == 1
            rates[(kind, cores)] = report(name, run_worker(args, kind, cores), args.batch_size)
        pil = rates[("pil", 1)]
        print(
            f"Ratio tf.data / PIL per core: {rates[('folder', 1)] / pil:.1f}x on 1 core, "
            f"{rates[('folder', all_cores)] / pil:.1f}x per core on {all_cores} cores"
        )


if __name__ == "__main__":
    main()
