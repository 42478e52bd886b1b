"""Low-shot classification: a few labels per class, logistic regression on frozen features.

Subsets (SPEC): a fraction of the labels (1%, 10%) or a number of images per class (1, 2,
5), drawn per class: class c's examples are permuted by a generator seeded with (seed, c)
and the first n taken, so a subset depends only on (labels, seed, size) and grows by
adding examples (the 1-shot set is inside the 2-shot set). A fraction f takes
max(1, round(f * count_c)) examples of class c.

The classifier, as the low-shot protocols of MSN / MAE-CT (cyanure): multinomial logistic
regression on L2-normalised features with an L2 penalty on the weights (not the bias),
fitted to convergence on the whole subset with L-BFGS (optax.lbfgs, jitted).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cmae_jax.losses import l2_normalize


def subset_indices(
    labels: np.ndarray, *, per_class: int = 0, fraction: float = 0.0, seed: int = 0
) -> np.ndarray:
    """Sorted indices of a class-wise subset: `per_class` images or `fraction` of each class."""
    if (per_class > 0) == (fraction > 0):
        raise ValueError(f"Give exactly one of per_class ({per_class}) and fraction ({fraction}).")
    labels = np.asarray(labels)
    chosen = []
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        count = per_class if per_class else max(1, round(fraction * len(members)))
        if count > len(members):
            raise ValueError(f"Class {c} has {len(members)} examples, fewer than {count}.")
        order = np.random.default_rng([seed, int(c)]).permutation(len(members))
        chosen.append(members[order[:count]])
    return np.sort(np.concatenate(chosen))


@functools.partial(jax.jit, static_argnames=("num_classes", "num_steps"))
def _fit(x, y, l2, *, num_classes, num_steps):
    params = {
        "w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }

    def loss(params):
        logits = x @ params["w"] + params["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + 0.5 * l2 * jnp.sum(params["w"] ** 2)

    tx = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=num_steps)
    return params


def logistic_regression(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    num_classes: int,
    l2: float = 1e-4,
    num_steps: int = 300,
) -> np.ndarray:
    """Predicted classes of `test_features` by an L2-penalised logistic regression fitted on
    the L2-normalised train features."""
    params = _fit(
        l2_normalize(jnp.asarray(train_features, jnp.float32)),
        jnp.asarray(train_labels, jnp.int32),
        jnp.float32(l2),
        num_classes=num_classes,
        num_steps=num_steps,
    )
    test = l2_normalize(jnp.asarray(test_features, jnp.float32))
    return np.asarray(jnp.argmax(test @ params["w"] + params["b"], axis=-1))


def evaluate_low_shot(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    shots: tuple[int, ...] = (1, 2, 5),
    fractions: tuple[float, ...] = (0.01, 0.1),
    seeds: tuple[int, ...] = (0, 1, 2),
    l2: float = 1e-4,
    num_steps: int = 300,
) -> dict[str, float]:
    """Top-1 per subset, averaged over `seeds`: {'1_shot': ..., '1pct': ..., ...}."""
    settings = [(f"{n}_shot", dict(per_class=n)) for n in shots]
    settings += [(f"{100 * f:g}pct", dict(fraction=f)) for f in fractions]
    results = {}
    for name, size in settings:
        accuracies = []
        for seed in seeds:
            chosen = subset_indices(train_labels, seed=seed, **size)
            predictions = logistic_regression(
                train_features[chosen],
                train_labels[chosen],
                test_features,
                num_classes=num_classes,
                l2=l2,
                num_steps=num_steps,
            )
            accuracies.append(float(np.mean(predictions == test_labels)))
        results[name] = float(np.mean(accuracies))
    return results
