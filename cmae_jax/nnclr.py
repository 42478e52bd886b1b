"""NNCLR pieces of MAE-CT: the FIFO queue, the nearest-neighbour lookup and the loss.

The lookup has the official head's two modes (its `topk`): k = 0 takes the single nearest
neighbour (argmax, stage 2), k >= 1 one of the k nearest picked uniformly at random
(stage 3).

Everything here is written on *global* arrays: under jax.jit with the batch sharded over
devices, `keys` in `enqueue` is the whole global batch (the compiler gathers it onto every
device holding the replicated queue), and the similarities of a lookup are computed
row-sharded against the full queue. No collectives are spelled out.

"Own entry" (SPEC: a sample's own entry is excluded). The current batch's keys are
enqueued *after* both lookups of a step, so a sample never meets the key of its current
view. What it can meet is the key the same image left in the queue in an earlier epoch
(with a different crop): that entry is its own entry and is excluded by dataset index, as
the official code does (`queue_id == ids`). On ImageNet that is rare (65,536 of 1.28M); on
small datasets, where the queue holds a good part of an epoch, it would otherwise often be
the nearest neighbour and turn the NN swap into a plain positive pair.

Empty rows. The official code starts the queue with random unit vectors that serve as
(meaningless) neighbours until real keys overwrite them. Here stage 2's queue starts empty
(stage 3 takes over stage 2's queue, as the official code restores the head's buffers) and
only written rows are candidates; while fewer than k candidates exist the random pick is
among those, and with none at all (the very first step) a sample's neighbour is its own
key, which makes that step an ordinary two-view contrastive step.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from cmae_jax.losses import l2_normalize


@flax.struct.dataclass
class Queue:
    """FIFO memory of L2-normalised keys with the label and dataset index of each row."""

    keys: jax.Array  # [Q, D] float32; rows not yet written are zero
    labels: jax.Array  # [Q] int32; -1 where not yet written
    ids: jax.Array  # [Q] int32 dataset index of the example; -1 where not yet written
    ptr: jax.Array  # [] int32: the row the next key goes to
    count: jax.Array  # [] int32: rows written so far, capped at Q (the fill level)


def init_queue(size: int, dim: int) -> Queue:
    """An empty queue of `size` rows of width `dim`."""
    if size < 1:
        raise ValueError(f"The queue needs at least one row, got size={size}.")
    return Queue(
        keys=jnp.zeros((size, dim), jnp.float32),
        labels=jnp.full((size,), -1, jnp.int32),
        ids=jnp.full((size,), -1, jnp.int32),
        ptr=jnp.zeros([], jnp.int32),
        count=jnp.zeros([], jnp.int32),
    )


def enqueue(queue: Queue, keys: jax.Array, labels: jax.Array, ids: jax.Array) -> Queue:
    """Writes a batch of (already normalised) keys at the pointer, oldest rows first out.

    Row b of the batch goes to row (ptr + b) mod Q, so a batch that runs past the end
    wraps around to the start; the batch order is the global batch order, whatever the
    device layout.
    """
    size, batch = queue.keys.shape[0], keys.shape[0]
    if batch > size:
        raise ValueError(
            f"A batch of {batch} keys does not fit a queue of {size} rows; make "
            "config.maect.queue_size at least the global batch size."
        )
    rows = (queue.ptr + jnp.arange(batch, dtype=jnp.int32)) % size
    keys = jax.lax.stop_gradient(keys).astype(queue.keys.dtype)
    return Queue(
        keys=queue.keys.at[rows].set(keys),
        labels=queue.labels.at[rows].set(labels.astype(jnp.int32)),
        ids=queue.ids.at[rows].set(ids.astype(jnp.int32)),
        ptr=(queue.ptr + batch) % size,
        count=jnp.minimum(queue.count + batch, size),
    )


def candidate_mask(queue: Queue, ids: jax.Array) -> jax.Array:
    """[B, Q] bools: rows that are written and are not the query's own (same index) entry."""
    written = jnp.arange(queue.keys.shape[0]) < queue.count
    return written[None, :] & (queue.ids[None, :] != ids[:, None])


def nearest_neighbours(
    queue: Queue, queries: jax.Array, ids: jax.Array, rng: jax.Array | None, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The cosine neighbour of each normalised query among the candidate rows of the queue.

    k = 0: the nearest one (argmax; `rng` is not used). k >= 1: one of the k nearest,
    picked uniformly with `rng` (among fewer while fewer candidates exist).
    Returns (neighbours [B, D], rows [B] int32 queue rows, found [B] bool). Where no
    candidate exists (`found` False) the neighbour is the query itself and the row is
    meaningless.
    """
    if k < 0:
        raise ValueError(f"topk={k} must be >= 0 (0: the nearest neighbour).")
    queries = jax.lax.stop_gradient(queries)
    candidates = candidate_mask(queue, ids)
    sims = jnp.where(candidates, queries @ queue.keys.T, -jnp.inf)
    if k == 0:
        rows = jnp.argmax(sims, axis=1).astype(jnp.int32)
        found = candidates.any(axis=1)
    else:
        k = min(k, queue.keys.shape[0])
        _, top_rows = jax.lax.top_k(sims, k)  # valid candidates come first (the rest -inf)
        num_valid = jnp.minimum(candidates.sum(axis=1), k)
        pick = jax.random.randint(rng, num_valid.shape, 0, jnp.maximum(num_valid, 1))
        rows = jnp.take_along_axis(top_rows, pick[:, None], axis=1)[:, 0].astype(jnp.int32)
        found = num_valid > 0
    neighbours = jnp.where(found[:, None], queue.keys[rows], queries)
    return neighbours, rows, found


def nnclr_loss(neighbours: jax.Array, predictions: jax.Array, temperature: float) -> jax.Array:
    """InfoNCE of each neighbour against all predictions of the global batch (diagonal positive).

    As the official MAE-CT / NNCLR code: logits = nn @ pred.T / temperature, cross entropy
    over the predictions, mean over the batch, no 2 * temperature scaling. Neighbours come
    from the queue and get no gradient.
    """
    nn = jax.lax.stop_gradient(l2_normalize(neighbours))
    logits = nn @ l2_normalize(predictions).T / temperature
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))


def symmetric_nnclr_loss(
    neighbours: tuple[jax.Array, jax.Array],
    predictions: tuple[jax.Array, jax.Array],
    temperature: float,
) -> jax.Array:
    """The two-view loss: view 0's neighbour against view 1's predictions and vice versa."""
    return 0.5 * (
        nnclr_loss(neighbours[0], predictions[1], temperature)
        + nnclr_loss(neighbours[1], predictions[0], temperature)
    )
