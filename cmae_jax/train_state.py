"""The train state and its creation directly in its sharded layout."""

from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
from jax.sharding import Mesh

from cmae_jax import sharding


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: step count, parameters, BatchNorm statistics, optimiser.

    For CMAE the EMA target lives inside `opt_state` (see cmae_jax.ema).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def abstract_sharded_state(
    init_fn: Callable[[jax.Array], TrainState],
    rng: jax.Array,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]],
) -> tuple[Any, Any]:
    """(shardings, abstract state) of `init_fn`'s result on `mesh`, without computing it.

    The abstract state is a tree of ShapeDtypeStructs carrying their shardings: the restore
    target of checkpoints, and the input of ahead-of-time compilation (cmae_jax.aot).
    """
    boxed = jax.eval_shape(init_fn, rng)
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        nn.meta.unbox(boxed),
        shardings,
    )
    return shardings, abstract


def create_sharded_state(
    init_fn: Callable[[jax.Array], TrainState],
    rng: jax.Array,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]],
) -> tuple[TrainState, Any, Any]:
    """Initialises the state with every leaf already in its final sharding.

    `init_fn` may return leaves boxed with logical axis names (nn.with_logical_partitioning);
    their names map to mesh axes by `rules`. Returns (state, shardings, abstract_state): the
    abstract state (ShapeDtypeStructs with shardings) is the restore target for checkpoints.
    No device ever holds the whole state: each computes only its own shards.
    """
    shardings, abstract = abstract_sharded_state(init_fn, rng, mesh, rules)
    return init_sharded(init_fn, rng, shardings), shardings, abstract


def init_sharded(init_fn: Callable[[jax.Array], TrainState], rng: jax.Array, shardings: Any) -> Any:
    """Runs `init_fn` with every leaf computed directly in its sharding (see
    abstract_sharded_state); no device ever holds the whole state."""
    # The explicit out_shardings place every leaf; no mesh context is needed while tracing
    # (init's dummy batch of 2 need not be divisible by the batch axes).
    return jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
