"""The image arithmetic of cmae_jax.data.views on whole batches [B, H, W, C].

The per-example path runs some forty small TensorFlow ops per view (crop, bicubic
resize, flip, shift, jitter, blur); on 28 px images their launch overhead, not their
arithmetic, is the input pipeline's cost, and on a 2-core machine that cost is taken from
the train step. Here the random decisions come from the per-example draw functions
(views.master_crop_box, views.draw_flip, views.draw_shift, views.target_augment_params,
masking.sample_mask), called once for a whole batch (their `num` axis; the input pipeline
draws per global batch); given one example's draws, the functions below give its
per-example views up to float rounding. The image ops run once per batch:

  * crop + bicubic resize + flip + shift: the resize is separable, so the view is
    Wy @ image @ Wx^T per example, with Wy, Wx the interpolation weights of
    `tf.image.resize(method='bicubic', antialias=True)` (TF's ScaleAndTranslate with the
    Keys cubic kernel, a = -0.5) placed at the crop's rows and columns of the whole image.
    A flip reverses Wx's rows, a shift takes rows dy.. and dx.. of the master's weights.
  * colour jitter, grayscale, blur and erasing: the same formulas with per-example factors
    broadcast over the batch, each op picked per example with `tf.where`.

The weights are dense [B, side, H] matrices, so this suits small images of one shape
held in memory (Fashion-MNIST); sources that decode files keep the per-example path.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from cmae_jax.data import views

_CUBIC_RADIUS = 2.0  # Keys' cubic (a = -0.5), the kernel of TF's bicubic ScaleAndTranslate


def _keys_cubic(x: tf.Tensor) -> tf.Tensor:
    """Keys' cubic convolution kernel at |x| (TF's KeysCubicKernelFunc)."""
    # TF's own evaluation order, with a = -0.5 written out.
    near = ((1.5 * x - 2.5) * x) * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return tf.where(x < 1.0, near, tf.where(x < _CUBIC_RADIUS, far, 0.0))


def resize_weights(start: tf.Tensor, length: tf.Tensor, out_size: int, in_size: int) -> tf.Tensor:
    """Bicubic antialiased resize of the span [start, start + length) to `out_size`.

    start, length: int32 [B]. Returns float32 [B, out_size, in_size]: row i holds the
    weights of output pixel i over the whole input axis (zero outside the span), as
    `tf.image.resize(..., 'bicubic', antialias=True)` of the span computes them.
    """
    length_f = tf.cast(length, tf.float32)[:, None, None]
    scale = tf.cast(out_size, tf.float32) / length_f
    inv_scale = 1.0 / scale
    # Antialiasing widens the kernel when shrinking; when enlarging it is Keys' cubic.
    kernel_scale = tf.maximum(inv_scale, 1.0)
    sample = (tf.range(out_size, dtype=tf.float32)[None, :, None] + 0.5) * inv_scale
    source = tf.cast(tf.range(in_size)[None, None, :] - start[:, None, None], tf.float32)
    inside = (source >= 0.0) & (source < length_f)
    weights = _keys_cubic(tf.abs((source + 0.5 - sample) / kernel_scale))
    weights = tf.where(inside, weights, 0.0)
    return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)


def resample(images: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
    """rows @ image @ cols^T per example and channel, clipped to [0, 1] as views._resize."""
    out = tf.einsum("bmh,bhwc->bmwc", rows, images)
    out = tf.einsum("bmwc,bnw->bmnc", out, cols)
    return tf.clip_by_value(out, 0.0, 1.0)


def take_rows(weights: tf.Tensor, offset: tf.Tensor, size: int) -> tf.Tensor:
    """Rows offset .. offset + size - 1 of each example's weights (a shifted sub-view)."""
    index = offset[:, None] + tf.range(size)[None, :]
    return tf.gather(weights, index, batch_dims=1)


def master_weights(
    boxes: tf.Tensor, flips: tf.Tensor, side: int, height: int, width: int, content: int = 0
) -> tuple[tf.Tensor, tf.Tensor]:
    """Row and column weights of the (flipped) master: the box [B, 4] resized to content x
    content (0: side x side) at the top left of side x side, zero weights (black) around."""
    content = content or side
    rows = resize_weights(boxes[:, 0], boxes[:, 2], content, height)
    cols = resize_weights(boxes[:, 1], boxes[:, 3], content, width)
    cols = tf.where(flips[:, None, None], tf.reverse(cols, axis=[1]), cols)
    if content == side:
        return rows, cols
    padding = [[0, 0], [0, side - content], [0, 0]]
    return tf.pad(rows, padding), tf.pad(cols, padding)


def _per_example(values: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
    """[B] values shaped to broadcast over [B, H, W, C] images."""
    return tf.reshape(values, [-1] + [1] * (images.shape.rank - 1))


def _hue(images: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
    # tf.image.adjust_hue takes one delta; its kernel rotates the hue in HSV space.
    hsv = tf.image.rgb_to_hsv(images)
    hue = tf.math.floormod(hsv[..., :1] + delta, 1.0)
    return tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], -1)), 0.0, 1.0)


def color_jitter(
    images: tf.Tensor, factors: tf.Tensor, order: tf.Tensor, jitter_cfg: Any
) -> tf.Tensor:
    """torchvision's ColorJitter per example: factors [B, 4], op order [B, 4]."""
    enabled = views.jitter_ops(jitter_cfg, images.shape[-1])
    ops = (views.brightness, views.contrast, views.saturation, _hue)
    for position in range(4):
        current = images
        for index, (op, on) in enumerate(zip(ops, enabled)):
            if on:
                picked = _per_example(order[:, position] == index, images)
                changed = op(current, _per_example(factors[:, index], images))
                images = tf.where(picked, changed, images)
    return images


def blur(images: tf.Tensor, kernels: tf.Tensor) -> tf.Tensor:
    """views.blur per example with its own kernel [B, K], as sums of shifted images."""
    kernel_size = kernels.shape[1]
    radius = kernel_size // 2
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT")
    weight = lambda t: kernels[:, t, None, None, None]
    vertical = sum(weight(t) * padded[:, t : t + height] for t in range(kernel_size))
    return sum(weight(t) * vertical[:, :, t : t + width] for t in range(kernel_size))


def erase(images: tf.Tensor, boxes: tf.Tensor, fill: tuple[float, ...]) -> tf.Tensor:
    """views.erase_box per example: boxes [B, 4] (y, x, h, w; h = 0 erases nothing)."""
    rows = tf.range(images.shape[1])[None, :, None]
    cols = tf.range(images.shape[2])[None, None, :]
    y, x, h, w = (boxes[:, i, None, None] for i in range(4))
    inside = (rows >= y) & (rows < y + h) & (cols >= x) & (cols < x + w)
    return tf.where(inside[..., None], tf.constant(fill, tf.float32), images)


def target_augment(images: tf.Tensor, params: dict[str, tf.Tensor], cfg: Any) -> tf.Tensor:
    """views.target_augment of a batch, with the per-example draws of target_augment_params."""
    channels = images.shape[-1]
    jitter = cfg.color_jitter
    if jitter.prob > 0 and any(views.jitter_ops(jitter, channels)):
        jittered = color_jitter(images, params["jitter_factors"], params["jitter_order"], jitter)
        images = tf.where(_per_example(params["jitter"], images), jittered, images)
    if channels == 3 and cfg.get("grayscale_prob", 0.2) > 0:
        grey = tf.tile(tf.image.rgb_to_grayscale(images), [1, 1, 1, 3])
        images = tf.where(_per_example(params["grayscale"], images), grey, images)
    if cfg.get("blur_prob", 0.5) > 0:
        blurred = blur(images, params["blur_kernel"])
        images = tf.where(_per_example(params["blur"], images), blurred, images)
    if cfg.get("erase_prob", 0.0) > 0:
        erased = erase(images, params["erase_box"], views.erase_fill(cfg, channels))
        images = tf.where(_per_example(params["erase"], images), erased, images)
    return images
