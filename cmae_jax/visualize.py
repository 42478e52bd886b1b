"""Pictures of what the model does: original | masked | reconstruction grids."""

import os

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
