"""CMAE pretraining (and plain MAE, its contrastive_weight = 0 special case), top to bottom.

The method module of 'cmae' (cmae_jax.methods; 'mae' is cmae_jax.methods.mae, this step
with the contrastive branch off): defaults, config checks, views, model, optimiser,
update step, FLOPs and the trainer.

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

from cmae_jax import (
    ema,
    flops,
    loop,
    losses,
    mask_sizes,
    methods,
    optim,
    sharding,
    train_state,
    visualize,
    weights,
)
from cmae_jax.config_checks import ConfigError, require, require_checkpoint
from cmae_jax.models import cmae as cmae_model
from cmae_jax.models import vit

# The parts of the online parameters that the EMA target follows.
TARGET_KEYS = ("encoder", "projector")
# How the master crop holds the crop (data.views.master_content_size).
MASTER_MODES = ("resize", "pad")


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
    num_keep, num_mask = mask_sizes.mask_counts(grid, config.input)

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
    # TF-free: the input pipeline and the evaluations import TensorFlow, which only the
    # trainer needs, not the update step (benchmarks, compile-ahead).
    from cmae_jax.data import pipeline, train_data
    from cmae_jax.evaluation import features
    from cmae_jax.evaluation import hooks as evaluation_hooks

    run = loop.set_up(
        config, workdir, method=config.method, data=train_data.TrainData.from_config(config)
    )

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
        params, batch_stats = weights.load_params(
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

    def write_pictures(step: int, state: train_state.TrainState) -> dict[str, float]:
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
        return {}

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
    )
    hooks = evaluation_hooks.make_hooks(
        config,
        run.mesh,
        features.encoder_embed(model.encoder_spec),
        own={"reconstructions": write_pictures},
    )
    return loop.train(run, task, hooks=hooks, stop_at_step=stop_at_step)


# -------------------------------------------------------------------- The registry entry


def set_defaults(config: ml_collections.ConfigDict) -> None:
    """CMAE's keys (SPEC): the pixel-shifted target view, 2x2 block masking of 65% (35% of
    the cells kept whole), InfoNCE at weight 1."""
    config.input.target_view = True
    config.input.mask_type = "block"
    config.input.mask_ratio = 0.65
    config.loss.contrastive_weight = 1.0


def validate(config: ml_collections.ConfigDict, checks: methods.Checks) -> None:
    """The CMAE / MAE keys: masking, pixel shift, the contrastive branch, init_from."""
    inp = config.input
    require(
        0.0 < inp.mask_ratio < 1.0,
        f"config.input.mask_ratio={inp.mask_ratio} is outside (0, 1); it is the fraction of "
        "patches hidden from the encoder, e.g. 0.75 (MAE) or 0.65 (CMAE block masking).",
    )
    # Building the model (no parameters yet) and the mask lengths checks the variant, the
    # patch and image sizes, the dtype and the masking against each other.
    try:
        cmae_model.build_model(config.model, inp, contrastive=config.loss.contrastive_weight > 0)
        mask_sizes.mask_counts(inp.image_size // inp.patch_size, inp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    require(
        inp.shift >= 0, f"config.input.shift={inp.shift} must be >= 0 (pixels of target offset)."
    )
    master = inp.get("master_size") or 0
    require(
        master == 0 or master >= inp.image_size + inp.shift,
        f"config.input.master_size={master} cannot hold a {inp.image_size} px view shifted by "
        f"up to {inp.shift} px; use 0 (image_size + shift + 1, the official 256 at 224 px) or "
        f"at least {inp.image_size + inp.shift}.",
    )
    require(
        inp.get("master_mode", "resize") in MASTER_MODES,
        f"config.input.master_mode={inp.get('master_mode')!r} is not one of "
        f"{', '.join(MASTER_MODES)}: 'resize' fills the master with the crop (the "
        "official CMAE), 'pad' puts the crop at the views' size in its top-left corner.",
    )
    require(
        config.loss.contrastive_weight >= 0,
        f"config.loss.contrastive_weight={config.loss.contrastive_weight} must be >= 0.",
    )
    if config.loss.contrastive_weight > 0:
        require(
            inp.target_view,
            "config.loss.contrastive_weight > 0 needs the target view: set "
            "--config.input.target_view=True.",
        )
        require(
            config.loss.temperature > 0,
            f"config.loss.temperature={config.loss.temperature} must be > 0.",
        )
        require(
            0.0 <= config.ema.momentum <= 1.0,
            f"config.ema.momentum={config.ema.momentum} must lie in [0, 1], e.g. 0.996.",
        )
    if config.get("init_from") and checks.check_data:
        require_checkpoint(config.init_from, "config.init_from")


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """One example's columns: the online view (+ target view), the mask, label, index."""
    inp = config.input
    size, channels = inp.image_size, inp.channels
    keep, masked = mask_sizes.mask_counts(size // inp.patch_size, inp)
    image = jax.ShapeDtypeStruct((size, size, channels), jnp.float32)
    spec = {
        "online": image,
        "ids_keep": jax.ShapeDtypeStruct((keep,), jnp.int32),
        "ids_mask": jax.ShapeDtypeStruct((masked,), jnp.int32),
        "label": jax.ShapeDtypeStruct((), jnp.int32),
        "index": jax.ShapeDtypeStruct((), jnp.int32),
    }
    if inp.target_view:
        spec["target"] = image
    return spec


def views(config: ml_collections.ConfigDict) -> Any:
    """The masked views (cmae_jax.data.example_views.masked_views)."""
    # TF-free: example_views imports TensorFlow; only the input pipeline calls this.
    from cmae_jax.data import example_views

    return example_views.masked_views(config)


def build(
    config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> methods.StepParts:
    """Model, initial state and update step as the trainer builds them."""
    model, tx, lr_schedule, momentum = make_model_and_optimizer(
        config, steps_per_epoch, total_steps
    )

    def make_update(state_shardings: Any):
        grad_shardings = None if state_shardings is None else state_shardings.params
        return make_train_step(model, config, tx, lr_schedule, momentum, grad_shardings)

    return methods.StepParts(model, make_init_state(model, tx, config), make_update)


def flops_per_example(config: ml_collections.ConfigDict) -> float:
    """Analytic FLOPs of one example's CMAE/MAE update: matmuls and attention.

    Trained parts count 3x their forward (backward = 2x forward); the EMA target branch
    runs forward only. No rematerialisation: this is the 'model FLOPs' of MFU.
    """
    model = cmae_model.build_model(
        config.model, config.input, contrastive=config.loss.contrastive_weight > 0
    )
    spec = model.encoder_spec
    grid = config.input.image_size // spec.patch_size
    patches = grid * grid
    keep, _ = mask_sizes.mask_counts(grid, config.input)
    pixel = spec.patch_size * spec.patch_size * spec.channels

    def decoder(out_dim, depth):
        dw = model.pixel_decoder_width
        embed = 2 * (keep + 1) * spec.width * dw
        blocks = flops.transformer_flops(patches + 1, dw, depth, 4 * dw)
        return embed + blocks + 2 * (patches + 1) * dw * out_dim

    def head(d_in):
        return flops.mlp_head_flops([d_in, model.projector_hidden, model.projection_dim])

    trained = flops.encoder_flops(spec, keep + 1, spec.channels)
    trained += decoder(pixel, model.pixel_decoder_depth)
    target = 0.0
    batch = config.input.global_batch_size
    if model.contrastive:
        trained += decoder(spec.width, model.feature_decoder_depth)
        pooled, rows = model.contrastive_width(), model.contrastive_rows()
        trained += rows * (head(pooled) + head(model.projection_dim))
        target = flops.encoder_flops(spec, patches + 1, spec.channels) + rows * head(pooled)
        # The InfoNCE logits rows of one image's queries.
        trained += rows * 2 * rows * batch * model.projection_dim
    return float(3 * trained + target)


def random_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
    """A global batch of batch_spec's columns at random: normal images, real masks."""
    inp = config.input
    views = ("online", "target") if inp.target_view else ("online",)
    batch = methods.random_batch(config, seed, views=views)
    grid = inp.image_size // inp.patch_size
    keep, _ = mask_sizes.mask_counts(grid, inp)
    # The masks draw from a stream of their own, beside the images' stream of `seed`.
    rng = np.random.default_rng([seed, 1])
    order = np.argsort(rng.random((inp.global_batch_size, grid * grid)), axis=1).astype(np.int32)
    batch.update(
        ids_keep=np.sort(order[:, :keep], axis=1), ids_mask=np.sort(order[:, keep:], axis=1)
    )
    return batch


STEP = methods.Step(
    batch_spec=batch_spec,
    views=views,
    build=build,
    flops_per_example=flops_per_example,
    random_batch=random_batch,
)

METHOD = methods.Method(
    name="cmae",
    defaults=set_defaults,
    validate=validate,
    steps=lambda config: {"": (STEP, config)},
    train=train_and_evaluate,
)
