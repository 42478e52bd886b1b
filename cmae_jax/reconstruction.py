"""Masked-image reconstructions by the encoder and pixel decoder of any CMAE / MAE checkpoint,
at any mask ratio (the trainer's pictures use the ratio it trains with).

  autoencoder = reconstruction.load_autoencoder("workdirs/fmnist_cmae")
  grid = reconstruction.reconstruction_grid(autoencoder, images, mask_ratio=0.9)

A MAE-CT run keeps the pixel decoder only in its first stage: load WORKDIR/1_mae.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from cmae_jax import sharding, train_state, visualize, weights
from cmae_jax.data import masking
from cmae_jax.models import cmae as cmae_model

AUTOENCODER_KEYS = ("encoder", "pixel_decoder")


@dataclasses.dataclass(frozen=True)
class Autoencoder:
    """The encoder and pixel decoder of a run (a CMAE module without the contrastive parts),
    their params {'encoder', 'pixel_decoder'}, and the run's config."""

    model: cmae_model.CMAE
    params: Any
    config: ml_collections.ConfigDict


def run_config(path: str) -> ml_collections.ConfigDict:
    """The config (config.json) of the run that wrote the checkpoint at `path`."""
    saved = weights.run_config_json(path)
    if saved is None:
        raise FileNotFoundError(f"The run of {path} has no config.json: its config is needed.")
    return ml_collections.ConfigDict(saved)


def has_pixel_decoder(path: str) -> bool:
    """Whether the checkpoint at `path` (see weights.find_checkpoint) has a pixel
    decoder: CMAE and MAE runs and MAE-CT's 1_mae stage do, MAE-CT's later stages do not."""
    saved = weights.saved_structure(weights.find_checkpoint(path))
    return "pixel_decoder" in saved["params"]


def load_autoencoder(path: str, mesh: jax.sharding.Mesh | None = None) -> Autoencoder:
    """The encoder and pixel decoder of the checkpoint at `path`, built from its run's
    config.json, params laid out on `mesh` (default: that config's mesh over all devices)."""
    if not has_pixel_decoder(path):
        raise ValueError(
            f"The checkpoint at {path} has no pixel decoder (a MAE-CT stage after the first?); "
            "reconstructions need a CMAE or MAE run, or a MAE-CT run's 1_mae folder."
        )
    config = run_config(path)
    model = cmae_model.build_model(config.model, config.input, contrastive=False)
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    rules = sharding.logical_axis_rules(config.logical_axis_rules)
    size, channels = config.input.image_size, config.input.channels
    num_keep, num_mask = masking.mask_counts(size // config.input.patch_size, config.input)
    init_fn = lambda rng: model.init(
        rng,
        jnp.zeros((2, size, size, channels)),
        jnp.zeros((2, num_keep), jnp.int32),
        jnp.zeros((2, num_mask), jnp.int32),
        train=False,
    )["params"]
    _, abstract = train_state.abstract_sharded_state(
        init_fn, jax.random.key(config.seed), mesh, rules
    )
    params, _ = weights.load_params(path, abstract, required=AUTOENCODER_KEYS)
    return Autoencoder(model, params, config)


def sample_masks(
    num_images: int, input_cfg: ml_collections.ConfigDict, mask_ratio: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(ids_keep [B, K], ids_mask [B, M]): the masks of config.input.mask_type (random or
    block, as in training) at `mask_ratio`, one per image, a pure function of `seed`."""
    input_cfg = ml_collections.ConfigDict(input_cfg.to_dict())
    input_cfg.mask_ratio = float(mask_ratio)
    grid = input_cfg.image_size // input_cfg.patch_size
    masks = [
        masking.sample_mask(tf.constant([seed, i], tf.int64), grid, input_cfg)
        for i in range(num_images)
    ]
    return np.stack([m[0].numpy() for m in masks]), np.stack([m[1].numpy() for m in masks])


def reconstruct(
    autoencoder: Autoencoder, images: np.ndarray, ids_keep: np.ndarray, ids_mask: np.ndarray
) -> np.ndarray:
    """The pixel decoder's output [B, N, p*p*C] for normalised `images` under the masks."""
    model = autoencoder.model

    @jax.jit
    def apply(params, images, ids_keep, ids_mask):
        return model.apply({"params": params}, images, ids_keep, ids_mask, train=False)

    out = apply(autoencoder.params, images, ids_keep, ids_mask)
    return np.asarray(jax.device_get(out["pixel_pred"]))


def reconstruction_grid(
    autoencoder: Autoencoder,
    images: np.ndarray,
    *,
    mask_ratio: float,
    seed: int = 0,
    upscale: int | None = None,
) -> np.ndarray:
    """One row per image, original | masked | reconstruction at `mask_ratio` (see
    visualize.reconstruction_grid), uint8 RGB; `upscale` None: to about 96 px per image."""
    config = autoencoder.config
    ids_keep, ids_mask = sample_masks(len(images), config.input, mask_ratio, seed)
    pred = reconstruct(autoencoder, images, ids_keep, ids_mask)
    return visualize.reconstruction_grid(
        images,
        pred,
        ids_mask,
        patch_size=config.input.patch_size,
        mean=tuple(config.input.mean),
        std=tuple(config.input.std),
        norm_pix=config.loss.norm_pix,
        upscale=upscale or max(1, 96 // config.input.image_size),
    )
