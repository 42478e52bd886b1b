"""Evaluation protocols on synthetic data: k-NN (sharded), clustering, low-shot, linear probe."""

import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from conftest import xla_flags

from cmae_jax import sharding
from cmae_jax.config_defaults import eval_config
from cmae_jax.evaluation import clustering, knn, linear_probe, low_shot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blobs(n, dim=16, classes=5, noise=1.5, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 3
    labels = rng.integers(0, classes, n)
    return (centers[labels] + rng.normal(size=(n, dim)) * noise).astype(np.float32), labels


FOUR_DEVICE_KNN = """
import sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
from test_eval_metrics import blobs
from test_evaluation import numpy_knn
from cmae_jax import sharding
from cmae_jax.evaluation import knn
import ml_collections
assert jax.device_count() == 4
bank, bank_labels = blobs(301)  # not divisible by 4: padded rows must never vote
queries, _ = blobs(70, seed=1)
for shape in ((4, 1, 1), (2, 2, 1), (2, 1, 2)):
    axes = ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), shape)))
    mesh = sharding.make_mesh(axes)
    for k in (1, 20, 100):  # 100 > the 76 rows each device holds on (4, 1, 1)
        got = knn.knn_predict(
            bank, bank_labels, queries, k=k, num_classes=5, chunk_size=32, mesh=mesh
        )
        np.testing.assert_array_equal(got, numpy_knn(bank, bank_labels, queries, k, 0.07, 5))
print("OK")
"""


def test_sharded_knn_matches_brute_force_on_four_devices():
    env = dict(os.environ, XLA_FLAGS=xla_flags(host_devices=4))
    script = FOUR_DEVICE_KNN.format(tests=os.path.join(REPO, "tests"))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_knn_bank_is_split_over_the_batch_axes():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    bank, labels = knn.shard_bank(*blobs(10), mesh, min_rows_per_device=4)
    assert bank.sharding.spec == jax.sharding.PartitionSpec(sharding.BATCH_AXES)
    assert bank.shape[0] >= 10 and int((np.asarray(labels) < 0).sum()) == bank.shape[0] - 10
    np.testing.assert_allclose(np.linalg.norm(np.asarray(bank)[:10], axis=1), 1.0, rtol=1e-5)


def test_cluster_accuracy_of_a_permuted_labelling_is_one():
    labels = np.random.default_rng(0).integers(0, 7, 500)
    permutation = np.random.default_rng(1).permutation(7)
    assert clustering.cluster_accuracy(labels, permutation[labels] + 100) == 1.0
    # One cluster for everything: the largest class is all that matches.
    assert clustering.cluster_accuracy(labels, np.zeros_like(labels)) == pytest.approx(
        np.bincount(labels).max() / len(labels)
    )


def test_nmi_known_cases():
    labels = np.array([0, 0, 1, 1, 2, 2] * 50)
    assert clustering.nmi(labels, labels) == pytest.approx(1.0)
    assert clustering.nmi(labels, 5 - labels) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    assert clustering.nmi(rng.integers(0, 4, 20000), rng.integers(0, 4, 20000)) < 0.002
    # Hand-computed: U = [0,0,1,1], V = [0,0,0,1]. H(U) = ln 2, H(V) = -(3/4 ln 3/4 + 1/4 ln
    # 1/4), I = 1/2 ln 2 + 1/4 ln(1/4 / (1/2 * 3/4)) + 1/4 ln(1/4 / (1/2 * 1/4)).
    h_u = np.log(2)
    h_v = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    mutual = 0.5 * np.log(0.5 / (0.5 * 0.75)) + 0.25 * np.log(0.25 / (0.5 * 0.75))
    mutual += 0.25 * np.log(0.25 / (0.5 * 0.25))
    expected = mutual / ((h_u + h_v) / 2)
    assert clustering.nmi(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])) == pytest.approx(expected)


def test_kmeans_recovers_separated_clusters():
    features, labels = blobs(600, noise=0.3)
    result = clustering.evaluate_clustering(features, labels, num_classes=5, num_init=2)
    assert result["cluster_accuracy"] == 1.0 and result["nmi"] == pytest.approx(1.0)


def test_low_shot_subsets_have_exact_counts_and_depend_only_on_the_seed():
    labels = np.random.default_rng(0).integers(0, 10, 3000)
    counts = np.bincount(labels)
    for n in (1, 2, 5):
        chosen = low_shot.subset_indices(labels, per_class=n, seed=3)
        assert np.array_equal(np.bincount(labels[chosen], minlength=10), np.full(10, n))
        np.testing.assert_array_equal(chosen, low_shot.subset_indices(labels, per_class=n, seed=3))
    assert not np.array_equal(
        low_shot.subset_indices(labels, per_class=5, seed=3),
        low_shot.subset_indices(labels, per_class=5, seed=4),
    )
    # Nested: the 1-shot set lies inside the 2-shot set of the same seed.
    one, two = (low_shot.subset_indices(labels, per_class=n, seed=0) for n in (1, 2))
    assert set(one) <= set(two)
    tenth = low_shot.subset_indices(labels, fraction=0.1, seed=0)
    expected = np.maximum(1, np.round(0.1 * counts)).astype(int)
    assert np.array_equal(np.bincount(labels[tenth], minlength=10), expected)
    with pytest.raises(ValueError, match="exactly one"):
        low_shot.subset_indices(labels, per_class=1, fraction=0.1)


def test_low_shot_logistic_regression_on_separable_data():
    features, labels = blobs(1000, noise=0.5)
    results = low_shot.evaluate_low_shot(
        features[:500],
        labels[:500],
        features[500:],
        labels[500:],
        num_classes=5,
        shots=(5,),
        fractions=(0.5,),
        seeds=(0,),
        num_steps=50,
    )
    assert set(results) == {"5_shot", "50pct"}
    assert results["5_shot"] > 0.9 and results["50pct"] > 0.98


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_linear_probe_separates_a_separable_problem(optimizer):
    features, labels = blobs(1024, dim=8, classes=4, noise=0.3)
    # Shift and scale that the BatchNorm without affine must undo.
    features = features * 50 + 7
    config = eval_config(("linear_probe",))
    config.dataset.num_classes = 4
    config.linear_probe.optimizer = optimizer
    # LARS steps are trust_coefficient (0.001) x lr relative to the weights: it needs the
    # large lr of large batches (MAE: 0.1 x 16384 / 256 = 6.4).
    config.linear_probe.base_lr = 20.0 if optimizer == "lars" else 0.1
    config.linear_probe.batch_size = 128
    config.linear_probe.num_epochs = 50
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_axis_rules(config.logical_axis_rules)
    result = linear_probe.train_and_evaluate(
        config,
        mesh,
        rules,
        embed=None,
        encoder_params=None,
        train_features=features[:768],
        train_labels=labels[:768],
        test_features=features[768:],
        test_labels=labels[768:],
    )
    assert result["top1"] == 1.0
