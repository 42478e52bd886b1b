"""tf.data pipelines yielding numpy batches: an infinite, resumable train stream and eval.

Train stream (see the design notes): global step s covers positions [s*B, (s+1)*B) of
the epoch-order stream, epoch = position // (steps_per_epoch * B). Position q within epoch
e maps to dataset index index_shuffle(q; seed, e) (or q without shuffling); the views and
the mask of an example are pure functions of (config.seed, e, index). So a pipeline
started at `start_step` yields exactly what an uninterrupted one yields from that step on,
whatever the number of processes. Process p of P takes rows [p*B/P, (p+1)*B/P) of every
global batch. Each epoch drops the N mod B examples that its permutation puts last.

Stages: position -> (index, seed) -> read + decode only the master crop (fused for JPEG,
parallel, `parallel_reads` in flight) -> views + mask (parallel map, AUTOTUNE) -> batch ->
prefetch, all with deterministic order. There is no file-level interleave: examples are
read by index (one file each for ImageFolder, random access into ArrayRecord for TFDS),
which is what makes the order, the sharding and the resume independent of files; the
parallel, ordered reads play its part.

Batched views (`batches_views`: in-memory splits whose images share one shape, such as
Fashion-MNIST): one element is a whole local batch. Its indices come from the same epoch
order; its random decisions are drawn for the whole global batch at once, from one seed
per global step, by the same draw functions (cmae_jax.data.views, with a leading axis of
examples), and the image ops run on the batch (cmae_jax.data.batched_views). An example's
views are then a function of (config.seed, epoch, step, row) instead of (config.seed,
epoch, index): the same in every process and on resume, from the same distribution, and
nothing runs per example (the per-example ops' launch costs were most of the demo's
input time).

Bad input: on file and record sources a lookup that fails (corrupt, truncated, unreadable
file) does not stop the stream. The example is replaced by the first readable of the next
few indices, keeping its place in the batch and its seed, and the batch row carries
corrupt=True; `SkipCounter` counts and logs these for the trainer. Which file replaces
which depends only on the files, so the stream stays exactly reproducible.

This module does not import JAX; the caller moves the numpy batches to devices.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from cmae_jax import methods
from cmae_jax.data import example_views, views
from cmae_jax.data.example_views import normalize
from cmae_jax.data.sources import Source

# Sub-seed tags: shuffling and augmentation (per example; per global batch where the
# views are batched) draw from separate streams of config.seed.
_SHUFFLE, _AUGMENT, _BATCH_AUGMENT = 0, 1, 2

# A corrupt example is replaced by the first readable of the next SUBSTITUTE_TRIES - 1
# indices (wrapping around); if none is, by a black image.
SUBSTITUTE_TRIES = 8


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Training steps in one epoch; the last num_examples % global_batch_size are dropped."""
    return num_examples // global_batch_size


def denormalize(images: Any, mean: Any, std: Any) -> Any:
    """Inverse of `normalize` (images * std + mean); works on TF tensors, numpy and JAX."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return images * std + mean


def _local_batch_size(global_batch_size: int, process_count: int, what: str) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"{what}={global_batch_size} must be divisible by the number of processes "
            f"({process_count}). Fix: choose a multiple of {process_count}."
        )
    return global_batch_size // process_count


def _root_seed(seed: int) -> tf.Tensor:
    return tf.constant([0, seed], tf.int64)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _options(input_cfg: Any) -> tf.data.Options:
    options = tf.data.Options()
    # Parallel stages still emit in input order: exact resume and fixed batch rows need it.
    options.deterministic = True
    # A pool of its own: eval or picture pipelines running at the same time, and TF ops
    # outside tf.data, do not take the train stream's threads.
    options.threading.private_threadpool_size = input_cfg.get("threadpool_size", 0) or (
        available_cores()
    )
    # Parallelism comes from many examples at once; one example's ops on several threads
    # only adds contention (the usual setting for TPU and GPU hosts).
    options.threading.max_intra_op_parallelism = 1
    opt = options.experimental_optimization
    opt.map_parallelization = True
    opt.parallel_batch = True
    opt.inject_prefetch = True
    options.autotune.enabled = True
    return options


def _parallel_reads(input_cfg: Any) -> int:
    # Reads from network storage (gs://) wait mostly on latency, so many more files are in
    # flight than there are cores.
    return input_cfg.get("parallel_reads", 0) or max(16, 4 * available_cores())


def _first_readable(
    fetch: Callable[[tf.Tensor], dict[str, tf.Tensor]],
    index: tf.Tensor,
    source: Source,
    num_tries: int,
) -> tf.data.Dataset:
    """One element: fetch(index), or on error the first readable of the next indices.

    The tries are a small dataset with `ignore_errors`, of which the first element is
    taken, so a good file is read once. When all `num_tries` fail the element is a black
    1 x 1 image with label -1. 'corrupt' is True unless the scheduled example was used.
    """
    num = source.num_examples
    # A sequential map (nested datasets are not parallelised): with take(1) below, the
    # next index is read only when the earlier ones failed.
    attempts = (
        tf.data.Dataset.range(num_tries)
        .map(lambda offset: {**fetch((index + offset) % num), "offset": offset})
        .ignore_errors()
    )
    fallback = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros([1, 1, source.channels], tf.uint8),
            "label": tf.constant(-1, tf.int32),
            "offset": tf.constant(num_tries, tf.int64),
        }
    )
    attempts = attempts.concatenate(fallback)
    return attempts.take(1).map(
        lambda item: {
            "image": item["image"],
            "label": tf.cast(item["label"], tf.int32),
            "corrupt": item["offset"] > 0,
        }
    )


def _fetch_all(
    ds: tf.data.Dataset,
    source: Source,
    fetch: Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]],
    input_cfg: Any,
    *,
    substitutes: bool = True,
) -> tf.data.Dataset:
    """Adds 'image', 'label' and 'corrupt' to every element, guarded for fallible sources.

    fetch(element, index) looks up `index` for `element`; without `substitutes` a failed
    lookup yields the black image at once (evaluation drops it rather than replace it).
    """
    if not source.fallible:
        return ds.map(
            lambda el: {**el, **fetch(el, el["index"]), "corrupt": tf.constant(False)},
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    # tf.data has no try/except inside a map, and `ignore_errors` on the stream would drop
    # the example and shift every later batch row. So each example becomes a one-element
    # dataset that cannot fail (`_first_readable`); a deterministic parallel interleave
    # over those keeps the input order, since each yields exactly one element.
    def guarded(el: dict[str, tf.Tensor]) -> tf.data.Dataset:
        num_tries = SUBSTITUTE_TRIES if substitutes else 1
        item = _first_readable(lambda i: fetch(el, i), el["index"], source, num_tries)
        return item.map(lambda it: {**el, **it})

    return ds.interleave(
        guarded,
        cycle_length=_parallel_reads(input_cfg),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def _check_input(config: Any, source: Source) -> tuple[int, int]:
    inp = config.input
    if inp.image_size % inp.patch_size:
        raise ValueError(
            f"config.input.image_size={inp.image_size} is not divisible by "
            f"config.input.patch_size={inp.patch_size}. Fix: make image_size a multiple of it."
        )
    grey_on_rgb = source.channels == 1 and inp.channels == 3  # repeated by `normalize`
    if source.channels != inp.channels and not grey_on_rgb:
        raise ValueError(
            f"config.input.channels={inp.channels} but {source.name} has {source.channels} "
            f"channel(s). Fix: pass --config.input.channels={source.channels}."
        )
    if len(inp.mean) != inp.channels or len(inp.std) != inp.channels:
        raise ValueError(
            f"config.input.mean / config.input.std need {inp.channels} value(s) (one per "
            f"channel), got {len(inp.mean)} / {len(inp.std)}."
        )
    grid = inp.image_size // inp.patch_size
    return grid, grid


def train_dataset(
    config: Any,
    source: Source,
    *,
    start_step: int,
    process_index: int = 0,
    process_count: int = 1,
    views: example_views.ExampleViews | None = None,
    view_fn: Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]] | None = None,
) -> tf.data.Dataset:
    """The infinite train stream of local batches, starting exactly at global `start_step`.

    index -> fetch -> the view function -> batch. The view function is `views`, else the
    one of the step that trains `config` (its method's, cmae_jax.methods.step_for), whose
    batch_spec the columns must match. `view_fn(image, seed)` (whole uint8 image, view
    seed) replaces it with an evaluation's views, e.g. the augmented, normalised image of
    the linear probe or of fine-tuning. Every example also carries label, index, corrupt.
    """
    inp = config.input
    _check_input(config, source)
    global_batch = inp.global_batch_size
    local_batch = _local_batch_size(global_batch, process_count, "config.input.global_batch_size")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    num_examples = source.num_examples
    epoch_steps = steps_per_epoch(num_examples, global_batch)
    if epoch_steps == 0:
        raise ValueError(
            f"config.input.global_batch_size={global_batch} exceeds the {num_examples} "
            f"examples of {source.name}. Fix: use a smaller global batch."
        )
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    spec = None
    if view_fn is not None:
        views = example_views.from_view_fn(view_fn)
    elif views is None:
        step = methods.step_for(config)
        views, spec = step.views(config), step.batch_spec(config)

    root = _root_seed(config.seed)
    shuffle_root = tf.random.experimental.stateless_fold_in(root, _SHUFFLE)
    augment_root = tf.random.experimental.stateless_fold_in(root, _AUGMENT)
    shuffle = inp.get("shuffle", True)
    epoch_size = epoch_steps * global_batch
    row_offset = process_index * local_batch

    def index_in_epoch(in_epoch: tf.Tensor, epoch: tf.Tensor) -> tf.Tensor:
        """The dataset index at these positions (scalar or vector) of this epoch's order."""
        if not shuffle:
            return in_epoch
        return tf.random.experimental.index_shuffle(
            in_epoch,
            tf.random.experimental.stateless_fold_in(shuffle_root, epoch),
            tf.constant(num_examples - 1, tf.int64),
        )

    # Plain Python control flow on config values only: no AutoGraph conversion needed.
    @tf.autograph.experimental.do_not_convert
    def locate(local_row: tf.Tensor) -> dict[str, tf.Tensor]:
        step = local_row // local_batch
        position = step * global_batch + row_offset + local_row % local_batch
        epoch = position // epoch_size
        index = index_in_epoch(position % epoch_size, epoch)
        seed = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(augment_root, epoch), index
        )
        return {"index": index, "seed": seed}

    # A crop box depends on the image size, so the source cuts it while decoding (fused
    # for JPEG). A substitute for a corrupt file gets the scheduled example's seed.
    @tf.autograph.experimental.do_not_convert
    def fetch(el: dict[str, tf.Tensor], index: tf.Tensor) -> dict[str, tf.Tensor]:
        if views.crop_box is None:
            return source.tf_lookup_crop(index, lambda h, w: tf.stack([0, 0, h, w]))
        return source.tf_lookup_crop(index, lambda h, w: views.crop_box(el["seed"], h, w))

    @tf.autograph.experimental.do_not_convert
    def make_views(el: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {
            **views.columns(el["image"], el["seed"]),
            "label": tf.cast(el["label"], tf.int32),
            "index": tf.cast(el["index"], tf.int32),
            "corrupt": el["corrupt"],
        }

    if batches_views(inp, source, views):
        # One element per local batch: the global batch's indices and random decisions
        # drawn at once (so every process draws the same), this process's rows kept, the
        # image ops on the whole batch (batched_views). Nothing runs per example.
        batch_root = tf.random.experimental.stateless_fold_in(root, _BATCH_AUGMENT)
        image_shape = source.image_shape

        @tf.autograph.experimental.do_not_convert
        def make_batch(step: tf.Tensor) -> dict[str, tf.Tensor]:
            positions = step * global_batch + tf.range(global_batch, dtype=tf.int64)
            epoch = step // epoch_steps  # a global batch never spans two epochs
            index = index_in_epoch(positions % epoch_size, epoch)
            seed = tf.random.experimental.stateless_fold_in(
                tf.random.experimental.stateless_fold_in(batch_root, epoch), step
            )
            rows = slice(row_offset, row_offset + local_batch)
            draws = {
                k: v[rows] for k, v in views.batched.draws(seed, global_batch, image_shape).items()
            }
            item = source.tf_lookup(index[rows])
            return {
                **views.batched.columns({**draws, "image": item["image"]}),
                "label": tf.cast(item["label"], tf.int32),
                "index": tf.cast(index[rows], tf.int32),
                "corrupt": tf.zeros([local_batch], tf.bool),
            }

        ds = tf.data.Dataset.counter(start=start_step, dtype=tf.int64)
        ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        example_spec = {k: tf.TensorSpec(v.shape[1:], v.dtype) for k, v in ds.element_spec.items()}
    else:
        ds = tf.data.Dataset.counter(start=start_step * local_batch, dtype=tf.int64)
        ds = ds.map(locate, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = _fetch_all(ds, source, fetch, inp)
        ds = ds.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        example_spec = ds.element_spec
        ds = ds.batch(
            local_batch,
            drop_remainder=True,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    if spec is not None:
        _check_columns(example_spec, spec, views.name)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(inp))


def in_memory_batches(input_cfg: Any, source: Source) -> bool:
    """Whether the pipeline can make its views a batch at a time from `source`: its images
    share one shape in memory (Source.image_shape: Fashion-MNIST, small TFDS splits; so no
    lookup can fail) and config.input.batched_views is on."""
    return input_cfg.get("batched_views", True) and getattr(source, "image_shape", None) is not None


def batches_views(input_cfg: Any, source: Source, views: example_views.ExampleViews) -> bool:
    """Whether the train stream makes its views a batch at a time (module docstring): where
    the view function has a batched form and `in_memory_batches` holds."""
    return views.batched is not None and in_memory_batches(input_cfg, source)


def _check_columns(element_spec: dict[str, tf.TensorSpec], batch_spec: dict, name: str) -> None:
    """Refuses a view function whose columns differ from its step's batch_spec."""
    made = {k: (tuple(v.shape), v.dtype.name) for k, v in element_spec.items() if k != "corrupt"}
    declared = {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in batch_spec.items()}
    if made != declared:
        raise ValueError(
            f"The {name} yields {made} per example but its step's batch_spec declares "
            f"{declared}. Fix the method module so that the two agree."
        )


def eval_steps(num_examples: int, batch_size: int, process_count: int = 1) -> int:
    """Number of (padded) eval batches each process yields; equal for all processes."""
    per_process = -(-num_examples // process_count)
    return -(-per_process // batch_size)


def eval_dataset(
    config: Any,
    source: Source,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """Every example once, in order, no augmentation; local batches padded with 'valid'.

    Process p reads the contiguous slice [p*ceil(N/P), (p+1)*ceil(N/P)) of the split. All
    processes yield `eval_steps(...)` batches of `batch_size` (the local batch size);
    padding rows hold some real image (finite values) with valid=False, label=-1, index=-1.
    Unreadable files (fallible sources) are marked the same way, so k-NN skips them.
    """
    inp = config.input
    _check_input(config, source)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    num_examples = source.num_examples
    per_process = -(-num_examples // process_count)
    num_batches = eval_steps(num_examples, batch_size, process_count)
    start = process_index * per_process
    end = min(start + per_process, num_examples)
    crop_fraction = inp.get("eval_crop_fraction", 1.0)

    @tf.autograph.experimental.do_not_convert
    def locate(row: tf.Tensor) -> dict[str, tf.Tensor]:
        index = start + row
        return {"index": tf.minimum(index, num_examples - 1), "valid": index < end}

    def fetch(el: dict[str, tf.Tensor], index: tf.Tensor) -> dict[str, tf.Tensor]:
        del el
        return source.tf_lookup(index)

    @tf.autograph.experimental.do_not_convert
    def finish(el: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        # An unreadable file has no substitute here: it is left out of the evaluation.
        valid = el["valid"] & ~el["corrupt"]
        image = views.eval_view(el["image"], inp.image_size, crop_fraction)
        return {
            "image": normalize(image, inp.mean, inp.std),
            "label": tf.where(valid, tf.cast(el["label"], tf.int32), -1),
            "valid": valid,
            "index": tf.cast(tf.where(valid, el["index"], -1), tf.int32),
        }

    @tf.autograph.experimental.do_not_convert
    def make_batch(batch: tf.Tensor) -> dict[str, tf.Tensor]:
        rows = batch * batch_size + tf.range(batch_size, dtype=tf.int64)
        item = {**locate(rows), "corrupt": tf.zeros([batch_size], tf.bool)}
        return finish({**item, **source.tf_lookup(item["index"])})

    if in_memory_batches(inp, source):
        # One element per batch, the view made on the whole batch: per example, the
        # tf.data ops cost the demo's evaluation about half its encoder's forward pass.
        ds = tf.data.Dataset.range(num_batches)
        ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = tf.data.Dataset.range(num_batches * batch_size)
        ds = ds.map(locate, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = _fetch_all(ds, source, fetch, inp, substitutes=False)
        ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(
            batch_size, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(inp))


class SkipCounter:
    """Wraps the numpy train batches: removes 'corrupt', counts and logs the skipped files.

    `skipped` counts the rows of this process whose scheduled file could not be read or
    decoded since this iterator started (each visit counts: a bad file is met once per
    epoch). The first `max_logged` distinct files are logged by name (`Source.describe`).
    """

    def __init__(
        self, batches: Iterator[dict[str, np.ndarray]], source: Source, max_logged: int = 100
    ) -> None:
        self._batches = batches
        self._source = source
        self._max_logged = max_logged
        self._logged: set[int] = set()
        self.skipped = 0

    def __iter__(self) -> SkipCounter:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._batches))
        corrupt = batch.pop("corrupt")
        for index in batch["index"][corrupt].tolist():
            self.skipped += 1
            if len(self._logged) < self._max_logged and index not in self._logged:
                self._logged.add(index)
                logging.warning(
                    "Skipped an unreadable example (replaced by the next readable one): %s",
                    self._source.describe(index),
                )
        return batch
