"""Fine-tuning augmentations in TensorFlow: RandAugment and random erasing (timm's recipe).

RandAugment as timm's 'rand-m9-mstd0.5-inc1' (MAE fine-tuning): `num_ops` = 2 ops drawn
uniformly (with replacement) from the 15 below, each applied with probability 0.5 at a
magnitude drawn per op from N(magnitude, magnitude_std) clipped to [0, 10]; the
"increasing" variants, so a larger magnitude is always a stronger change; signed ops get
a random sign. Ops: AutoContrast, Equalize, Invert, Rotate (30 deg at m = 10), Posterize
(4 - 4m/10 bits), Solarize (threshold 256 - 256m/10), SolarizeAdd (+110m/10 below 128),
Color, Contrast, Brightness, Sharpness (factor 1 +- 0.9m/10), ShearX/Y (0.3m/10),
TranslateX/Y (0.45m/10 of the size). Geometric ops fill with grey 128 (timm: the dataset
mean colour), bilinear. One-channel images: Color is the identity.

Random erasing as timm's RandomErasing(mode='pixel', max_count=1) after normalisation: with
probability `prob`, one box of 2%-33% of the area, aspect ratio 0.3-3.3 (log-uniform), is
filled with standard normal noise per pixel; 10 tries, none fitting leaves the image.

All randomness comes from the `seed` argument (stateless ops): a pure function of
(image, seed), as every view in this project.
"""

from __future__ import annotations

import math

import tensorflow as tf

_FILL = 128.0 / 255.0
_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
)


def _fold(seed: tf.Tensor, tag: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(seed, tag)


def _uniform(seed: tf.Tensor, shape: list[int], low: float = 0.0, high: float = 1.0):
    return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)


def _grey(image: tf.Tensor) -> tf.Tensor:
    return tf.image.rgb_to_grayscale(image) if image.shape[-1] == 3 else image


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _affine(image: tf.Tensor, transform: list[tf.Tensor]) -> tf.Tensor:
    """Output pixel (x, y) takes input (a0 x + a1 y + a2, b0 x + b1 y + b2), bilinear."""
    transform = tf.cast(tf.stack([*transform, 0.0, 0.0]), tf.float32)[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=_FILL,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return out[0]


def _rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    c, s = tf.cos(degrees * math.pi / 180), tf.sin(degrees * math.pi / 180)
    return _affine(image, [c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy])


def _equalize(image: tf.Tensor) -> tf.Tensor:
    """Histogram equalisation per channel, as PIL's ImageOps.equalize."""

    def channel(x: tf.Tensor) -> tf.Tensor:
        x = tf.cast(tf.round(x * 255), tf.int32)
        histogram = tf.histogram_fixed_width(x, [0, 255], nbins=256)
        nonzero = tf.boolean_mask(histogram, histogram > 0)
        step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
        lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
        lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
        return tf.where(step == 0, x, tf.gather(lut, x))

    channels = [channel(image[..., i]) for i in range(image.shape[-1])]
    return tf.cast(tf.stack(channels, -1), tf.float32) / 255.0


def _autocontrast(image: tf.Tensor) -> tf.Tensor:
    lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
    stretched = (image - lo) / tf.maximum(hi - lo, 1e-6)
    return tf.where(hi > lo, stretched, image)


def _sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (border kept)."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    channels = image.shape[-1]
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    border = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]]) < 0.5
    return _blend(tf.where(border, image, smooth), image, factor)


def _posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    shift = tf.cast(8 - bits, tf.uint8)
    x = tf.cast(tf.round(image * 255), tf.uint8)
    x = tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift)
    return tf.cast(x, tf.float32) / 255.0


def _apply_op(image: tf.Tensor, op: tf.Tensor, magnitude: tf.Tensor, sign: tf.Tensor):
    level = magnitude / 10.0
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    factor = 1.0 + sign * 0.9 * level
    shear = sign * 0.3 * level
    branches = [
        lambda: _autocontrast(image),
        lambda: _equalize(image),
        lambda: 1.0 - image,
        lambda: _rotate(image, sign * 30.0 * level),
        lambda: _posterize(image, 4 - tf.cast(level * 4, tf.int32)),
        lambda: tf.where(image * 255 < 256 - tf.floor(level * 256), image, 1.0 - image),
        lambda: tf.where(
            image * 255 < 128, tf.minimum(image + tf.floor(level * 110) / 255, 1.0), image
        ),
        lambda: _blend(_grey(image), image, factor) if image.shape[-1] == 3 else image,
        lambda: _blend(tf.reduce_mean(_grey(image)), image, factor),
        lambda: _blend(tf.zeros_like(image), image, factor),
        lambda: _sharpness(image, factor),
        lambda: _affine(image, [1.0, shear, 0.0, 0.0, 1.0, 0.0]),
        lambda: _affine(image, [1.0, 0.0, 0.0, shear, 1.0, 0.0]),
        lambda: _affine(image, [1.0, 0.0, sign * 0.45 * level * size[1], 0.0, 1.0, 0.0]),
        lambda: _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, sign * 0.45 * level * size[0]]),
    ]
    out = tf.switch_case(op, branches)
    return tf.ensure_shape(out, image.shape)


def rand_augment(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    num_ops: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.5,
    prob: float = 0.5,
) -> tf.Tensor:
    """RandAugment of a float [H, W, C] image in [0, 1] (see the module docstring)."""
    for i in range(num_ops):
        op_seed = _fold(seed, i)
        op = tf.random.stateless_uniform(
            [], seed=_fold(op_seed, 0), minval=0, maxval=len(_OPS), dtype=tf.int32
        )
        m = magnitude + magnitude_std * tf.random.stateless_normal([], seed=_fold(op_seed, 1))
        m = tf.clip_by_value(m, 0.0, 10.0)
        sign = tf.where(_uniform(_fold(op_seed, 2), []) < 0.5, -1.0, 1.0)
        apply = _uniform(_fold(op_seed, 3), []) < prob
        image = tf.cond(
            apply, lambda i=image, o=op, m=m, s=sign: _apply_op(i, o, m, s), lambda i=image: i
        )
    return image


def random_erasing(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    prob: float = 0.25,
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 3.3),
    num_tries: int = 10,
) -> tf.Tensor:
    """timm's RandomErasing(mode='pixel') of a normalised [H, W, C] image."""
    h, w = image.shape[0], image.shape[1]
    target = h * w * _uniform(_fold(seed, 0), [num_tries], area[0], area[1])
    aspect = tf.exp(_uniform(_fold(seed, 1), [num_tries], math.log(ratio[0]), math.log(ratio[1])))
    eh = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
    ew = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
    fits = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    eh, ew = eh[first], ew[first]
    top = tf.cast(
        tf.floor(_uniform(_fold(seed, 2), []) * tf.cast(h - eh + 1, tf.float32)), tf.int32
    )
    left = tf.cast(
        tf.floor(_uniform(_fold(seed, 3), []) * tf.cast(w - ew + 1, tf.float32)), tf.int32
    )
    rows = tf.range(h)[:, None, None]
    cols = tf.range(w)[None, :, None]
    box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
    erase = box & tf.reduce_any(fits) & (_uniform(_fold(seed, 4), []) < prob)
    noise = tf.random.stateless_normal(image.shape, seed=_fold(seed, 5))
    return tf.where(erase, noise, image)
