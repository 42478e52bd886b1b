"""Weighted k-NN classification on frozen features (cosine similarity, exp(s/T) votes).

Memory at ImageNet size (1.28M x 1024 features): the L2-normalised memory bank is one
global array whose rows are split over the mesh's batch axes (data x fsdp), so each device
holds N / devices rows; queries go through in chunks of `chunk_size`, replicated. Per
chunk each device scores its own rows ([chunk, N / devices] similarities), keeps its
top-k, and the devices exchange only those (k per query each); the global top-k of the
union is the top-k over the whole bank. Device memory: the bank shard plus
chunk x N / devices similarities (1024 x 160k floats = 655 MB on 8 devices for ImageNet;
lower `chunk_size` to shrink it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cmae_jax import sharding
from cmae_jax.losses import l2_normalize


def _bank_devices(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))


def shard_bank(
    features: np.ndarray, labels: np.ndarray, mesh: Mesh, *, min_rows_per_device: int = 1
) -> tuple[jax.Array, jax.Array]:
    """The L2-normalised bank and its labels as global arrays split by rows over the batch
    axes; padded rows (label -1) never win a vote. Every process passes the whole bank."""
    devices = _bank_devices(mesh)
    rows = max(-(-len(features) // devices), min_rows_per_device) * devices
    pad = rows - len(features)
    features = np.pad(np.asarray(features, np.float32), ((0, pad), (0, 0)))
    labels = np.pad(np.asarray(labels, np.int32), (0, pad), constant_values=-1)
    rows_sharding = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    bank = jax.jit(l2_normalize, out_shardings=rows_sharding)(
        jax.device_put(features, rows_sharding)
    )
    return bank, jax.device_put(labels, rows_sharding)


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "mesh"))
def _knn_chunk(bank, bank_labels, queries, temperature, *, k, num_classes, mesh):
    axes = sharding.BATCH_AXES

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(PartitionSpec(axes), PartitionSpec(axes), PartitionSpec()),
        out_specs=PartitionSpec(),
        # The merged top-k is the same on every device (all of them see all candidates).
        check_vma=False,
    )
    def top_k_everywhere(bank, labels, queries):
        sims = l2_normalize(queries) @ bank.T  # [chunk, rows of this device]
        sims = jnp.where(labels[None, :] >= 0, sims, -jnp.inf)
        local_sims, local_ids = jax.lax.top_k(sims, k)
        # The candidates of all devices: k per device and query, then the global top k.
        all_sims = jax.lax.all_gather(local_sims, axes, axis=1, tiled=True)
        all_labels = jax.lax.all_gather(labels[local_ids], axes, axis=1, tiled=True)
        top_sims, top = jax.lax.top_k(all_sims, k)
        return top_sims, jnp.take_along_axis(all_labels, top, axis=1)

    top_sims, top_labels = top_k_everywhere(bank, bank_labels, queries)
    weights = jnp.where(jnp.isfinite(top_sims), jnp.exp(top_sims / temperature), 0.0)
    votes = jnp.einsum("qk,qkc->qc", weights, jax.nn.one_hot(top_labels, num_classes))
    return jnp.argmax(votes, axis=-1)


def knn_predict(
    bank_features: np.ndarray,
    bank_labels: np.ndarray,
    query_features: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Predicted class per query: top-k cosine neighbours in the bank vote exp(sim / T).

    The bank is split over `mesh` (default: all devices on the batch axes).
    """
    if num_classes is None:
        num_classes = int(np.max(bank_labels)) + 1
    if mesh is None:
        mesh = jax.make_mesh(
            (jax.device_count(), 1, 1),
            sharding.MESH_AXES,
            axis_types=(jax.sharding.AxisType.Auto,) * 3,
        )
    k = min(k, len(bank_features))
    bank, labels = shard_bank(bank_features, bank_labels, mesh, min_rows_per_device=k)
    replicated = sharding.replicated(mesh)
    predictions = []
    for start in range(0, len(query_features), chunk_size):
        chunk = np.asarray(query_features[start : start + chunk_size], np.float32)
        rows = len(chunk)
        # A fixed chunk shape compiles once; the padded rows' predictions are dropped.
        chunk = np.pad(chunk, ((0, chunk_size - rows), (0, 0)), constant_values=1.0)
        out = _knn_chunk(
            bank,
            labels,
            jax.device_put(chunk, replicated),
            jnp.float32(temperature),
            k=k,
            num_classes=num_classes,
            mesh=mesh,
        )
        # Replicated: every process holds all of it.
        predictions.append(np.asarray(out.addressable_data(0))[:rows])
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


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[i, j]: the examples of class i predicted as class j."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
    return counts


def per_class_accuracy(confusion: np.ndarray) -> list[float | None]:
    """Top-1 accuracy of each class (a row of `confusion`); None for a class with no example."""
    return [float(row[i] / row.sum()) if row.sum() else None for i, row in enumerate(confusion)]
