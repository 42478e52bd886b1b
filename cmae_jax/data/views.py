"""Stateless view generation for CMAE ("pixel shifting") and evaluation, in TensorFlow.

All functions take a uint8 [H, W, C] image and return float32 images in [0, 1] (not yet
normalised, so views can be compared pixel for pixel). All randomness comes from the
`seed` argument (shape [2], stateless ops), so a view is a pure function of
(image, seed, config).

Pixel shifting (SPEC, CMAE): one master crop, RandomResizedCrop to `master_size` square
(bicubic; by default image_size + shift + 1 = 256 at 224 px, as the official code), one
horizontal flip applied to the master so both views share it; online view = the top-left
image_size square of the (flipped) master; target view = the image_size square at offset
(dy, dx), each uniform in [0, shift], followed by colour jitter, grayscale and blur.

Choices where the references leave room:
  * Resizing uses TF's bicubic with antialias=True, which like PIL (torchvision's
    default backend for ImageNet) filters when downsampling; the result is clipped to
    [0, 1] because bicubic overshoots.
  * Colour jitter follows torchvision's ColorJitter: multiplicative brightness, contrast
    blended with the mean grey level, saturation blended with the grey image, hue shifted
    on the colour circle, applied in a random order per example, clipped after each op.
  * Blur kernel size is 10% of the view size, made odd, at least 3 (23 at 224, as BYOL),
    reflect padding (as torchvision's gaussian_blur).
  * One-channel images: saturation, hue and grayscale are identities; brightness and
    contrast (mean of the single channel) apply as usual, and so does blur.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import ml_collections
import tensorflow as tf

# Sub-seed tags: each random decision of a view draws from its own stream.
_CROP, _FLIP, _SHIFT, _COLOR = 0, 1, 2, 3
(
    _JITTER_APPLY,
    _JITTER_FACTORS,
    _JITTER_ORDER,
    _GRAY,
    _BLUR_APPLY,
    _BLUR_SIGMA,
    _ERASE_APPLY,
    _ERASE_BOX,
) = range(8)


def _fold(seed: tf.Tensor, tag: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(seed, tag)


def _uniform(seed: tf.Tensor, shape: list[int], low: float = 0.0, high: float = 1.0):
    return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)


def _examples(num: int | None) -> list[int]:
    """The leading shape of a draw: [] for one example, [num] for `num` examples at once.

    Draws for `num` examples take the values of one example's draw, then the next's, from
    the same stream; so num=1 gives one example's values exactly, with a leading axis.
    """
    return [] if num is None else [num]


def _candidate_sides(
    seed: tf.Tensor,
    area: tf.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    n: int,
    num: int | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """torchvision's n tries at once: sides round(sqrt(a * r)), round(sqrt(a / r)) (int32)."""
    shape = [*_examples(num), n]
    target_area = area * _uniform(_fold(seed, 0), shape, scale[0], scale[1])
    aspect = tf.exp(_uniform(_fold(seed, 1), shape, math.log(ratio[0]), math.log(ratio[1])))
    along = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    across = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    return along, across


def _randint_inclusive(seed: tf.Tensor, high: tf.Tensor, num: int | None = None) -> tf.Tensor:
    """torch.randint(0, high + 1): a uniform integer in [0, high] (0 when high < 0)."""
    u = _uniform(seed, _examples(num))
    drawn = tf.cast(tf.floor(u * tf.cast(high + 1, tf.float32)), tf.int32)
    return tf.minimum(drawn, tf.maximum(high, 0))


def _first_try(ok: tf.Tensor, h: tf.Tensor, w: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The sides of the first valid try (along the last axis), and whether there is one."""
    first = tf.argmax(tf.cast(ok, tf.int32), axis=-1, output_type=tf.int32)
    batch_dims = ok.shape.rank - 1
    pick = lambda sides: tf.gather(sides, first, axis=-1, batch_dims=batch_dims)
    return pick(h), pick(w), tf.reduce_any(ok, axis=-1)


def random_resized_crop_box(
    seed: tf.Tensor,
    height: tf.Tensor | int,
    width: tf.Tensor | int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    num_tries: int = 10,
    num: int | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Samples a crop box (y, x, h, w) as torchvision RandomResizedCrop.get_params.

    Scalars, or [num] vectors for `num` images of this size at once (see _examples).
    """
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    height_f = tf.cast(height, tf.float32)
    width_f = tf.cast(width, tf.float32)
    # All tries drawn at once; the first valid one wins, exactly like torchvision's loop.
    w, h = _candidate_sides(seed, height_f * width_f, scale, ratio, num_tries, num)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    h_try, w_try, any_ok = _first_try(ok, h, w)
    y_try = _randint_inclusive(_fold(seed, 2), height - h_try, num)
    x_try = _randint_inclusive(_fold(seed, 3), width - w_try, num)

    # Fallback: central crop with the aspect ratio clamped into `ratio`.
    in_ratio = width_f / height_f
    w_fb = tf.where(in_ratio > ratio[1], tf.cast(tf.round(height_f * ratio[1]), tf.int32), width)
    h_fb = tf.where(in_ratio < ratio[0], tf.cast(tf.round(width_f / ratio[0]), tf.int32), height)
    y_fb = (height - h_fb) // 2
    x_fb = (width - w_fb) // 2

    return (
        tf.where(any_ok, y_try, y_fb),
        tf.where(any_ok, x_try, x_fb),
        tf.where(any_ok, h_try, h_fb),
        tf.where(any_ok, w_try, w_fb),
    )


def _resize(image: tf.Tensor, size: tuple[int, int] | tf.Tensor) -> tf.Tensor:
    resized = tf.image.resize(image, size, method="bicubic", antialias=True)
    return tf.clip_by_value(resized, 0.0, 1.0)


def _to_float(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(image, tf.float32) / 255.0


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    # ITU-R 601-2 luma, the weights of torchvision's rgb_to_grayscale and TF's.
    return tf.image.rgb_to_grayscale(image)


# The jitter ops take one image [H, W, C] and a scalar factor, or a batch [B, H, W, C]
# and factors [B, 1, 1, 1] (cmae_jax.data.batched_views).


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """torchvision's brightness: the image times `factor`, clipped."""
    return tf.clip_by_value(image * factor, 0.0, 1.0)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """torchvision's contrast: blended with the image's mean grey level by `factor`."""
    grey = _grayscale(image) if image.shape[-1] == 3 else image
    mean = tf.reduce_mean(grey, axis=[-3, -2, -1], keepdims=True)
    return tf.clip_by_value(mean + factor * (image - mean), 0.0, 1.0)


def saturation(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """torchvision's saturation: blended with the grey image by `factor`."""
    grey = _grayscale(image)
    return tf.clip_by_value(grey + factor * (image - grey), 0.0, 1.0)


def _hue(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    # `factor` is the hue delta (a turn of the colour circle is 1).
    return tf.clip_by_value(tf.image.adjust_hue(image, factor), 0.0, 1.0)


def jitter_ops(cfg_jitter: Any, channels: int) -> tuple[bool, bool, bool, bool]:
    """Which of brightness, contrast, saturation, hue run: strength > 0, colour ops on RGB only.

    An op left out is skipped, not run as an identity: that keeps such images bit-exact.
    """
    colour = channels == 3
    return (
        bool(cfg_jitter.brightness),
        bool(cfg_jitter.contrast),
        bool(cfg_jitter.saturation) and colour,
        bool(cfg_jitter.hue) and colour,
    )


def _jitter_factors(
    seed: tf.Tensor, jitter_cfg: Any, enabled: tuple[bool, ...], num: int | None = None
) -> tf.Tensor:
    """Brightness, contrast, saturation factors and the hue delta, float32 [..., 4]; an op
    that does not run (`enabled`, from jitter_ops) draws nothing and gets its identity (1,
    or 0 for hue)."""
    factors_seed = _fold(seed, _JITTER_FACTORS)
    shape = _examples(num)
    strengths = (jitter_cfg.brightness, jitter_cfg.contrast, jitter_cfg.saturation)
    factors = [
        _uniform(_fold(factors_seed, i), shape, max(0.0, 1.0 - s), 1.0 + s)
        if enabled[i]
        else tf.ones(shape)
        for i, s in enumerate(strengths)
    ]
    h = jitter_cfg.hue
    factors.append(
        _uniform(_fold(factors_seed, 3), shape, -h, h) if enabled[3] else tf.zeros(shape)
    )
    return tf.stack(factors, axis=-1)


def _color_jitter(
    image: tf.Tensor, factors: tf.Tensor, order: tf.Tensor, jitter_cfg: Any
) -> tf.Tensor:
    enabled = jitter_ops(jitter_cfg, image.shape[-1])
    if not any(enabled):
        return image
    ops = [
        functools.partial(op, factor=factors[i]) if on else None
        for i, (op, on) in enumerate(zip((brightness, contrast, saturation, _hue), enabled))
    ]
    # torchvision applies the four ops in a random order per call.
    for position in range(4):
        current = image
        branches = [
            functools.partial(op, current) if op is not None else (lambda x=current: x)
            for op in ops
        ]
        image = tf.switch_case(order[position], branches)
    return image


def blur_kernel_size(image_size: int) -> int:
    """Gaussian blur kernel size: 10% of the view size, odd, at least 3 (23 at 224)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def gaussian_kernel(sigma: tf.Tensor, kernel_size: int) -> tf.Tensor:
    """The normalised 1-D Gaussian of `kernel_size` taps (odd): [K] per sigma, [..., K]."""
    radius = kernel_size // 2
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-(x**2) / (2.0 * tf.cast(sigma, tf.float32)[..., None] ** 2))
    return kernel / tf.reduce_sum(kernel, axis=-1, keepdims=True)


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, kernel_size: int) -> tf.Tensor:
    """Separable Gaussian blur of an [H, W, C] float image with reflect padding."""
    return blur(image, gaussian_kernel(sigma, kernel_size))


def blur(image: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Separable blur of an [H, W, C] image by a 1-D kernel of odd length, reflect padding."""
    radius = kernel.shape[0] // 2
    channels = image.shape[-1]
    padded = tf.pad(
        image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT"
    )
    k_h = tf.tile(kernel[:, None, None, None], [1, 1, channels, 1])
    k_w = tf.tile(kernel[None, :, None, None], [1, 1, channels, 1])
    out = tf.nn.depthwise_conv2d(padded, k_h, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, k_w, [1, 1, 1, 1], "VALID")
    return out[0]


def target_augment_params(
    seed: tf.Tensor, cfg: Any, size: int, channels: int, num: int | None = None
) -> dict[str, tf.Tensor]:
    """The random decisions of `target_augment` for a [size, size, channels] view.

    Each decision draws from its own sub-stream of `seed`; an op the config turns off
    draws nothing and gets a constant (no jitter, no blur, ...). With `num`, every value
    gets a leading axis of `num` views (see _examples).
    """
    jitter = cfg.color_jitter
    enabled_jitter = jitter_ops(jitter, channels)
    on_jitter = jitter.prob > 0 and any(enabled_jitter)
    gray_prob = cfg.get("grayscale_prob", 0.2) if channels == 3 else 0.0
    blur_prob = cfg.get("blur_prob", 0.5)
    erase_prob = cfg.get("erase_prob", 0.0)
    shape = _examples(num)
    no = tf.zeros(shape, tf.bool)

    def applies(tag: int, prob: float) -> tf.Tensor:
        return _uniform(_fold(seed, tag), shape) < prob if prob > 0 else no

    low, high = cfg.get("blur_sigma", (0.1, 2.0))
    kernel_size = blur_kernel_size(size)
    if erase_prob > 0:
        box = random_erase_box(
            _fold(seed, _ERASE_BOX),
            size,
            size,
            tuple(cfg.erase_scale),
            tuple(cfg.erase_ratio),
            num=num,
        )
        erase_box = tf.stack(box, axis=-1)
    else:
        erase_box = tf.zeros([*shape, 4], tf.int32)
    order = _uniform(_fold(seed, _JITTER_ORDER), [*shape, 4]) if on_jitter else None
    return {
        "jitter": applies(_JITTER_APPLY, jitter.prob) if on_jitter else no,
        "jitter_factors": _jitter_factors(seed, jitter, enabled_jitter, num)
        if on_jitter
        else tf.ones([*shape, 4]),
        "jitter_order": tf.cast(tf.argsort(order, axis=-1), tf.int32)
        if on_jitter
        else tf.broadcast_to(tf.range(4, dtype=tf.int32), [*shape, 4]),
        "grayscale": applies(_GRAY, gray_prob),
        "blur": applies(_BLUR_APPLY, blur_prob),
        "blur_kernel": gaussian_kernel(
            _uniform(_fold(seed, _BLUR_SIGMA), shape, low, high), kernel_size
        )
        if blur_prob > 0
        else tf.ones([*shape, kernel_size]),
        "erase": applies(_ERASE_APPLY, erase_prob),
        "erase_box": erase_box,
    }


def erase_fill(cfg: Any, channels: int) -> tuple[float, ...]:
    """Random erasing's fill: the dataset mean, its channels' average on a grey view.

    torchvision erases after Normalize with value 0, i.e. with the dataset mean; the views
    here are not normalised yet, so the box gets the mean itself. A grey image that a
    colour encoder will see repeated gets the channels' average.
    """
    fill = tuple(cfg.mean)
    if len(fill) != channels:
        fill = (sum(fill) / len(fill),) * channels
    return fill


def target_augment(image: tf.Tensor, seed: tf.Tensor, cfg: Any) -> tf.Tensor:
    """Colour jitter, grayscale, blur and erasing of the target view (CMAE/BYOL), [0, 1] floats."""
    size, _, channels = image.shape
    params = target_augment_params(seed, cfg, size, channels)
    jitter = cfg.color_jitter
    if jitter.prob > 0 and any(jitter_ops(jitter, channels)):
        image = tf.cond(
            params["jitter"],
            lambda: _color_jitter(image, params["jitter_factors"], params["jitter_order"], jitter),
            lambda: image,
        )
    if channels == 3 and cfg.get("grayscale_prob", 0.2) > 0:
        image = tf.cond(
            params["grayscale"], lambda: tf.tile(_grayscale(image), [1, 1, 3]), lambda: image
        )
    if cfg.get("blur_prob", 0.5) > 0:
        image = tf.cond(params["blur"], lambda: blur(image, params["blur_kernel"]), lambda: image)
    if cfg.get("erase_prob", 0.0) > 0:
        image = tf.cond(
            params["erase"],
            lambda: erase_box(image, params["erase_box"], erase_fill(cfg, channels)),
            lambda: image,
        )
    return image


def random_erase_box(
    seed: tf.Tensor,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    num_tries: int = 10,
    num: int | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """A box (y, x, h, w) to erase, as torchvision RandomErasing.get_params; h = 0: none."""
    h, w = _candidate_sides(seed, float(height * width), scale, ratio, num_tries, num)
    # torchvision's loop takes the first try that fits strictly inside, else erases nothing.
    ok = (h < height) & (w < width)
    h_first, w_first, any_ok = _first_try(ok, h, w)
    h_box = tf.where(any_ok, h_first, 0)
    w_box = tf.where(any_ok, w_first, 0)
    y = _randint_inclusive(_fold(seed, 2), height - h_box, num)
    x = _randint_inclusive(_fold(seed, 3), width - w_box, num)
    return y, x, h_box, w_box


def erase_box(image: tf.Tensor, box: tf.Tensor, fill: tuple[float, ...]) -> tf.Tensor:
    """Fills the box [y, x, h, w] of an [H, W, C] image with `fill` (one value per channel)."""
    height, width, channels = image.shape
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    y, x, h, w = box[0], box[1], box[2], box[3]
    inside = (rows >= y) & (rows < y + h) & (cols >= x) & (cols < x + w)
    fill_value = tf.broadcast_to(tf.constant(fill, tf.float32), [channels])
    return tf.where(inside[:, :, None], fill_value, image)


def master_crop_box(
    seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor, cfg: Any, num: int | None = None
) -> tf.Tensor:
    """The master RandomResizedCrop box [y, x, h, w] (int32) of an image of that size
    ([num, 4] for `num` images of that size, see _examples)."""
    box = random_resized_crop_box(
        _fold(seed, _CROP), height, width, tuple(cfg.crop_scale), tuple(cfg.crop_ratio), num=num
    )
    return tf.stack(box, axis=-1)


def crop_image(image: tf.Tensor, box: tf.Tensor) -> tf.Tensor:
    """The [y, x, h, w] box of an [H, W, C] image."""
    channels = image.shape[-1]
    return tf.slice(image, tf.stack([box[0], box[1], 0]), tf.stack([box[2], box[3], channels]))


def master_size(cfg: Any) -> int:
    """Side of the pixel-shift master crop: cfg.master_size, or 0 for image_size + shift + 1.

    The official CMAE resizes to 256 and cuts 224 px views at offsets randint(0, 31), so
    one row and column of the master are in no view.
    """
    return cfg.get("master_size") or cfg.image_size + cfg.shift + 1


def master_content_size(cfg: Any, side: int) -> int:
    """The side the crop is resized to inside a master of that side: all of it with
    cfg.master_mode 'resize' (the official CMAE: the online view is its top-left part,
    magnified by side / image_size), image_size with 'pad' (black below and to the right:
    the online view is the whole crop at the evaluation views' scale)."""
    return cfg.image_size if cfg.get("master_mode", "resize") == "pad" else side


def color_seed(seed: tf.Tensor) -> tf.Tensor:
    """The sub-seed of the target view's colour ops (target_augment_params)."""
    return _fold(seed, _COLOR)


def draw_flip(seed: tf.Tensor, cfg: Any, num: int | None = None) -> tf.Tensor:
    """Whether the master crop is flipped left-right (bool; False when cfg.flip is off)."""
    if not cfg.flip:
        return tf.zeros(_examples(num), tf.bool)
    return _uniform(_fold(seed, _FLIP), _examples(num)) < 0.5


def draw_shift(seed: tf.Tensor, shift: int, num: int | None = None) -> tf.Tensor:
    """The target view's offset (dy, dx) in the master, each uniform in [0, shift], int32."""
    shape = [*_examples(num), 2]
    if shift <= 0:
        return tf.zeros(shape, tf.int32)
    return tf.random.stateless_uniform(
        shape, seed=_fold(seed, _SHIFT), minval=0, maxval=shift + 1, dtype=tf.int32
    )


def views_from_crop(
    crop: tf.Tensor, seed: tf.Tensor, cfg: Any, *, with_target: bool = True
) -> tuple[tf.Tensor, tf.Tensor | None, dict[str, tf.Tensor]]:
    """Views of an already cut master crop (uint8 [h, w, C]); `seed` as for the box.

    Sources that decode and crop in one step (JPEG files) cut the box of `master_crop_box`
    themselves and continue here; the result equals `pixel_shift_views_with_params`.
    """
    size = cfg.image_size
    shift = cfg.shift if with_target else 0
    channels = crop.shape[-1]
    side = master_size(cfg) if with_target else size
    content = master_content_size(cfg, side)
    master = _resize(_to_float(crop), (content, content))
    flip = draw_flip(seed, cfg)
    if cfg.flip:
        master = tf.cond(flip, lambda: tf.reverse(master, axis=[1]), lambda: master)
    if content < side:
        master = tf.pad(master, [[0, side - content], [0, side - content], [0, 0]])
    online = master[:size, :size]
    offset = draw_shift(seed, shift)
    params = {"flip": flip, "dy": offset[0], "dx": offset[1], "master": master}
    if not with_target:
        return online, None, params
    target = tf.slice(master, tf.stack([offset[0], offset[1], 0]), [size, size, channels])
    target = target_augment(target, color_seed(seed), cfg)
    return online, target, params


def pixel_shift_views_with_params(
    image: tf.Tensor, seed: tf.Tensor, cfg: Any, *, with_target: bool = True
) -> tuple[tf.Tensor, tf.Tensor | None, dict[str, tf.Tensor]]:
    """Views plus the sampled parameters (box, flip, dy, dx, flipped master), for tests.

    Without a target view (plain MAE) the master crop is resized straight to image_size
    (RandomResizedCrop + flip) and the online view is the whole master.
    """
    shape = tf.shape(image)
    box = master_crop_box(seed, shape[0], shape[1], cfg)
    online, target, params = views_from_crop(
        crop_image(image, box), seed, cfg, with_target=with_target
    )
    return online, target, {"box": box, **params}


def pixel_shift_views(image: tf.Tensor, seed: tf.Tensor, cfg: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """CMAE online and target views of one uint8 image, float32 [S, S, C] in [0, 1]."""
    online, target, _ = pixel_shift_views_with_params(image, seed, cfg, with_target=True)
    return online, target


def online_view(image: tf.Tensor, seed: tf.Tensor, cfg: Any) -> tf.Tensor:
    """MAE view (RandomResizedCrop to image_size + flip), float32 [S, S, C] in [0, 1]."""
    online, _, _ = pixel_shift_views_with_params(image, seed, cfg, with_target=False)
    return online


def eval_view(image: tf.Tensor, image_size: int, crop_fraction: float = 1.0) -> tf.Tensor:
    """Deterministic eval view: shorter side to image_size / crop_fraction, centre crop.

    One image [H, W, C] or a batch of one size [B, H, W, C] (each image as if alone).
    """
    shape = tf.cast(tf.shape(image)[-3:-1], tf.float32)
    resize_to = round(image_size / crop_fraction)
    scale = resize_to / tf.reduce_min(shape)
    new_hw = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
    resized = _resize(_to_float(image), new_hw)
    top = (new_hw[0] - image_size) // 2
    left = (new_hw[1] - image_size) // 2
    view = resized[..., top : top + image_size, left : left + image_size, :]
    return tf.ensure_shape(view, [*image.shape[:-3], image_size, image_size, image.shape[-1]])


# MAE-CT's two views (SPEC, MAE-CT "Augmentation"): each an independent RandomResizedCrop
# (config.input.crop_scale, 0.08-1.0 there) + flip of the whole image, drawn from its own
# sub-seed. The "_aug" variant (config.input.views='two_crops_aug', parameters in
# config.input.view_augment) adds BYOL's asymmetric colour ops as the official maectaug
# configs: colour jitter p 0.8 and grayscale p 0.2 on both views, blur p 1.0 on the first
# and 0.1 on the second, solarize p 0.2 on the second.
_TWO_VIEW_TAGS = (4, 5)
_SOLARIZE_APPLY = 6
SOLARIZE_THRESHOLD = 128 / 255  # PIL's ImageOps.solarize threshold 128 on uint8


def solarize(image: tf.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> tf.Tensor:
    """Inverts the pixels at or above `threshold` (PIL's solarize), [0, 1] floats."""
    return tf.where(image < threshold, image, 1.0 - image)


def two_view_config(aug_cfg: Any, view: int) -> ml_collections.ConfigDict:
    """The target_augment settings of MAE-CT's view `view` (0 or 1) of the "_aug" views."""
    return ml_collections.ConfigDict(
        dict(
            color_jitter=aug_cfg.color_jitter,
            grayscale_prob=aug_cfg.grayscale_prob,
            blur_prob=aug_cfg.blur_prob[view],
            blur_sigma=tuple(aug_cfg.blur_sigma),
        )
    )


def draw_solarize(seed: tf.Tensor, prob: float, num: int | None = None) -> tf.Tensor:
    """Whether a view is solarized (bool), drawn from its colour seed."""
    if prob <= 0:
        return tf.zeros(_examples(num), tf.bool)
    return _uniform(_fold(seed, _SOLARIZE_APPLY), _examples(num)) < prob


def two_view_augment(image: tf.Tensor, seed: tf.Tensor, aug_cfg: Any, view: int) -> tf.Tensor:
    """BYOL colour ops of MAE-CT's view `view` (0 or 1); probabilities per view in `aug_cfg`."""
    image = target_augment(image, seed, two_view_config(aug_cfg, view))
    solarize_prob = aug_cfg.solarize_prob[view]
    if solarize_prob > 0:
        image = tf.cond(draw_solarize(seed, solarize_prob), lambda: solarize(image), lambda: image)
    return image


def two_crop_seeds(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The sub-seeds of MAE-CT's two views (each as `online_view`'s seed)."""
    return _fold(seed, _TWO_VIEW_TAGS[0]), _fold(seed, _TWO_VIEW_TAGS[1])


def two_crop_views(image: tf.Tensor, seed: tf.Tensor, cfg: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """MAE-CT's two views of one whole uint8 image, float32 [S, S, C] in [0, 1] each."""
    aug_cfg = cfg.view_augment if cfg.get("views") == "two_crops_aug" else None
    out = []
    for view, view_seed in enumerate(two_crop_seeds(seed)):
        crop = online_view(image, view_seed, cfg)
        if aug_cfg is not None:
            crop = two_view_augment(crop, color_seed(view_seed), aug_cfg, view)
        out.append(crop)
    return out[0], out[1]
