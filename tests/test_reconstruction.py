"""Reconstructions from a checkpoint at any mask ratio, and the notebooks' progress log."""

import logging
import os

import jax
import numpy as np
import pytest
from test_train import tiny_config

from cmae_jax import checkpointing, progress_log, reconstruction, sharding, weights
from cmae_jax.data import pipeline
from cmae_jax.evaluation import features
from cmae_jax.methods import cmae as train_cmae


@pytest.fixture(scope="module")
def cmae_run(small_fashion_mnist, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("cmae_run"))
    config = tiny_config(small_fashion_mnist, total_steps=2)
    config.input.image_size = 32  # an 8x8 grid of 4 px patches: 16 cells of 2x2 patches
    config.input.master_size = 36  # 32 + the 4 px shift
    config.input.mask_type, config.input.mask_ratio = "block", 0.65  # CMAE's own masking
    train_cmae.train_and_evaluate(config, workdir)
    return config, workdir


def test_masks_follow_the_runs_mask_type(cmae_run):
    config, _ = cmae_run
    keep, mask = reconstruction.sample_masks(3, config.input, 0.75, seed=1)
    assert keep.shape == (3, 16) and mask.shape == (3, 48)  # 4 of 16 cells kept
    for k, m in zip(keep, mask, strict=True):
        assert sorted({*k, *m}) == list(range(64))
        rows, cols = np.divmod(k, 8)
        assert len({(r // 2, c // 2) for r, c in zip(rows, cols, strict=True)}) == 4
    again, _ = reconstruction.sample_masks(3, config.input, 0.75, seed=1)
    np.testing.assert_array_equal(keep, again)
    assert not np.array_equal(keep[0], keep[1])
    assert config.input.mask_ratio == 0.65  # the run's config is left alone


def test_reconstruction_grid_at_several_ratios(cmae_run):
    config, workdir = cmae_run
    assert reconstruction.has_pixel_decoder(workdir)
    autoencoder = reconstruction.load_autoencoder(workdir)
    assert set(autoencoder.params) == {"encoder", "pixel_decoder"}
    assert autoencoder.config.model.width == 32 and autoencoder.config.loss.norm_pix
    source = features.split_source(autoencoder.config, "test")
    images = next(pipeline.eval_dataset(config, source, batch_size=2).as_numpy_iterator())["image"]
    # The saved arrays, read back on their own (no sharding), as the reference.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), autoencoder.params)
    state_dir = weights.find_checkpoint(workdir)
    saved = checkpointing.restore_parts(state_dir, {"params": abstract})["params"]
    for ratio in (0.5, 0.9):
        keep, mask = reconstruction.sample_masks(2, config.input, ratio)
        pred = reconstruction.reconstruct(autoencoder, images, keep, mask)
        expected = autoencoder.model.apply({"params": saved}, images, keep, mask, train=False)
        np.testing.assert_allclose(pred, expected["pixel_pred"], rtol=1e-5, atol=1e-5)
        grid = reconstruction.reconstruction_grid(autoencoder, images, mask_ratio=ratio)
        assert grid.shape == (2 * 96, 3 * 96, 3) and grid.dtype == np.uint8
        # Visible patches are pasted: the reconstruction equals the original there.
        patch = 4 * 3  # 4 px patches, upscaled 3x
        row, col = np.divmod(keep[0, 0], 8)
        original = grid[row * patch : (row + 1) * patch, col * patch : (col + 1) * patch]
        pasted = grid[row * patch : (row + 1) * patch, 192 + col * patch : 192 + (col + 1) * patch]
        np.testing.assert_array_equal(original, pasted)
    assert sharding.make_mesh(autoencoder.config.mesh).size == jax.device_count()


def test_checkpoint_without_pixel_decoder_is_refused(tmp_path):
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=1, save_every_steps=1)
    checkpointer.save(1, {"params": {"encoder": {"cls": np.zeros((1, 1, 8), np.float32)}}}, {})
    checkpointer.close()
    assert not reconstruction.has_pixel_decoder(str(tmp_path))
    with pytest.raises(ValueError, match="no pixel decoder"):
        reconstruction.load_autoencoder(str(tmp_path))


def test_progress_log_keeps_own_info_and_all_warnings():
    progress_log.show_progress()
    progress_log.show_progress()
    absl_logger = logging.getLogger("absl")
    filters = [f for f in absl_logger.filters if isinstance(f, progress_log.OwnInfoFilter)]
    assert len(filters) == 1
    own = os.path.join(os.path.dirname(progress_log.__file__), "methods", "cmae.py")
    record = lambda level, path: logging.LogRecord("absl", level, path, 1, "m", None, None)
    assert filters[0].filter(record(logging.INFO, own))
    assert not filters[0].filter(record(logging.INFO, "/site-packages/orbax/checkpoint/x.py"))
    assert filters[0].filter(record(logging.WARNING, "/site-packages/orbax/checkpoint/x.py"))
