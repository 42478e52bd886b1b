"""Pictures of what the model does: reconstruction grids, cls-token attention maps and 2-D
embedding plots (uint8 RGB arrays, for TensorBoard images and PNG files alike)."""

import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from cmae_jax.models import vit


def reconstruction_grid(
    images: np.ndarray,
    pixel_pred: np.ndarray,
    ids_mask: np.ndarray,
    *,
    patch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    norm_pix: bool,
    upscale: int = 1,
) -> np.ndarray:
    """One row per image: original | masked input | reconstruction (visible patches pasted).

    `images` are normalised views [B, H, W, C]; `pixel_pred` the pixel decoder's output
    [B, N, p*p*C]. With a normalised-pixel loss the prediction is per-patch normalised, so
    it is mapped back with each true patch's mean and std (as MAE's visualisation does).
    Returns uint8 RGB [B*H, 3*W, 3] (grey images are repeated to three channels), each
    pixel repeated `upscale` times along both axes so small images stay visible.
    """
    b, h, w, c = images.shape
    target = np.asarray(vit.patchify(images, patch_size))
    pred = pixel_pred.astype(np.float32)
    if norm_pix:
        mu = target.mean(-1, keepdims=True)
        sigma = np.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
        pred = pred * sigma + mu
    masked = np.zeros(target.shape[:2], bool)
    np.put_along_axis(masked, ids_mask, True, axis=1)
    masked = masked[..., None]
    shown_input = np.where(masked, np.nan, target)
    recon = np.where(masked, pred, target)

    def to_uint8(patches):
        x = np.asarray(vit.unpatchify(patches, patch_size, h // patch_size, w // patch_size, c))
        x = x * np.asarray(std) + np.asarray(mean)
        # Masked patches are drawn mid-grey.
        x = np.where(np.isnan(x), 0.5, x)
        x = np.clip(np.round(x * 255), 0, 255).astype(np.uint8)
        return np.repeat(x, 3, axis=-1) if c == 1 else x

    rows = np.concatenate([to_uint8(target), to_uint8(shown_input), to_uint8(recon)], axis=2)
    grid = rows.reshape(b * h, 3 * w, 3)
    return np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)


def write_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, 3] array as a PNG file (any path tf.io.gfile understands)."""
    import tensorflow as tf  # Local import: only the trainer's host code writes pictures.

    folder = os.path.dirname(path)
    if folder:
        tf.io.gfile.makedirs(folder)
    tf.io.write_file(path, tf.io.encode_png(image))


def attention_maps(model: nn.Module, params: Any, images: np.ndarray) -> np.ndarray:
    """The last block's attention of the cls token over the patches, [B, heads, gh, gw].

    `model` is any module whose submodule 'encoder' is this project's ViT encoder (e.g.
    evaluation.features.FeatureEncoder) applied to whole images, `params` its params
    ({'encoder': ...}); `images` normalised [B, H, W, C]. Each map sums to 1 minus the
    cls token's attention to itself. Reads the weights the attention layers sow into
    'intermediates'; the outputs are unchanged.
    """
    _, state = model.apply({"params": params}, images, mutable=["intermediates"])
    encoder = state["intermediates"]["encoder"]
    if "blocks" in encoder:  # scanned blocks: the weights are stacked over the layers
        weights = encoder["blocks"]["attn"]["attention_weights"][0][-1]
    else:
        last = max((k for k in encoder if k.startswith("block_")), key=lambda k: int(k[6:]))
        weights = encoder[last]["attn"]["attention_weights"][0]
    weights = np.asarray(jax.device_get(weights), np.float32)  # [B, heads, 1 + N, 1 + N]
    b, heads = weights.shape[:2]
    patch = round(np.sqrt(images.shape[1] * images.shape[2] / (weights.shape[-1] - 1)))
    grid_h, grid_w = images.shape[1] // patch, images.shape[2] // patch
    return weights[:, :, 0, 1:].reshape(b, heads, grid_h, grid_w)


def _colormap(values: np.ndarray, name: str = "inferno") -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[name](values)[..., :3] * 255).astype(np.uint8)


def attention_grid(
    images: np.ndarray,
    maps: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    upscale: int = 1,
) -> np.ndarray:
    """One row per image: the image | its head-averaged attention map | each head's map.

    `images` normalised [B, H, W, C], `maps` from `attention_maps`; every map is scaled to
    its own maximum and drawn with the inferno colour map at the image's size. Returns
    uint8 RGB [B*H, (2 + heads)*W, 3], each pixel repeated `upscale` times.
    """
    b, h, w, c = images.shape
    pixels = np.clip(np.round((images * np.asarray(std) + np.asarray(mean)) * 255), 0, 255)
    pixels = pixels.astype(np.uint8)
    pixels = np.repeat(pixels, 3, axis=-1) if c == 1 else pixels
    all_maps = np.concatenate([maps.mean(axis=1, keepdims=True), maps], axis=1)
    all_maps = all_maps / np.maximum(all_maps.max(axis=(2, 3), keepdims=True), 1e-12)
    ry, rx = h // maps.shape[2], w // maps.shape[3]
    all_maps = np.repeat(np.repeat(all_maps, ry, axis=2), rx, axis=3)  # [B, 1 + heads, H, W]
    panels = [pixels] + [_colormap(all_maps[:, i]) for i in range(all_maps.shape[1])]
    grid = np.concatenate(panels, axis=2).reshape(b * h, len(panels) * w, 3)
    return np.repeat(np.repeat(grid, upscale, axis=0), upscale, axis=1)


def pca_2d(features: np.ndarray) -> np.ndarray:
    """The projection of centred `features` [N, D] on their first two principal axes."""
    centred = np.asarray(features, np.float64) - np.mean(features, axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def embedding_plot(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    class_names: Sequence[str] | None = None,
    title: str = "",
    size_inches: float = 6.0,
) -> np.ndarray:
    """A 2-D PCA scatter plot of `features` coloured by `labels`, as uint8 RGB [H, W, 3]."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = pca_2d(features)
    figure = Figure(figsize=(size_inches, size_inches), dpi=100)
    axes = figure.add_subplot()
    classes = np.unique(labels)
    colours = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for i, c in enumerate(classes):
        chosen = labels == c
        name = class_names[c] if class_names is not None else str(c)
        axes.scatter(*points[chosen].T, s=4, alpha=0.6, color=colours(i % colours.N), label=name)
    if len(classes) <= 20:
        axes.legend(markerscale=3, fontsize=7, loc="best")
    axes.set_title(title or "PCA of the features")
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    # Its own Agg canvas: no pyplot and no change of the global backend (notebooks keep
    # their inline plots).
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
