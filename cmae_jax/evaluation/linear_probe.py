"""Linear probe (SPEC, MAE's main_linprobe): frozen encoder, BatchNorm without affine, Linear.

Head: BatchNorm(use_scale=False, use_bias=False, eps 1e-6, torch momentum 0.1) then a
Dense layer (kernel ~ truncated normal, std 0.01, zero bias). Optimiser: LARS (momentum
0.9, trust coefficient 0.001, no weight decay, the bias outside the trust ratio) or SGD
with momentum, lr = base_lr * batch / 256 with linear warmup and cosine decay.

Two input modes, one update step:
  * augmented (config.linear_probe.augment): RandomResizedCrop + flip views
    (data.views.online_view, config.linear_probe.crop_scale) from the resumable tf.data
    stream; the frozen encoder embeds every batch inside the step (no gradient);
  * cached (augment off, cache_features on): the eval-view features are extracted once,
    and each epoch draws a permutation of them (seeded by (seed, epoch)); the step then
    costs one small matmul.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from cmae_jax import sharding, train_state
from cmae_jax.data import pipeline, sources, views


class LinearHead(nn.Module):
    """BatchNorm without affine parameters, then a Linear layer to the classes."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.BatchNorm(
            use_running_average=not train,
            use_scale=False,
            use_bias=False,
            momentum=0.9,
            epsilon=1e-6,
            name="norm",
        )(x.astype(jnp.float32))
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.initializers.truncated_normal(0.01),
            bias_init=nn.initializers.zeros,
            name="head",
        )(x)


def make_optimizer(
    probe_cfg: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, lr schedule) of the probe: LARS or SGD, warmup + cosine, lr scaled by batch."""
    peak = probe_cfg.base_lr * probe_cfg.batch_size / 256
    warmup = min(round(probe_cfg.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(total_steps, warmup + 1), 0.0
    )
    matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    if probe_cfg.optimizer == "lars":
        tx = optax.lars(
            schedule,
            weight_decay=probe_cfg.weight_decay,
            weight_decay_mask=matrices,
            trust_ratio_mask=matrices,
            momentum=0.9,
        )
    elif probe_cfg.optimizer == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(probe_cfg.weight_decay, mask=matrices),
            optax.sgd(schedule, momentum=0.9),
        )
    else:
        raise ValueError(
            f"config.linear_probe.optimizer={probe_cfg.optimizer!r} is not 'lars' or 'sgd'."
        )
    return tx, schedule


def make_train_step(
    head: LinearHead,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    embed: Callable[[Any, jax.Array], jax.Array] | None,
):
    """(state, encoder_params, batch) -> (state, metrics); `embed` None: batch holds features."""

    def train_step(state: train_state.TrainState, encoder_params: Any, batch: dict):
        if embed is None:
            x = batch["features"]
        else:
            x = jax.lax.stop_gradient(embed(encoder_params, batch["image"]))

        def loss_fn(params):
            logits, updated = head.apply(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
            return loss.mean(), (updated["batch_stats"], accuracy)

        (loss, (batch_stats, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = train_state.TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        metrics = {"loss": loss, "train_accuracy": accuracy, "learning_rate": schedule(state.step)}
        return new_state, metrics

    return train_step


def cached_batches(
    features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of endless shuffled global batches of cached features.

    Epoch e is the permutation of a generator seeded with (seed, e); its last
    N mod batch_size examples are dropped.
    """
    local = batch_size // jax.process_count()
    offset = jax.process_index() * local
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(features))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start + offset : start + offset + local]
            yield {"features": features[rows], "label": labels[rows]}
        epoch += 1


def augmented_batches(
    config: ml_collections.ConfigDict, source: sources.Source
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the RandomResizedCrop + flip stream (resumable tf.data)."""
    probe = config.linear_probe
    view_cfg = config.input.copy_and_resolve_references()
    with view_cfg.unlocked():
        view_cfg.crop_scale = tuple(probe.crop_scale)
        view_cfg.shift = 0
        view_cfg.global_batch_size = probe.batch_size

    def view_fn(image, seed):
        image = views.online_view(image, seed, view_cfg)
        return {"image": pipeline.normalize(image, view_cfg.mean, view_cfg.std)}

    probe_config = config.copy_and_resolve_references()
    with probe_config.unlocked():
        probe_config.input = view_cfg
    for batch in pipeline.train_dataset(
        probe_config,
        source,
        start_step=0,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        view_fn=view_fn,
    ).as_numpy_iterator():
        yield {"image": batch["image"], "label": batch["label"]}


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    rules: Any,
    *,
    embed: Callable[[Any, jax.Array], jax.Array] | None,
    encoder_params: Any,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    writer: Any = None,
) -> dict[str, float]:
    """Trains the probe and returns {'top1'} on the test features.

    With config.linear_probe.augment, `embed(encoder_params, images)` gives the probe's
    input features of augmented train images (and `train_features` only fixes the width);
    otherwise the probe trains on `train_features`.
    """
    probe = config.linear_probe
    num_classes = config.dataset.num_classes
    if probe.augment and embed is None:
        raise ValueError("config.linear_probe.augment needs an encoder (not raw pixels).")
    num_train = len(train_labels)
    if probe.augment:
        num_train = sources.make_source(config.dataset, config.eval.train_split).num_examples
    steps_per_epoch = max(1, num_train // probe.batch_size)
    total_steps = int(probe.num_epochs * steps_per_epoch)
    head = LinearHead(num_classes)
    tx, schedule = make_optimizer(probe, steps_per_epoch, total_steps)
    dim = train_features.shape[1]

    def init_fn(rng):
        variables = head.init(rng, jnp.zeros((2, dim), jnp.float32), train=False)
        return train_state.TrainState(
            step=jnp.zeros([], jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(variables["params"]),
        )

    state, state_shardings, _ = train_state.create_sharded_state(
        init_fn, jax.random.key(config.seed), mesh, rules
    )
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(head, tx, schedule, embed if probe.augment else None),
        in_shardings=(state_shardings, None, batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    if probe.augment:
        local = augmented_batches(
            config, sources.make_source(config.dataset, config.eval.train_split)
        )
    else:
        local = cached_batches(train_features, train_labels, probe.batch_size, config.seed)
    batches = sharding.prefetch_to_devices(local, batch_sharding)
    logging.info("Linear probe: %d steps (%d per epoch)", total_steps, steps_per_epoch)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for step in range(1, total_steps + 1):
            state, metrics = train_step(state, encoder_params, next(batches))
            if writer is not None and (step % config.log_every_steps == 0 or step == total_steps):
                metrics = {f"linear_probe/{k}": float(v) for k, v in metrics.items()}
                writer.write_scalars(step, metrics)
    logits = head.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        jnp.asarray(test_features),
        train=False,
    )
    return {"top1": float(np.mean(np.asarray(jnp.argmax(logits, -1)) == test_labels))}
