"""tf.data pipelines yielding numpy batches: an infinite, resumable train stream and eval.

Train stream (see the design notes): global step s covers positions [s*B, (s+1)*B) of
the epoch-order stream, epoch = position // (steps_per_epoch * B). Position q within epoch
e maps to dataset index index_shuffle(q; seed, e) (or q without shuffling); the views and
the mask of an example are pure functions of (config.seed, e, index). So a pipeline
started at `start_step` yields exactly what an uninterrupted one yields from that step on,
whatever the number of processes. Process p of P takes rows [p*B/P, (p+1)*B/P) of every
global batch. Each epoch drops the N mod B examples that its permutation puts last.

This module does not import JAX; the caller moves the numpy batches to devices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from cmae_jax.data import masking, views
from cmae_jax.data.sources import Source

# Sub-seed tags: shuffling and augmentation draw from separate streams of config.seed.
_SHUFFLE, _AUGMENT = 0, 1
_VIEWS, _MASK = 0, 1


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Training steps in one epoch; the last num_examples % global_batch_size are dropped."""
    return num_examples // global_batch_size


def normalize(images: Any, mean: Any, std: Any) -> Any:
    """(images - mean) / std per channel; works on TF tensors, numpy and JAX arrays."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (images - mean) / std


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


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def _check_input(config: Any, source: Source) -> tuple[int, int]:
    inp = config.input
    if inp.image_size % inp.patch_size:
        raise ValueError(
            f"config.input.image_size={inp.image_size} is not divisible by "
            f"config.input.patch_size={inp.patch_size}. Fix: make image_size a multiple of it."
        )
    if source.channels != inp.channels:
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
) -> tf.data.Dataset:
    """The infinite train stream of local batches, starting exactly at global `start_step`."""
    inp = config.input
    grid = _check_input(config, source)
    masking.mask_counts(grid, inp)  # fails early on a bad mask config
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

    root = _root_seed(config.seed)
    shuffle_root = tf.random.experimental.stateless_fold_in(root, _SHUFFLE)
    augment_root = tf.random.experimental.stateless_fold_in(root, _AUGMENT)
    shuffle = inp.get("shuffle", True)
    with_target = inp.target_view
    epoch_size = epoch_steps * global_batch
    row_offset = process_index * local_batch

    # Plain Python control flow on config values only: no AutoGraph conversion needed.
    @tf.autograph.experimental.do_not_convert
    def example(local_row: tf.Tensor) -> dict[str, tf.Tensor]:
        step = local_row // local_batch
        position = step * global_batch + row_offset + local_row % local_batch
        epoch = position // epoch_size
        in_epoch = position % epoch_size
        if shuffle:
            index = tf.random.experimental.index_shuffle(
                in_epoch,
                tf.random.experimental.stateless_fold_in(shuffle_root, epoch),
                tf.constant(num_examples - 1, tf.int64),
            )
        else:
            index = in_epoch
        seed = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(augment_root, epoch), index
        )
        item = source.tf_lookup(index)
        view_seed = tf.random.experimental.stateless_fold_in(seed, _VIEWS)
        out = {}
        if with_target:
            online, target = views.pixel_shift_views(item["image"], view_seed, inp)
            out["target"] = normalize(target, inp.mean, inp.std)
        else:
            online = views.online_view(item["image"], view_seed, inp)
        out["online"] = normalize(online, inp.mean, inp.std)
        ids_keep, ids_mask = masking.sample_mask(
            tf.random.experimental.stateless_fold_in(seed, _MASK), grid, inp
        )
        out["ids_keep"] = ids_keep
        out["ids_mask"] = ids_mask
        out["label"] = tf.cast(item["label"], tf.int32)
        out["index"] = tf.cast(index, tf.int32)
        return out

    ds = tf.data.Dataset.counter(start=start_step * local_batch, dtype=tf.int64)
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options())


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

    # Plain Python control flow on config values only: no AutoGraph conversion needed.
    @tf.autograph.experimental.do_not_convert
    def example(row: tf.Tensor) -> dict[str, tf.Tensor]:
        index = start + row
        valid = index < end
        item = source.tf_lookup(tf.minimum(index, num_examples - 1))
        image = views.eval_view(item["image"], inp.image_size, crop_fraction)
        return {
            "image": normalize(image, inp.mean, inp.std),
            "label": tf.where(valid, tf.cast(item["label"], tf.int32), -1),
            "valid": valid,
            "index": tf.cast(tf.where(valid, index, -1), tf.int32),
        }

    ds = tf.data.Dataset.range(num_batches * batch_size)
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options())
