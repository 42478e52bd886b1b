"""CMAE pretraining (and plain MAE, its contrastive_weight = 0 special case), top to bottom.

Online branch: the encoder sees the visible patches of the online view; the pixel decoder
reconstructs the masked ones; the feature decoder's pooled output goes through projector and
predictor. Target branch: an EMA copy of encoder and projector (kept in the optimiser state,
see cmae_jax.ema) embeds the whole pixel-shifted target view. Loss: normalised-pixel MSE +
contrastive_weight * InfoNCE over the global batch.
"""

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cmae_jax import checkpointing, ema, loop, losses, optim, sharding, train_state, visualize
from cmae_jax.data import masking, pipeline
from cmae_jax.evaluation import knn
from cmae_jax.models import cmae as cmae_model
from cmae_jax.models import vit

# The parts of the online parameters that the EMA target follows.
TARGET_KEYS = ("encoder", "projector")


def split_micro_batches(batch: dict[str, jax.Array], num_micro: int) -> dict[str, jax.Array]:
    """[B, ...] -> [num_micro, B / num_micro, ...]; micro-batch i holds rows i, i + n, i + 2n...

    Strided rather than contiguous: every device's contiguous block of rows then holds an
    equal share of every micro-batch, so the split moves no data between devices.
    """

    def split(x):
        if x.shape[0] % num_micro:
            raise ValueError(
                f"Batch of {x.shape[0]} rows is not divisible by "
                f"config.grad_accumulation_steps={num_micro}."
            )
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def make_batch_gradients(
    model: nn.Module, config: ml_collections.ConfigDict, grad_shardings: Any = None
):
    """(params, batch_stats, target_params, batch) -> (grads, [total, rec, con], batch_stats).

    The losses of one batch and their gradients with respect to the online parameters.
    `grad_shardings` (the parameters' shardings) pins the gradients to the parameters'
    layout, so that under FSDP they are reduce-scattered, never held whole.
    """
    contrastive = config.loss.contrastive_weight > 0
    patch_size = config.input.patch_size

    def batch_gradients(params, batch_stats, target_params, batch):
        target_patches = vit.patchify(batch["online"], patch_size)
        keys = None
        if contrastive:
            # The target branch: EMA parameters, whole target view, no gradient. Its
            # BatchNorm uses the batch's statistics; the running averages it would
            # update are never used, so they are dropped.
            target_vars = {
                "params": target_params,
                "batch_stats": {"projector": batch_stats["projector"]},
            }
            keys, _ = model.apply(
                target_vars,
                batch["target"],
                train=True,
                method=model.target_projection,
                mutable=["batch_stats"],
            )
            keys = jax.lax.stop_gradient(keys)

        def loss_fn(params):
            outputs, updated = model.apply(
                {"params": params, "batch_stats": batch_stats},
                batch["online"],
                batch["ids_keep"],
                batch["ids_mask"],
                train=True,
                mutable=["batch_stats"],
            )
            rec = losses.reconstruction_loss(
                outputs["pixel_pred"], target_patches, batch["ids_mask"], config.loss.norm_pix
            )
            con = jnp.zeros([], jnp.float32)
            if contrastive:
                con = losses.info_nce(outputs["online_pred"], keys, config.loss.temperature)
            total = rec + config.loss.contrastive_weight * con
            return total, (rec, con, updated.get("batch_stats", {}))

        (total, (rec, con, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        return grads, jnp.stack([total, rec, con]), new_stats

    return batch_gradients


def make_train_step(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    tx,
    lr_schedule,
    momentum,
    grad_shardings: Any = None,
):
    """The update step: losses, gradients, optimiser (and so the EMA target) update.

    With config.grad_accumulation_steps = n > 1 the batch is split into n micro-batches
    (see split_micro_batches) run in a lax.scan; the update uses the mean of their
    gradients. Each micro-batch is a complete CMAE batch of its own: its InfoNCE negatives
    are the other B / n examples of that micro-batch, and the projector/predictor BatchNorm
    normalises with its statistics (the running averages see n updates per step).
    `grad_shardings`: see make_batch_gradients; it also lays out the accumulator.
    """
    contrastive = config.loss.contrastive_weight > 0
    num_micro = int(config.get("grad_accumulation_steps", 1) or 1)
    batch_gradients = make_batch_gradients(model, config, grad_shardings)

    def constrain(grads):
        if grad_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, grad_shardings)

    def train_step(state: train_state.TrainState, batch: dict[str, jax.Array]):
        target = ema.target_params(state.opt_state) if contrastive else None
        if num_micro == 1:
            grads, loss_parts, batch_stats = batch_gradients(
                state.params, state.batch_stats, target, batch
            )
        else:

            def accumulate(carry, micro_batch):
                grad_sum, loss_sum, stats = carry
                grads, loss_parts, stats = batch_gradients(state.params, stats, target, micro_batch)
                grad_sum = constrain(jax.tree.map(jnp.add, grad_sum, grads))
                return (grad_sum, loss_sum + loss_parts, stats), None

            zeros = constrain(jax.tree.map(jnp.zeros_like, state.params))
            carry = (zeros, jnp.zeros([3], jnp.float32), state.batch_stats)
            (grad_sum, loss_sum, batch_stats), _ = jax.lax.scan(
                accumulate, carry, split_micro_batches(batch, num_micro)
            )
            grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
            loss_parts = loss_sum / num_micro
        total, rec, con = loss_parts[0], loss_parts[1], loss_parts[2]
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": total,
            "reconstruction_loss": rec,
            "contrastive_loss": con,
            "learning_rate": lr_schedule(state.step),
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
        }
        if contrastive:
            metrics["ema_momentum"] = momentum(state.step)
        new_state = train_state.TrainState(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    return train_step


def jit_train_step(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    tx,
    lr_schedule,
    momentum,
    state_shardings: Any,
    mesh: jax.sharding.Mesh,
):
    """The guarded update step jitted with its shardings (cmae_jax.loop.jit_step), as the
    trainer runs it; the ahead-of-time compiler and the benchmarks share it."""
    step = make_train_step(
        model, config, tx, lr_schedule, momentum, grad_shardings=state_shardings.params
    )
    return loop.jit_step(step, state_shardings, mesh)


def make_init_state(model: nn.Module, tx: optax.GradientTransformation, config):
    """A function rng -> TrainState (leaves boxed with logical axis names)."""
    size, channels = config.input.image_size, config.input.channels
    grid = size // config.input.patch_size
    num_keep, num_mask = masking.mask_counts(grid, config.input)

    def init_state(rng):
        variables = model.init(
            rng,
            jnp.zeros((2, size, size, channels), jnp.float32),
            jnp.zeros((2, num_keep), jnp.int32),
            jnp.zeros((2, num_mask), jnp.int32),
            train=False,
        )
        params = variables["params"]
        return train_state.TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
        )

    return init_state


def make_model_and_optimizer(config, steps_per_epoch: int, total_steps: int):
    """(model, tx, lr_schedule, momentum_schedule) of a config; tx holds the EMA target."""
    contrastive = config.loss.contrastive_weight > 0
    model = cmae_model.build_model(config.model, config.input, contrastive=contrastive)
    lr_schedule = optim.learning_rate_schedule(
        config.optimizer, config.input.global_batch_size, steps_per_epoch, total_steps
    )
    momentum = ema.momentum_schedule(config.ema.momentum, total_steps, config.ema.schedule)
    tx = optim.adamw(config.optimizer, lr_schedule)
    if contrastive:
        tx = optax.chain(tx, ema.ema_target(momentum, TARGET_KEYS))
    return model, tx, lr_schedule, momentum


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Pretrains from scratch (or config.init_from) or resumes WORKDIR's newest checkpoint.

    `stop_at_step` ends the run after saving a checkpoint at that step, as a preemption
    would; a later call resumes from there. Returns cmae_jax.loop.train's results:
    'history', 'knn_top1' (when evaluated), 'complete', 'preempted', ...
    """
    run = loop.set_up(config, workdir, method=config.method)

    # ---------------------------------------------------------------- Model and optimiser
    model, tx, lr_schedule, momentum = make_model_and_optimizer(
        config, run.steps_per_epoch, run.total_steps
    )
    init_state = make_init_state(model, tx, config)
    train_step = make_train_step(model, config, tx, lr_schedule, momentum)

    # ---------------------------------------------------------------- Fresh start
    def start_fresh(state: train_state.TrainState, run: loop.Run) -> train_state.TrainState:
        """Continues from a published or earlier checkpoint (config.init_from), with a fresh
        optimiser whose EMA target starts as a copy of the loaded parameters."""
        if not config.get("init_from", ""):
            return state
        abstract = jax.eval_shape(lambda: state)
        params, batch_stats = checkpointing.load_params(
            config.init_from,
            abstract.params,
            required=("encoder",),
            optional=tuple(k for k in abstract.params if k != "encoder"),
            abstract_batch_stats=abstract.batch_stats,
        )

        def merge(state, params, batch_stats):
            params = {**state.params, **params}
            return state.replace(
                params=params,
                batch_stats={**state.batch_stats, **batch_stats},
                opt_state=tx.init(params),
            )

        return loop.update_in_place(merge, state, params, batch_stats)

    # ---------------------------------------------------------------- Pictures
    # A fixed set of training examples (the first of step 0) to follow reconstructions on.
    picture_batch = next(
        pipeline.train_dataset(config, run.train_source, start_step=0).as_numpy_iterator()
    )
    picture_batch = {k: picture_batch[k][:8] for k in ("online", "ids_keep", "ids_mask")}
    replicated = sharding.replicated(run.mesh)
    reconstruct = jax.jit(
        lambda variables, batch: model.apply(
            variables, batch["online"], batch["ids_keep"], batch["ids_mask"], train=False
        )["pixel_pred"],
        out_shardings=replicated,
    )

    def write_pictures(step: int, state: train_state.TrainState) -> None:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        pred = np.asarray(reconstruct(variables, jax.device_put(picture_batch, replicated)))
        grid = visualize.reconstruction_grid(
            picture_batch["online"],
            pred,
            picture_batch["ids_mask"],
            patch_size=config.input.patch_size,
            mean=config.input.mean,
            std=config.input.std,
            norm_pix=config.loss.norm_pix,
            upscale=max(1, 96 // config.input.image_size),
        )
        run.writer.write_images(step, {"reconstructions": grid[None]})
        if jax.process_index() == 0:
            visualize.write_png(
                os.path.join(workdir, "reconstructions", f"step_{step:07d}.png"), grid
            )

    # ---------------------------------------------------------------- Loop
    batch_keys = ("online", "ids_keep", "ids_mask")
    if config.loss.contrastive_weight > 0:
        batch_keys += ("target",)
    task = loop.Task(
        init_state=init_state,
        train_step=train_step,
        batch_keys=batch_keys,
        start_fresh=start_fresh,
        log_line=lambda m: (
            f"loss {m['loss']:.4f} (rec {m['reconstruction_loss']:.4f}, "
            f"con {m['contrastive_loss']:.4f})"
        ),
        embed=knn.feature_fn(model),
        on_picture_step=write_pictures,
    )
    return loop.train(run, task, stop_at_step=stop_at_step)
