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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from cmae_jax.data import masking, views

# Sub-seed tags of an example's seed.
VIEWS, MASK = 0, 1

# (example seed, image height, image width) -> the box [y, x, h, w] to read.
CropBox = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class ExampleViews:
    """A method's per-example view function.

    columns   (uint8 image [h, w, C] as read, example seed) -> {column: tensor}
    crop_box  what to read: None for the whole image, else a box cut while decoding
              (fused for JPEG: only the pixels of the crop are decoded)
    name      for error messages (the view function's name)
    """

    columns: Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]
    crop_box: CropBox | None = None
    name: str = "view function"


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
        mask_seed = tf.random.experimental.stateless_fold_in(seed, MASK)
        out["ids_keep"], out["ids_mask"] = masking.sample_mask(mask_seed, grid, inp)
        return out

    return ExampleViews(columns, crop_box, name="masked_views")


def two_crop_views(config: Any) -> ExampleViews:
    """MAE-CT: two independent crops of the whole image (views.two_crop_views), no mask."""
    inp = config.input

    def columns(image: tf.Tensor, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        first, second = views.two_crop_views(image, view_seed(seed), inp)
        return {
            "view1": normalize(first, inp.mean, inp.std),
            "view2": normalize(second, inp.mean, inp.std),
        }

    return ExampleViews(columns, name="two_crop_views")


def from_view_fn(view_fn: Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]) -> ExampleViews:
    """An evaluation's `view_fn(whole image, view seed)` (linear probe, fine-tuning)."""
    return ExampleViews(
        lambda image, seed: view_fn(image, view_seed(seed)),
        name=getattr(view_fn, "__qualname__", "view_fn"),
    )
