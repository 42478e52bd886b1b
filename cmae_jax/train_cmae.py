"""CMAE pretraining (and plain MAE, its contrastive_weight = 0 special case), top to bottom.

Online branch: the encoder sees the visible patches of the online view; the pixel decoder
reconstructs the masked ones; the feature decoder's pooled output goes through projector and
predictor. Target branch: an EMA copy of encoder and projector (kept in the optimiser state,
see cmae_jax.ema) embeds the whole pixel-shifted target view. Loss: normalised-pixel MSE +
contrastive_weight * InfoNCE over the global batch.
"""

import json
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

from cmae_jax import ema, losses, optim, sharding, train_state, visualize
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


def make_train_step(model: nn.Module, config: ml_collections.ConfigDict, tx, lr_schedule, momentum):
    """The update step: losses, gradients, optimiser (and so the EMA target) update."""
    contrastive = config.loss.contrastive_weight > 0
    patch_size = config.input.patch_size

    def train_step(state: train_state.TrainState, batch: dict[str, jax.Array]):
        target_patches = vit.patchify(batch["online"], patch_size)
        keys = None
        if contrastive:
            # The target branch: EMA parameters, whole target view, no gradient. Its
            # BatchNorm uses the batch's statistics; the running averages it would
            # update are never used, so they are dropped.
            target_vars = {
                "params": ema.target_params(state.opt_state),
                "batch_stats": {"projector": state.batch_stats["projector"]},
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
                {"params": params, "batch_stats": state.batch_stats},
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

        (total, (rec, con, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
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


def evaluate_knn(
    model: nn.Module,
    params: Any,
    config: ml_collections.ConfigDict,
    batch_sharding: jax.sharding.NamedSharding,
) -> float:
    """k-NN top-1 of the frozen encoder: train split as memory bank, eval split as queries."""
    feature = config.eval.feature
    feature_fn = jax.jit(
        lambda p, images: model.apply({"params": p}, images, method=model.features)[feature]
    )

    def features_of(split):
        source = sources.make_source(config.dataset, split)
        batches = pipeline.eval_dataset(
            config,
            source,
            batch_size=config.eval.batch_size // jax.process_count(),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ).as_numpy_iterator()
        return knn.extract_features(lambda x: feature_fn(params, x), batches, batch_sharding)

    bank, bank_labels = features_of(config.eval.train_split)
    queries, query_labels = features_of(config.dataset.eval_split)
    return knn.knn_accuracy(
        bank,
        bank_labels,
        queries,
        query_labels,
        k=config.eval.knn_k,
        temperature=config.eval.knn_temperature,
        num_classes=config.dataset.num_classes,
    )


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
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    # ---------------------------------------------------------------- Mesh
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_axis_rules(config.logical_axis_rules)
    batch_sharding = sharding.batch_sharding(mesh)
    logging.info(
        "Mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count()
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
    train_step = jax.jit(
        make_train_step(model, config, tx, lr_schedule, momentum),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )

    # ---------------------------------------------------------------- Checkpoint
    checkpointer = Checkpointer(
        workdir, keep=config.keep_checkpoints, save_every_steps=config.checkpoint_every_steps
    )
    start_step = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        state, position = checkpointer.restore(latest, abstract_state)
        check_resumable(position, data_position(config, latest, steps_per_epoch), workdir)
        start_step = position["next_step"]
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
    batches = sharding.prefetch_to_devices(local_batches, batch_sharding)
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        last_log_time, last_log_step = time.time(), start_step
        history = []
        end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
        for step in range(start_step + 1, end_step + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = train_step(state, next(batches))
            report_progress(step)
            is_last = step == end_step
            if step % config.log_every_steps == 0 or is_last:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                steps_per_sec = (step - last_log_step) / (now - last_log_time)
                metrics["images_per_sec"] = steps_per_sec * global_batch_size
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
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({k: v for k, v in results.items() if k != "history"}, f, indent=2)
    return results
