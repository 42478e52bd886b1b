"""MoCo v3 (ViT), top to bottom: the instance-discrimination baseline of CMAE and MAE-CT.

Recipe (SPEC, "MoCo v3"; the official facebookresearch/moco-v3, main_moco.py and
moco/builder.py): two BYOL-augmented views of every image (config.input.views
'two_crops_aug'); both pass the online encoder, projector and predictor (the queries) and
the momentum encoder and projector (the keys). Loss: ctr(q1, k2) + ctr(q2, k1), where ctr
is InfoNCE against the keys of the whole global batch scaled by 2 tau
(cmae_jax.losses.info_nce; the jitted step sees the global batch, so no gather is written).

Momentum branch: EMA copies of params['encoder'] and params['projector'] in the optimiser
state (cmae_jax.ema.ema_target), momentum m = 1 - (1 - m0) (1 + cos(pi k / K)) / 2 per
step k (config.ema.schedule 'cosine'). The official code moves the momentum encoder
towards the online one at the start of step k, with m(k), then computes the keys; here the
EMA moves after each update, so the copy step k reads was made with m(k) from the
parameters step k starts with: the same numbers (`key_momentum` shifts the schedule by one).

Frozen patch projection (config.mocov3.frozen_patch_projection, the official
--stop-grad-conv1): params['encoder']['embedding'] keeps its random init. It is kept out of
the differentiated and optimised tree (no gradient, no Adam moments, no weight decay) and
of the EMA copy (the momentum branch reads it as it is, which is its EMA), so it stays
bit-identical. With a conv stem (config.model.stem_channels > 0) only that last linear
map of the patch is frozen; the stem's conv layers before it train.

Where we depart from the official code (all small):
  * the ViT is the project's MAE encoder: a fused qkv initialised with xavier over the
    fused [d, 3d] matrix (MoCo v3 treats q, k, v separately) and the cls token with std
    0.02 (MoCo v3: 1e-6); its 2-D sin-cos table orders the row and column halves the
    other way round (a fixed channel permutation, the same function class);
  * BatchNorm running averages are updated with the biased batch variance (flax);
  * float32 or bfloat16 compute (config.model.dtype) instead of torch.cuda.amp.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cmae_jax import ema, flops, loop, losses, methods, optim, param_groups, train_state
from cmae_jax.config_checks import ConfigError, require, require_two_view_augment
from cmae_jax.config_defaults import BYOL_VIEW_AUGMENT
from cmae_jax.models import mocov3 as mocov3_model

# The parts of the online parameters that the momentum branch copies.
MOMENTUM_KEYS = ("encoder", "projector")
VIEWS = methods.TWO_VIEWS
TWO_CROP_VIEWS = ("two_crops", "two_crops_aug")

# -------------------------------------------------------------------- Config


def set_defaults(config: ml_collections.ConfigDict) -> None:
    """MoCo v3's keys (SPEC; the official ViT-B command of CONFIG.md) on base_config's
    defaults; the encoder, data and batch stay the config's (configs/mocov3_vitb.py)."""
    config.input.views = "two_crops_aug"
    config.input.crop_scale = (0.08, 1.0)
    config.input.view_augment = ml_collections.ConfigDict(BYOL_VIEW_AUGMENT)
    config.mocov3 = ml_collections.ConfigDict(
        dict(
            projector_hidden=4096,
            predictor_hidden=4096,
            projection_dim=256,
            frozen_patch_projection=True,  # the official --stop-grad-conv1
        )
    )
    config.loss.temperature = 0.2
    config.ema.momentum = 0.99
    config.ema.schedule = "cosine"  # --moco-m-cos: to 1.0 at the last step
    # AdamW with torch's defaults (betas 0.9, 0.999) and weight decay on every parameter.
    config.optimizer.base_lr = 1.5e-4  # peak lr = base_lr * global_batch / 256
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.weight_decay = 0.1
    config.optimizer.decay_all_params = True
    config.optimizer.warmup_epochs = 40.0
    config.num_epochs = 300
    # The representation MoCo v3 trains and its linear probe reads.
    config.eval.feature = "cls"


def validate(config: ml_collections.ConfigDict, checks: methods.Checks) -> None:
    """MoCo v3's keys: two-crop views, the loss, the momentum, the heads; no accumulation."""
    del checks  # nothing here reads files
    views = config.input.get("views")
    require(
        views in TWO_CROP_VIEWS,
        f"config.input.views={views!r}: MoCo v3 trains on two views of every image; use "
        "'two_crops_aug' (BYOL's views, the recipe) or 'two_crops' (crop and flip only).",
    )
    # config.input.crop_scale is checked with every method's views (config_validation).
    if views == "two_crops_aug":
        require_two_view_augment(config.input.view_augment, "config.input.view_augment")
    accumulation = int(config.get("grad_accumulation_steps", 1) or 1)
    require(
        accumulation == 1,
        f"config.grad_accumulation_steps={accumulation}: MoCo v3's negatives are the whole "
        "global batch, so it has no gradient accumulation; use 1 and a batch that fits.",
    )
    require(
        not config.get("init_from"),
        f"config.init_from={config.get('init_from')!r}: MoCo v3 trains from random weights "
        "(resuming a run needs no init_from); use ''.",
    )
    require(
        config.loss.temperature > 0,
        f"config.loss.temperature={config.loss.temperature} must be > 0 (MoCo v3: 0.2).",
    )
    require(
        0.0 <= config.ema.momentum <= 1.0,
        f"config.ema.momentum={config.ema.momentum} must lie in [0, 1] (MoCo v3: 0.99).",
    )
    for key in ("projector_hidden", "predictor_hidden", "projection_dim"):
        require(
            int(config.mocov3[key]) >= 1,
            f"config.mocov3.{key}={config.mocov3[key]} must be >= 1.",
        )
    try:
        ema.momentum_schedule(config.ema.momentum, 1, config.ema.schedule)
        mocov3_model.build_model(config.model, config.input, config.mocov3)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# -------------------------------------------------------------------- Model and optimiser


def split_frozen(params: dict, frozen_patch_projection: bool) -> tuple[dict, dict]:
    """(trainable, frozen): the patch projection alone is frozen, when it is."""
    if not frozen_patch_projection:
        return params, {}
    encoder = dict(params["encoder"])
    frozen = {"encoder": {"embedding": encoder.pop("embedding")}}
    return {**params, "encoder": encoder}, frozen


def key_momentum(schedule: optax.Schedule) -> optax.Schedule:
    """The EMA transform's momentum at update count k: m(k + 1), so that the copy step k + 1
    reads is the official one (moved with m(k + 1) towards the parameters it starts with)."""
    return lambda count: schedule(count + 1)


def make_model_and_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> tuple[mocov3_model.MoCoV3, optax.GradientTransformation, dict[str, optax.Schedule]]:
    """(model, tx, schedules): tx covers the trainable params and holds the momentum branch;
    `schedules` maps metric names to the lr and momentum schedules (per step)."""
    model = mocov3_model.build_model(config.model, config.input, config.mocov3)
    lr = optim.learning_rate_schedule(
        config.optimizer, config.input.global_batch_size, steps_per_epoch, total_steps
    )
    momentum = ema.momentum_schedule(config.ema.momentum, total_steps, config.ema.schedule)
    tx = optax.chain(
        optim.adamw(config.optimizer, lr),
        ema.ema_target(key_momentum(momentum), MOMENTUM_KEYS),  # last: sees the new params
    )
    return model, tx, {"learning_rate": lr, "ema_momentum": momentum}


def make_init_state(model: nn.Module, tx: optax.GradientTransformation, config):
    """A function rng -> TrainState (leaves boxed with logical axis names)."""
    size, channels = config.input.image_size, config.input.channels

    def init_state(rng):
        variables = model.init(rng, jnp.zeros((2, size, size, channels)), train=False)
        params = variables["params"]
        trainable, _ = split_frozen(params, config.mocov3.frozen_patch_projection)
        return train_state.TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(trainable),
        )

    return init_state


def momentum_params(state: train_state.TrainState, frozen_patch_projection: bool) -> dict:
    """The momentum encoder and projector: the EMA copies, with the frozen patch projection."""
    _, frozen = split_frozen(state.params, frozen_patch_projection)
    return param_groups.merge(ema.target_params(state.opt_state), frozen)


# -------------------------------------------------------------------- Loss and update step


def contrastive_loss(
    queries: tuple[jax.Array, jax.Array], keys: tuple[jax.Array, jax.Array], temperature: float
) -> jax.Array:
    """MoCo v3's symmetric loss: ctr(q1, k2) + ctr(q2, k1), each InfoNCE over the global
    batch's keys scaled by 2 * temperature; keys get no gradient."""
    return losses.info_nce(queries[0], keys[1], temperature) + losses.info_nce(
        queries[1], keys[0], temperature
    )


def make_train_step(model: nn.Module, config, tx, schedules: dict[str, optax.Schedule]):
    """The update step: momentum keys, online queries, loss, AdamW and EMA update."""
    frozen_patch = config.mocov3.frozen_patch_projection
    temperature = config.loss.temperature

    def train_step(state: train_state.TrainState, batch: dict[str, jax.Array]):
        trainable, frozen = split_frozen(state.params, frozen_patch)
        # The momentum branch in train mode, as the official one: its BatchNorm normalises
        # with the batch's statistics; the running averages it would update are never read.
        momentum_vars = {
            "params": momentum_params(state, frozen_patch),
            "batch_stats": {"projector": state.batch_stats["projector"]},
        }
        keys = tuple(
            jax.lax.stop_gradient(
                model.apply(
                    momentum_vars,
                    batch[view],
                    train=True,
                    method=model.project,
                    mutable=["batch_stats"],
                )[0]
            )
            for view in VIEWS
        )

        def loss_fn(trainable):
            # Frozen parameters enter as constants: nothing is differentiated through them.
            params = param_groups.merge(trainable, frozen)
            batch_stats, queries = state.batch_stats, []
            # One view at a time, as the official code: each BatchNorm sees one view's batch.
            for view in VIEWS:
                query, updated = model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    batch[view],
                    train=True,
                    mutable=["batch_stats"],
                )
                batch_stats = updated["batch_stats"]
                queries.append(query)
            return contrastive_loss(tuple(queries), keys, temperature), batch_stats

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(trainable),
        }
        metrics.update({name: fn(state.step) for name, fn in schedules.items()})
        new_state = train_state.TrainState(
            step=state.step + 1,
            params=param_groups.merge(trainable, frozen),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        return new_state, metrics

    return train_step


# -------------------------------------------------------------------- Trainer


def make_task(config: ml_collections.ConfigDict, run: loop.Run) -> tuple[loop.Task, nn.Module]:
    """The loop's Task of a MoCo v3 run (state, update step, batch columns) and its model."""
    model, tx, schedules = make_model_and_optimizer(config, run.steps_per_epoch, run.total_steps)
    task = loop.Task(
        init_state=make_init_state(model, tx, config),
        train_step=make_train_step(model, config, tx, schedules),
        batch_keys=VIEWS,
        log_line=lambda m: f"loss {m['loss']:.4f} | momentum {m['ema_momentum']:.5f}",
    )
    return task, model


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Pretrains from scratch or resumes WORKDIR's newest checkpoint; returns
    cmae_jax.loop.train's results ('history', 'knn_top1' when evaluated, 'complete', ...).

    `stop_at_step` ends the run after saving a checkpoint at that step, as a preemption
    would; a later call resumes from there.
    """
    # TF-free: the input pipeline and the evaluations import TensorFlow, which only the
    # trainer needs, not the update step (benchmarks, compile-ahead).
    from cmae_jax.data import train_data
    from cmae_jax.evaluation import features
    from cmae_jax.evaluation import hooks as evaluation_hooks

    run = loop.set_up(
        config, workdir, method=config.method, data=train_data.TrainData.from_config(config)
    )
    task, model = make_task(config, run)
    hooks = evaluation_hooks.make_hooks(
        config, run.mesh, features.encoder_embed(model.encoder_spec)
    )
    return loop.train(run, task, hooks=hooks, stop_at_step=stop_at_step)


# -------------------------------------------------------------------- The registry entry


def build(
    config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> methods.StepParts:
    """Model, initial state and update step as the trainer builds them."""
    model, tx, schedules = make_model_and_optimizer(config, steps_per_epoch, total_steps)
    update = make_train_step(model, config, tx, schedules)
    return methods.StepParts(
        model, make_init_state(model, tx, config), lambda state_shardings: update
    )


def flops_per_example(config: ml_collections.ConfigDict) -> float:
    """Analytic FLOPs of one example's share of a step, as the other methods count them.

    Two whole views pass the online encoder, projector and predictor (3x: forward and
    backward; a frozen patch projection forward only, or 2x above a trained conv stem) and
    the momentum encoder and projector (forward only); each view's query meets the global
    batch's keys (3x).
    """
    model = mocov3_model.build_model(config.model, config.input, config.mocov3)
    spec = model.encoder_spec
    tokens = flops.view_tokens(config.input.image_size, spec.patch_size)
    channels = config.input.channels
    encoder = flops.encoder_flops(spec, tokens, channels)
    projector, predictor = flops.projector_predictor_flops(model)
    frozen = 0.0
    if config.mocov3.frozen_patch_projection:
        frozen = flops.patch_projection_flops(spec, tokens, channels)
    trained = encoder - frozen + projector + predictor
    trained += 2 * config.input.global_batch_size * model.projection_dim  # a logits row a view
    momentum = encoder + projector
    # Below a frozen projection a conv stem trains: the gradient passes through it.
    if spec.stem_channels:
        return flops.two_view_update_flops(trained, momentum, pass_through=frozen)
    return flops.two_view_update_flops(trained, frozen + momentum)


STEP = methods.Step(
    batch_spec=methods.two_view_batch_spec,
    views=methods.two_crop_views,  # BYOL-augmented with config.input.views 'two_crops_aug'
    build=build,
    flops_per_example=flops_per_example,
    random_batch=methods.random_batch,
)

METHOD = methods.Method(
    name="mocov3",
    defaults=set_defaults,
    validate=validate,
    steps=lambda config: {"": (STEP, config)},
    train=train_and_evaluate,
)
