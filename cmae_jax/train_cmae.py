"""CMAE pretraining (and plain MAE, its contrastive_weight = 0 special case), top to bottom.

Online branch: the encoder sees the visible patches of the online view; the pixel decoder
reconstructs the masked ones; the feature decoder's pooled output goes through projector and
predictor. Target branch: an EMA copy of encoder and projector (kept in the optimiser state,
see cmae_jax.ema) embeds the whole pixel-shifted target view. Loss: normalised-pixel MSE +
contrastive_weight * InfoNCE over the global batch.
"""

import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from cmae_jax import ema, losses, optim, sharding, train_state, visualize
from cmae_jax import workdir as workdir_files
from cmae_jax.checkpointing import Checkpointer
from cmae_jax.data import masking, pipeline, sources
from cmae_jax.evaluation import knn
from cmae_jax.models import cmae as cmae_model
from cmae_jax.models import vit

# The parts of the online parameters that the EMA target follows.
TARGET_KEYS = ("encoder", "projector")


def data_position(config: ml_collections.ConfigDict, next_step: int, steps_per_epoch: int) -> dict:
    """What a checkpoint records about the input stream: enough to resume it exactly."""
    return {
        "next_step": int(next_step),
        "epoch": int(next_step // steps_per_epoch),
        "examples_seen": int(next_step * config.input.global_batch_size),
        "seed": int(config.seed),
        "global_batch_size": int(config.input.global_batch_size),
        "steps_per_epoch": int(steps_per_epoch),
    }


def check_resumable(position: dict, expected: dict, workdir: str) -> None:
    """Refuses to resume a run whose data order would silently change."""
    for key in ("seed", "global_batch_size", "steps_per_epoch"):
        if position.get(key) != expected[key]:
            raise ValueError(
                f"The checkpoint in {workdir} was written with {key}={position.get(key)}, this "
                f"config has {key}={expected[key]}: resuming would change the data order. Use "
                "the same value, or a new --workdir to start afresh (the old one is kept)."
            )


def restore_latest(
    checkpointer: Checkpointer,
    abstract_state: Any,
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    workdir: str,
) -> tuple[Any, int] | None:
    """(state, next step) of the newest checkpoint, once its data order is checked; or None."""
    latest = checkpointer.latest_step()
    if latest is None:
        return None
    state, position = checkpointer.restore(latest, abstract_state)
    check_resumable(position, data_position(config, latest, steps_per_epoch), workdir)
    return state, position["next_step"]


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
    """The update step jitted with its shardings: state in place (donated), batch over
    data x fsdp, metrics replicated. The trainer and the ahead-of-time compiler share it."""
    return jax.jit(
        make_train_step(
            model, config, tx, lr_schedule, momentum, grad_shardings=state_shardings.params
        ),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


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


def knn_feature_fn(model: nn.Module, config: ml_collections.ConfigDict):
    """(params, images) -> the frozen encoder's config.eval.feature ('cls' or 'mean')."""
    feature = config.eval.feature
    return lambda p, images: model.apply({"params": p}, images, method=model.features)[feature]


def evaluate_knn(
    model: nn.Module,
    params: Any,
    config: ml_collections.ConfigDict,
    batch_sharding: jax.sharding.NamedSharding,
) -> float:
    """k-NN top-1 of the frozen encoder: train split as memory bank, eval split as queries."""
    evaluate = knn.make_knn_evaluator(knn_feature_fn(model, config), config, batch_sharding.mesh)
    return evaluate(params)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Pretrains from scratch or resumes from WORKDIR's newest checkpoint; returns results.

    `stop_at_step` ends the run after saving a checkpoint at that step, as a preemption
    would (the schedule still spans all steps); a later call resumes from there.
    Results: 'knn_top1' (when evaluated) and 'history', the (step, loss) pairs logged.
    """
    is_chief = jax.process_index() == 0
    global_batch_size = config.input.global_batch_size
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    if is_chief:
        workdir_files.write_json(workdir, "config.json", config)

    # ---------------------------------------------------------------- Mesh
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_axis_rules(config.logical_axis_rules)
    batch_sharding = sharding.batch_sharding(mesh)
    logging.info(
        "Mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count()
    )
    accumulation = int(config.get("grad_accumulation_steps", 1) or 1)
    micro_batch_ways = accumulation * mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % micro_batch_ways:
        raise ValueError(
            f"config.input.global_batch_size={global_batch_size} must be divisible by "
            f"config.grad_accumulation_steps x data x fsdp = {micro_batch_ways}, so that every "
            "micro-batch splits evenly over the devices."
        )

    # ---------------------------------------------------------------- Input
    train_source = sources.make_source(config.dataset, config.dataset.train_split)
    steps_per_epoch = pipeline.steps_per_epoch(train_source.num_examples, global_batch_size)
    total_steps = config.total_steps or config.num_epochs * steps_per_epoch
    logging.info(
        "%d training examples, %d steps per epoch, %d steps",
        train_source.num_examples,
        steps_per_epoch,
        total_steps,
    )

    # ---------------------------------------------------------------- Model and optimiser
    model, tx, lr_schedule, momentum = make_model_and_optimizer(
        config, steps_per_epoch, total_steps
    )
    init_state = make_init_state(model, tx, config)

    # ---------------------------------------------------------------- Sharding
    state, state_shardings, abstract_state = train_state.create_sharded_state(
        init_state, jax.random.key(config.seed), mesh, rules
    )
    num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    logging.info("Model: %s, %.2fM parameters", config.model.variant, num_params / 1e6)

    # ---------------------------------------------------------------- Update step
    replicated = sharding.replicated(mesh)
    train_step = jit_train_step(
        model, config, tx, lr_schedule, momentum, state_shardings=state_shardings, mesh=mesh
    )

    # ---------------------------------------------------------------- Checkpoint
    checkpointer = Checkpointer(
        workdir, keep=config.keep_checkpoints, save_every_steps=config.checkpoint_every_steps
    )
    start_step = 0
    resumed = restore_latest(checkpointer, abstract_state, config, steps_per_epoch, workdir)
    if resumed is not None:
        state, start_step = resumed
        logging.info("Resumed from %s at step %d", checkpointer.directory, start_step)

    # ---------------------------------------------------------------- Pictures
    # A fixed set of training examples (the first of step 0) to follow reconstructions on.
    picture_batch = next(
        pipeline.train_dataset(config, train_source, start_step=0).as_numpy_iterator()
    )
    picture_batch = {k: picture_batch[k][:8] for k in ("online", "ids_keep", "ids_mask")}
    reconstruct = jax.jit(
        lambda variables, batch: model.apply(
            variables, batch["online"], batch["ids_keep"], batch["ids_mask"], train=False
        )["pixel_pred"],
        out_shardings=replicated,
    )

    def write_pictures(step, state):
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
        writer.write_images(step, {"reconstructions": grid[None]})
        if is_chief:
            visualize.write_png(
                os.path.join(workdir, "reconstructions", f"step_{step:07d}.png"), grid
            )

    # ---------------------------------------------------------------- Loop
    local_batches = pipeline.train_dataset(
        config,
        train_source,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ).as_numpy_iterator()
    # Counts (and logs by name) the unreadable files the pipeline replaced.
    skip_counter = pipeline.SkipCounter(local_batches, train_source)
    batches = sharding.prefetch_to_devices(skip_counter, batch_sharding)
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
    )
    # Periodic k-NN on a strided subset of both splits; jitted once, here.
    every = config.eval.get("every_steps", 0)
    periodic_knn = every and knn.make_knn_evaluator(
        knn_feature_fn(model, config), config, mesh, subset=config.eval.knn_subset
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        last_log_time, last_log_step = time.time(), start_step
        history = []
        end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
        # Profiling: every process traces the same steps (after 10 of warm-up and
        # compilation) into its own folder; tracing adds no collectives of its own.
        profile_steps = int(config.get("profile_steps", 0) or 0)
        profile_first = min(start_step + 11, end_step)
        profile_last = min(profile_first + profile_steps - 1, end_step)
        for step in range(start_step + 1, end_step + 1):
            if profile_steps and step == profile_first:
                jax.profiler.start_trace(
                    os.path.join(workdir, "profile", f"process_{jax.process_index()}")
                )
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = train_step(state, next(batches))
            if profile_steps and step == profile_last:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
            report_progress(step)
            is_last = step == end_step
            if step % config.log_every_steps == 0 or is_last:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                steps_per_sec = (step - last_log_step) / (now - last_log_time)
                metrics["images_per_sec"] = steps_per_sec * global_batch_size
                # All processes log at the same steps, so the collective is safe here.
                metrics["skipped_files"] = float(
                    np.sum(multihost_utils.process_allgather(np.int64(skip_counter.skipped)))
                )
                metrics["epoch"] = step / steps_per_epoch
                last_log_time, last_log_step = now, step
                writer.write_scalars(step, metrics)
                history.append((step, metrics["loss"]))
                eta_min = (total_steps - step) / max(steps_per_sec, 1e-9) / 60
                logging.info(
                    "step %d/%d | loss %.4f (rec %.4f, con %.4f) | %.0f images/s | ETA %.1f min",
                    step,
                    total_steps,
                    metrics["loss"],
                    metrics["reconstruction_loss"],
                    metrics["contrastive_loss"],
                    metrics["images_per_sec"],
                    eta_min,
                )
                if not np.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"Loss is {metrics['loss']} at step {step}.")
            if step % config.image_every_steps == 0 or is_last:
                write_pictures(step, state)
            if periodic_knn and step % every == 0:
                start = time.time()
                top1 = periodic_knn(state.params)
                writer.write_scalars(step, {"knn_top1_subset": top1})
                logging.info(
                    "step %d | k-NN (subset) %.4f in %.0f s", step, top1, time.time() - start
                )
            checkpointer.save(
                step, state, data_position(config, step, steps_per_epoch), force=is_last
            )
        checkpointer.wait()

        # ------------------------------------------------------------ Evaluation
        results: dict[str, Any] = {"history": history}
        if config.eval.knn and end_step == total_steps:
            start = time.time()
            results["knn_top1"] = evaluate_knn(model, state.params, config, batch_sharding)
            writer.write_scalars(total_steps, {"knn_top1": results["knn_top1"]})
            logging.info(
                "k-NN (k=%d) top-1 %.4f in %.0f s",
                config.eval.knn_k,
                results["knn_top1"],
                time.time() - start,
            )
    checkpointer.close()
    writer.flush()
    if is_chief:
        final = {k: v for k, v in results.items() if k != "history"}
        workdir_files.write_json(workdir, "results.json", final)
    return results
