"""Weighted k-NN classification on frozen features (cosine similarity, exp(s/T) votes)."""

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from cmae_jax import sharding
from cmae_jax.losses import l2_normalize


def extract_features(
    feature_fn: Callable[[jax.Array], jax.Array],
    batches: Iterable[dict[str, np.ndarray]],
    batch_sharding: NamedSharding,
) -> tuple[np.ndarray, np.ndarray]:
    """Runs `feature_fn` over eval batches; returns (features, labels) of valid rows, on host.

    Every process gets all rows (gathered), in dataset order of the batches.
    """
    features, labels = [], []
    for local in batches:
        batch = sharding.global_batch(
            {"image": local["image"], "label": local["label"], "valid": local["valid"]},
            batch_sharding,
        )
        out = feature_fn(batch["image"])
        gathered = multihost_utils.process_allgather(
            {"f": out, "y": batch["label"], "v": batch["valid"]}, tiled=True
        )
        valid = np.asarray(gathered["v"], bool)
        features.append(np.asarray(gathered["f"], np.float32)[valid])
        labels.append(np.asarray(gathered["y"], np.int32)[valid])
    return np.concatenate(features), np.concatenate(labels)


@jax.jit(static_argnames=("k", "num_classes"))
def _knn_chunk(bank, bank_labels, queries, *, k, temperature, num_classes):
    sims = l2_normalize(queries) @ bank.T
    top_sims, top_ids = jax.lax.top_k(sims, k)
    votes = (
        jax.nn.one_hot(bank_labels[top_ids], num_classes)
        * jnp.exp(top_sims / temperature)[..., None]
    )
    return jnp.argmax(votes.sum(axis=1), axis=-1)


def knn_predict(
    bank_features: np.ndarray,
    bank_labels: np.ndarray,
    query_features: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Predicted class per query: top-k cosine neighbours in the bank vote exp(sim / T)."""
    if num_classes is None:
        num_classes = int(bank_labels.max()) + 1
    k = min(k, len(bank_features))
    bank = l2_normalize(jnp.asarray(bank_features))
    bank_labels = jnp.asarray(bank_labels, jnp.int32)
    predictions = []
    for start in range(0, len(query_features), chunk_size):
        queries = jnp.asarray(query_features[start : start + chunk_size])
        predictions.append(
            np.asarray(
                _knn_chunk(
                    bank,
                    bank_labels,
                    queries,
                    k=k,
                    temperature=temperature,
                    num_classes=num_classes,
                )
            )
        )
    return np.concatenate(predictions)


def knn_accuracy(
    bank_features: np.ndarray,
    bank_labels: np.ndarray,
    query_features: np.ndarray,
    query_labels: np.ndarray,
    **kwargs,
) -> float:
    """Top-1 accuracy in [0, 1] of `knn_predict`."""
    predictions = knn_predict(bank_features, bank_labels, query_features, **kwargs)
    return float(np.mean(predictions == np.asarray(query_labels)))
