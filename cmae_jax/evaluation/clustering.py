"""Clustering of frozen features: k-means (JAX), cluster accuracy (Hungarian) and NMI.

k-means runs on L2-normalised features with k-means++ seeding and `num_init` restarts
(the one with the lowest inertia wins), Lloyd iterations in a jitted loop. Cluster
accuracy matches clusters to classes one-to-one to maximise agreement
(scipy.optimize.linear_sum_assignment); NMI is I(U; V) / ((H(U) + H(V)) / 2), the
arithmetic normalisation (scikit-learn's default).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from cmae_jax.losses import l2_normalize


def _sq_distances(x: jax.Array, centers: jax.Array) -> jax.Array:
    return (
        jnp.sum(x * x, axis=1, keepdims=True)
        - 2.0 * x @ centers.T
        + jnp.sum(centers * centers, axis=1)[None]
    )


def _kmeans_plus_plus(x: jax.Array, k: int, rng: jax.Array) -> jax.Array:
    """k-means++ seeding: each next centre drawn with probability proportional to D^2."""
    first_rng, rng = jax.random.split(rng)
    centers = (
        jnp.zeros((k, x.shape[1]), x.dtype)
        .at[0]
        .set(x[jax.random.randint(first_rng, (), 0, x.shape[0])])
    )
    closest = jnp.sum((x - centers[0]) ** 2, axis=1)

    def add_center(i, carry):
        centers, closest = carry
        pick = jax.random.categorical(
            jax.random.fold_in(rng, i), jnp.log(jnp.maximum(closest, 1e-12))
        )
        centers = centers.at[i].set(x[pick])
        closest = jnp.minimum(closest, jnp.sum((x - x[pick]) ** 2, axis=1))
        return centers, closest

    centers, _ = jax.lax.fori_loop(1, k, add_center, (centers, closest))
    return centers


@functools.partial(jax.jit, static_argnames=("k", "num_iters"))
def _kmeans_once(x: jax.Array, rng: jax.Array, *, k: int, num_iters: int):
    centers = _kmeans_plus_plus(x, k, rng)

    def lloyd(_, centers):
        assign = jnp.argmin(_sq_distances(x, centers), axis=1)
        one_hot = jax.nn.one_hot(assign, k, dtype=x.dtype)
        counts = one_hot.sum(axis=0)
        sums = one_hot.T @ x
        # An empty cluster keeps its centre.
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centers)

    centers = jax.lax.fori_loop(0, num_iters, lloyd, centers)
    distances = _sq_distances(x, centers)
    assign = jnp.argmin(distances, axis=1)
    inertia = jnp.sum(jnp.min(distances, axis=1))
    return assign, inertia


def kmeans(
    features: np.ndarray, k: int, *, seed: int = 0, num_init: int = 3, num_iters: int = 100
) -> np.ndarray:
    """Cluster index in [0, k) of each row of `features` (L2-normalised first)."""
    x = l2_normalize(jnp.asarray(features, jnp.float32))
    best, best_inertia = None, np.inf
    for restart in range(num_init):
        rng = jax.random.fold_in(jax.random.key(seed), restart)
        assign, inertia = _kmeans_once(x, rng, k=k, num_iters=num_iters)
        if float(inertia) < best_inertia:
            best, best_inertia = np.asarray(assign), float(inertia)
    return best


def contingency(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """counts[i, j] = number of examples of class labels_i in cluster clusters_j."""
    _, label_ids = np.unique(labels, return_inverse=True)
    _, cluster_ids = np.unique(clusters, return_inverse=True)
    counts = np.zeros((label_ids.max() + 1, cluster_ids.max() + 1), np.int64)
    np.add.at(counts, (label_ids, cluster_ids), 1)
    return counts


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes (Hungarian)."""
    counts = contingency(labels, clusters)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / counts.sum())


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def nmi(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Normalised mutual information I(U; V) / mean(H(U), H(V)); 1 when both are constant."""
    joint = contingency(labels, clusters) / len(labels)
    p_label, p_cluster = joint.sum(axis=1), joint.sum(axis=0)
    h_label, h_cluster = _entropy(p_label), _entropy(p_cluster)
    if h_label == 0.0 and h_cluster == 0.0:
        return 1.0
    nonzero = joint > 0
    outer = np.outer(p_label, p_cluster)
    mutual = float(np.sum(joint[nonzero] * np.log(joint[nonzero] / outer[nonzero])))
    return mutual / (0.5 * (h_label + h_cluster))


def evaluate_clustering(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    seed: int = 0,
    num_init: int = 3,
    num_iters: int = 100,
) -> dict[str, float]:
    """k-means with as many clusters as classes; {'cluster_accuracy', 'nmi'}."""
    clusters = kmeans(features, num_classes, seed=seed, num_init=num_init, num_iters=num_iters)
    return {"cluster_accuracy": cluster_accuracy(labels, clusters), "nmi": nmi(labels, clusters)}
