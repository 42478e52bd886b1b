"""k-NN against a NumPy brute force, and the reconstruction picture's layout."""

import numpy as np

from cmae_jax import visualize
from cmae_jax.evaluation import knn


def numpy_knn(bank, bank_labels, queries, k, temperature, num_classes):
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    predictions = []
    for q in queries:
        sims = bank @ q
        top = np.argsort(-sims)[:k]
        votes = np.zeros(num_classes)
        for i in top:
            votes[bank_labels[i]] += np.exp(sims[i] / temperature)
        predictions.append(np.argmax(votes))
    return np.array(predictions)


def test_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    bank_labels = rng.integers(0, 5, 300)
    bank = centers[bank_labels] + rng.normal(size=(300, 16)) * 1.5
    query_labels = rng.integers(0, 5, 70)
    queries = centers[query_labels] + rng.normal(size=(70, 16)) * 1.5
    for k, temperature in ((1, 0.07), (10, 0.07), (20, 0.5)):
        got = knn.knn_predict(
            bank, bank_labels, queries, k=k, temperature=temperature, num_classes=5, chunk_size=32
        )
        expected = numpy_knn(bank, bank_labels, queries, k, temperature, 5)
        np.testing.assert_array_equal(got, expected)
    accuracy = knn.knn_accuracy(bank, bank_labels, queries, query_labels, k=20, num_classes=5)
    assert accuracy == np.mean(numpy_knn(bank, bank_labels, queries, 20, 0.07, 5) == query_labels)


def test_confusion_matrix_and_per_class_accuracy_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 1, 0, 1, 1, 0])
    confusion = knn.confusion_matrix(labels, predictions, num_classes=4)
    expected = np.zeros((4, 4), int)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 0] = 2, 1, 2, 1
    np.testing.assert_array_equal(confusion, expected)
    # Class 3 has no example: no accuracy, not 0 and not a division by zero.
    assert knn.per_class_accuracy(confusion) == [2 / 3, 1.0, 0.0, None]


def test_weighted_votes_beat_majority():
    # Two close neighbours of class 1 outvote three distant ones of class 0 at a low temperature.
    bank = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.1, 1.0], [-0.1, 1.0]])
    labels = np.array([1, 1, 0, 0, 0])
    query = np.array([[1.0, 0.05]])
    assert knn.knn_predict(bank, labels, query, k=5, temperature=0.07)[0] == 1
    assert knn.knn_predict(bank, labels, query, k=5, temperature=100.0)[0] == 0


def test_reconstruction_grid_layout():
    p, size = 2, 4
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, size, size, 1)).astype(np.float32)
    pred = rng.normal(size=(2, 4, p * p)).astype(np.float32)
    ids_mask = np.array([[0, 3], [1, 2]])
    grid = visualize.reconstruction_grid(
        images, pred, ids_mask, patch_size=p, mean=(0.5,), std=(0.25,), norm_pix=False
    )
    assert grid.shape == (2 * size, 3 * size, 3) and grid.dtype == np.uint8
    original = np.clip(np.round((images * 0.25 + 0.5) * 255), 0, 255).astype(np.uint8)
    first = grid[:size]
    np.testing.assert_array_equal(first[:, :size, 0], original[0, :, :, 0])
    # Patch 0 (top-left) is masked: grey in the middle panel, the prediction on the right.
    assert np.all(first[:p, size : size + p] == 128)
    expected_pred = np.clip(np.round((pred[0, 0].reshape(p, p) * 0.25 + 0.5) * 255), 0, 255)
    np.testing.assert_array_equal(first[:p, 2 * size : 2 * size + p, 0], expected_pred)
    # Patch 1 (top-right) is visible: the original, in the middle and the right panels.
    np.testing.assert_array_equal(first[:p, size + p : 2 * size, 0], original[0, :p, p:, 0])
    np.testing.assert_array_equal(first[:p, 2 * size + p :, 0], original[0, :p, p:, 0])
