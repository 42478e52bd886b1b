"""Losses against NumPy written from the formulas."""

import numpy as np
import pytest

from cmae_jax import losses


def numpy_normalized_pixel_mse(pred, target, ids_mask):
    loss_sum, count = 0.0, 0
    for b in range(pred.shape[0]):
        for j in ids_mask[b]:
            t = target[b, j]
            t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
            loss_sum += np.mean((pred[b, j] - t) ** 2)
            count += 1
    return loss_sum / count


def numpy_info_nce(q, k, tau):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = q @ k.T / tau
    total = 0.0
    for i in range(len(q)):
        total += -(logits[i, i] - np.log(np.sum(np.exp(logits[i]))))
    return total / len(q) * 2 * tau


def test_reconstruction_loss_matches_numpy():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(3, 6, 12)).astype(np.float32)
    target = rng.normal(size=(3, 6, 12)).astype(np.float32) * 3 + 1
    ids_mask = np.array([[0, 2, 5], [1, 3, 4], [0, 1, 2]])
    got = float(losses.reconstruction_loss(pred, target, ids_mask, norm_pix=True))
    assert got == pytest.approx(numpy_normalized_pixel_mse(pred, target, ids_mask), rel=1e-5)


def test_reconstruction_loss_ignores_visible_patches():
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(2, 4, 8)).astype(np.float32)
    target = rng.normal(size=(2, 4, 8)).astype(np.float32)
    ids_mask = np.array([[1, 2], [0, 3]])
    changed = pred.copy()
    changed[0, 0] += 100.0  # patch 0 of example 0 is visible
    changed[1, 1] -= 50.0  # patch 1 of example 1 is visible
    a = losses.reconstruction_loss(pred, target, ids_mask)
    b = losses.reconstruction_loss(changed, target, ids_mask)
    assert float(a) == float(b)


def test_raw_pixel_loss_hand_computed():
    pred = np.zeros((1, 2, 2), np.float32)
    target = np.array([[[1.0, 3.0], [2.0, 2.0]]], np.float32)
    # Only patch 0 is masked: mean((0-1)^2, (0-3)^2) = 5.
    assert float(losses.reconstruction_loss(pred, target, np.array([[0]]), norm_pix=False)) == 5.0


@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
def test_info_nce_matches_numpy(tau):
    rng = np.random.default_rng(2)
    q = rng.normal(size=(8, 16)).astype(np.float32)
    k = rng.normal(size=(8, 16)).astype(np.float32)
    got = float(losses.info_nce(q, k, tau))
    assert got == pytest.approx(numpy_info_nce(q, k, tau), rel=1e-4)


def test_info_nce_scale_two_tau_and_perfect_alignment():
    # Orthogonal identical queries and keys: positives have cosine 1, negatives 0, so the
    # unscaled loss is -log(e^(1/t) / (e^(1/t) + (B-1))); the reported loss is 2t times it.
    q = np.eye(4, dtype=np.float32)
    tau = 0.5
    expected = -np.log(np.exp(2.0) / (np.exp(2.0) + 3)) * 2 * tau
    assert float(losses.info_nce(q, q, tau)) == pytest.approx(expected, rel=1e-5)


def test_info_nce_gives_no_gradient_to_keys():
    import jax

    rng = np.random.default_rng(3)
    q = rng.normal(size=(4, 8)).astype(np.float32)
    k = rng.normal(size=(4, 8)).astype(np.float32)
    grad_k = jax.grad(lambda kk: losses.info_nce(q, kk, 0.1))(k)
    assert np.all(np.asarray(grad_k) == 0)
