"""Per-example view functions: what a method's batch holds for one example, in tf.data.

An `ExampleViews` tells the input pipeline (cmae_jax.data.pipeline.train_dataset) what to
read of an example (the whole image, or a box cut while decoding) and how to turn it into
the method's columns (views, masks). The pipeline adds 'label', 'index' and 'corrupt' and
batches. A method's Step (cmae_jax.methods) returns one from its `views(config)`; its
`batch_spec(config)` lists the columns the view function yields, and the pipeline checks
the two against each other.

Seeds: `columns` and `crop_box` get the example's seed, a pure function of (config.seed,
epoch, index); each draws its own sub-streams from it (VIEWS for the views, MASK for the
mask), so the views and the mask of an example do not depend on the order of the stream.

Batched form (`BatchedViews`, for in-memory splits of one image shape): the same draws,
made for a whole batch from one seed, then the image ops on the batch
(cmae_jax.data.batched_views); the pipeline draws one seed per global step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from cmae_jax.data import batched_views, masking, views

# Sub-seed tags of an example's seed.
VIEWS, MASK = 0, 1

# (example seed, image height, image width) -> the box [y, x, h, w] to read.
CropBox = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class BatchedViews:
    """The same views made a batch at a time (cmae_jax.data.batched_views).

    draws    (seed, num, image shape (H, W, C)) -> {name: [num, ...]}: the random decisions
             of `num` examples, drawn from one seed by the per-example draw functions; with
             num=1 and an example's seed they are that example's per-example decisions
    columns  (those draws plus 'image', the uint8 images [num, H, W, C]) -> {column: [num, ...]}
    """

    draws: Callable[[tf.Tensor, int, tuple[int, int, int]], dict[str, tf.Tensor]]
    columns: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]


@dataclasses.dataclass(frozen=True)
class ExampleViews:
    """A method's per-example view function.

    columns   (uint8 image [h, w, C] as read, example seed) -> {column: tensor}
    crop_box  what to read: None for the whole image, else a box cut while decoding
              (fused for JPEG: only the pixels of the crop are decoded)
    name      for error messages (the view function's name)
    batched   the same views a batch at a time, for sources whose images share one shape
              (Source.image_shape); None: always per example
    """

    columns: Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]
    crop_box: CropBox | None = None
    name: str = "view function"
    batched: BatchedViews | None = None


def view_seed(seed: tf.Tensor) -> tf.Tensor:
    """The sub-seed an example's views draw from."""
    return tf.random.experimental.stateless_fold_in(seed, VIEWS)


def normalize(images: Any, mean: Any, std: Any) -> Any:
    """(images - mean) / std per channel; works on TF tensors, numpy and JAX arrays.

    Grey images with three means and stds come out with three channels, the grey value
    repeated (broadcasting), as torchvision's Grayscale(3) before Normalize: how grey
    data (Fashion-MNIST) meets an encoder trained on RGB (config.input.channels=3).
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (images - mean) / std


def _with_prefix(prefix: str, params: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """A view's draws as columns of the batch: each name prefixed."""
    return {prefix + name: value for name, value in params.items()}


def _without_prefix(prefix: str, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The draws `_with_prefix` put into the batch, under their own names again."""
    return {k.removeprefix(prefix): v for k, v in batch.items() if k.startswith(prefix)}


def masked_views(config: Any) -> ExampleViews:
    """CMAE / MAE: the online view (+ the pixel-shifted target view when
    config.input.target_view) of the master crop, and a patch mask."""
    inp = config.input
    grid = inp.image_size // inp.patch_size
    with_target = inp.target_view

    def crop_box(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
        return views.master_crop_box(view_seed(seed), height, width, inp)

    def columns(crop: tf.Tensor, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        online, target, _ = views.views_from_crop(
            crop, view_seed(seed), inp, with_target=with_target
        )
        out = {"online": normalize(online, inp.mean, inp.std)}
        if with_target:
            out["target"] = normalize(target, inp.mean, inp.std)
        out["ids_keep"], out["ids_mask"] = _mask(seed)
        return out

    def _mask(seed: tf.Tensor, num: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        mask_seed = tf.random.experimental.stateless_fold_in(seed, MASK)
        return masking.sample_mask(mask_seed, grid, inp, num)

    def draws(seed: tf.Tensor, num: int, image_shape: tuple[int, int, int]) -> dict[str, tf.Tensor]:
        height, width, channels = image_shape
        seed_of_views = view_seed(seed)
        out = {
            "box": views.master_crop_box(seed_of_views, height, width, inp, num),
            "flip": views.draw_flip(seed_of_views, inp, num),
        }
        if with_target:
            out["offset"] = views.draw_shift(seed_of_views, inp.shift, num)
            target = views.target_augment_params(
                views.color_seed(seed_of_views), inp, inp.image_size, channels, num
            )
            out.update(_with_prefix("target_", target))
        out["ids_keep"], out["ids_mask"] = _mask(seed, num)
        return out

    def batch_columns(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        images = tf.cast(batch["image"], tf.float32) / 255.0
        _, height, width, _ = images.shape
        size = inp.image_size
        side = views.master_size(inp) if with_target else size
        rows, cols = batched_views.master_weights(
            batch["box"], batch["flip"], side, height, width, views.master_content_size(inp, side)
        )
        online = batched_views.resample(images, rows[:, :size], cols[:, :size])
        out = {"online": normalize(online, inp.mean, inp.std)}
        if with_target:
            offset = batch["offset"]
            target = batched_views.resample(
                images,
                batched_views.take_rows(rows, offset[:, 0], size),
                batched_views.take_rows(cols, offset[:, 1], size),
            )
            params = _without_prefix("target_", batch)
            target = batched_views.target_augment(target, params, inp)
            out["target"] = normalize(target, inp.mean, inp.std)
        out["ids_keep"], out["ids_mask"] = batch["ids_keep"], batch["ids_mask"]
        return out

    return ExampleViews(
        columns, crop_box, name="masked_views", batched=BatchedViews(draws, batch_columns)
    )


def two_crop_views(config: Any) -> ExampleViews:
    """MAE-CT: two independent crops of the whole image (views.two_crop_views), no mask."""
    inp = config.input

    def columns(image: tf.Tensor, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        first, second = views.two_crop_views(image, view_seed(seed), inp)
        return {
            "view1": normalize(first, inp.mean, inp.std),
            "view2": normalize(second, inp.mean, inp.std),
        }

    aug_cfg = inp.view_augment if inp.get("views") == "two_crops_aug" else None
    size = inp.image_size

    def draws(seed: tf.Tensor, num: int, image_shape: tuple[int, int, int]) -> dict[str, tf.Tensor]:
        height, width, channels = image_shape
        out = {}
        for view, seed_of_view in enumerate(views.two_crop_seeds(view_seed(seed))):
            out[f"box{view}"] = views.master_crop_box(seed_of_view, height, width, inp, num)
            out[f"flip{view}"] = views.draw_flip(seed_of_view, inp, num)
            if aug_cfg is not None:
                colour = views.color_seed(seed_of_view)
                per_view = views.two_view_config(aug_cfg, view)
                params = views.target_augment_params(colour, per_view, size, channels, num)
                out.update(_with_prefix(f"aug{view}_", params))
                prob = aug_cfg.solarize_prob[view]
                out[f"solarize{view}"] = views.draw_solarize(colour, prob, num)
        return out

    def batch_columns(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        images = tf.cast(batch["image"], tf.float32) / 255.0
        _, height, width, _ = images.shape
        out = {}
        for view in range(2):
            rows, cols = batched_views.master_weights(
                batch[f"box{view}"], batch[f"flip{view}"], size, height, width
            )
            crop = batched_views.resample(images, rows, cols)
            if aug_cfg is not None:
                params = _without_prefix(f"aug{view}_", batch)
                crop = batched_views.target_augment(
                    crop, params, views.two_view_config(aug_cfg, view)
                )
                solarized = batch[f"solarize{view}"][:, None, None, None]
                crop = tf.where(solarized, views.solarize(crop), crop)
            out[f"view{view + 1}"] = normalize(crop, inp.mean, inp.std)
        return out

    return ExampleViews(columns, name="two_crop_views", batched=BatchedViews(draws, batch_columns))


def from_view_fn(view_fn: Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]) -> ExampleViews:
    """An evaluation's `view_fn(whole image, view seed)` (linear probe, fine-tuning)."""
    return ExampleViews(
        lambda image, seed: view_fn(image, view_seed(seed)),
        name=getattr(view_fn, "__qualname__", "view_fn"),
    )
