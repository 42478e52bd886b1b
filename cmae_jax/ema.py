"""The EMA target branch, written as an optax transform whose state holds the target."""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class EmaTargetState(NamedTuple):
    """Optimiser state of `ema_target`: update count and the target parameters."""

    count: jax.Array
    target: Any


def momentum_schedule(base: float, total_steps: int, kind: str = "constant") -> optax.Schedule:
    """EMA momentum per step: constant, or cosine from `base` to 1.0 over `total_steps`."""
    if kind == "constant":
        return lambda step: jnp.full([], base, jnp.float32)
    if kind == "cosine":

        def cosine(step):
            progress = jnp.minimum(step, total_steps) / max(total_steps, 1)
            return 1.0 - (1.0 - base) * (jnp.cos(np.pi * progress) + 1.0) / 2.0

        return cosine
    raise ValueError(f"config.ema.schedule={kind!r} is not one of 'constant', 'cosine'.")


def ema_target(momentum: optax.Schedule, keys: Sequence[str]) -> optax.GradientTransformation:
    """Keeps `target <- m * target + (1 - m) * new_params` for the top-level `keys` of params.

    Chain it last: it needs the final updates to know the new online parameters, and it
    passes the updates through unchanged. The target starts as a copy of the online
    parameters and never sees a gradient.
    """
    keys = tuple(keys)

    def select(tree):
        return {key: tree[key] for key in keys}

    def init_fn(params):
        return EmaTargetState(count=jnp.zeros([], jnp.int32), target=select(params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "ema_target needs the parameters: call tx.update(grads, state, params)."
            )
        new_online = optax.apply_updates(select(params), select(updates))
        m = momentum(state.count)
        target = jax.tree.map(
            lambda t, p: (m * t + (1.0 - m) * p).astype(t.dtype), state.target, new_online
        )
        return updates, EmaTargetState(count=optax.safe_increment(state.count), target=target)

    return optax.GradientTransformation(init_fn, update_fn)


def target_params(opt_state: Any) -> dict:
    """The EMA target parameters held in an optimiser state chain, keyed by the top-level
    params keys they copy (several `ema_target`s in one chain, e.g. MAE-CT's projector and
    encoder EMAs with their own momenta, are merged)."""
    targets: dict = {}
    states = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaTargetState))
    for state in states:
        if isinstance(state, EmaTargetState):
            overlap = set(targets) & set(state.target)
            if overlap:
                raise ValueError(f"Two EMA targets in one optimiser state copy {sorted(overlap)}.")
            targets.update(state.target)
    if not targets:
        raise ValueError("This optimiser state has no EMA target (contrastive branch is off).")
    return targets
