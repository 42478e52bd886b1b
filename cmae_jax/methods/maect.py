"""MAE-CT, top to bottom: MAE pretraining, an NNCLR head on the frozen encoder, contrastive tuning.

The method module of 'maect' (cmae_jax.methods): its steps are stage 1 (the 'mae' step)
and the contrastive step of stages 2 and 3, whose stage configs name their stage
(config.stage, see stage_config).

The three stages (SPEC, MAE-CT) run one after the other, each in a sub-folder of the
workdir and each resumable on its own:

  1_mae   MAE pretraining: the MAE trainer (cmae_jax.methods.mae)
          on the config's top-level keys.
  2_head  NNCLR projector + predictor on the frozen encoder (config.stages.head).
  3_tune  Contrastive tuning: the encoder's upper half and the heads (config.stages.tune).

Each stage's encoder initialises the next (stage 3 also takes stage 2's heads with their
BatchNorm statistics and its queue, and its EMA projector starts as a copy of the loaded
projector, as the official code does). A stage whose `init_from` names a checkpoint of this
project starts from there instead, and the stages before it are skipped. A finished stage
is recorded in WORKDIR/results.json and not run again. After each stage the k-NN top-1 of
its encoder is printed as `k-NN top-1: NN.NN%`.

Stages 2 and 3 share one update step: both views go through encoder, projector and
predictor; the keys of each view (the EMA projector's outputs, or the online projector's
when the momentum is 0) are L2-normalised and looked up in the queue (the stage's topk:
0 the nearest entry, k one of the k nearest at random; own entry excluded, see
cmae_jax.nnclr); the loss is the symmetrised NNCLR InfoNCE over the global batch; only the
trainable parameters are differentiated and updated (cmae_jax.param_groups); view 0's keys
of the whole global batch then enter the queue.

Encoder EMA (stage 3, as the official `ema_logger`): with stage.encoder_ema_momentum > 0 an
EMA of the trained encoder leaves rides in the optimiser state; `ema_encoder` completes it
with the frozen leaves (constant, so their own EMA). At the end of the stage both encoders
are evaluated, and the one stage.published_encoder names ('ema' by default, the weights the
official release and probes use) is written beside the last checkpoint
(`published_state`, checkpointing.publish), where weights.load_params - and so later
stages, the evaluation entry point and exports - read it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath
from flax import serialization

from cmae_jax import (
    checkpointing,
    ema,
    flops,
    loop,
    losses,
    methods,
    nnclr,
    optim,
    param_groups,
    train_state,
    weights,
)
from cmae_jax import workdir as workdir_files
from cmae_jax.config_checks import (
    require,
    require_checkpoint,
    require_range,
    require_two_view_augment,
)
from cmae_jax.methods import mae
from cmae_jax.models import maect as maect_model

# Sub-folder of each stage, and the config.stages section of the contrastive ones.
STAGES = ("1_mae", "2_head", "3_tune")
STAGE_SECTIONS = {"2_head": "head", "3_tune": "tune"}
HEAD_KEYS = ("projector", "predictor")


@flax.struct.dataclass
class MaectState(train_state.TrainState):
    """The train state of stages 2 and 3: TrainState plus the NN queue.

    `opt_state` covers the trainable parameters only (and holds the EMA projector).
    """

    queue: nnclr.Queue


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """The config a stage trains with: the top-level keys, overridden by config.stages[stage].

    Keys of the stage's section that also exist at the top level (num_epochs, total_steps,
    input, optimizer, ...) replace them, nested sections key by key; the stage-only keys
    (init_from, temperature, ...) stay in config.stages[stage]. A contrastive stage's
    config names its stage (config.stage); stage 1's is a MAE config (method 'mae').
    """
    out = config.copy_and_resolve_references()

    def override(target: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict):
        for key, value in overrides.items():
            if isinstance(value, ml_collections.ConfigDict) and isinstance(
                target.get(key), ml_collections.ConfigDict
            ):
                override(target[key], value)
            else:
                target[key] = value

    with out.unlocked():
        if stage in STAGE_SECTIONS:
            section = out.stages[STAGE_SECTIONS[stage]]
            override(out, {k: v for k, v in section.items() if k in out})
            out.stage = stage
        else:
            out.method = "mae"  # stage 1 is the MAE trainer's ordinary run
    return out


# -------------------------------------------------------------------- Checkpoint hand-off


def load_pretrained(path: str, abstract_state: MaectState) -> tuple[dict, dict]:
    """(params, batch_stats) to start a stage from: the encoder of any checkpoint here, and
    the NNCLR heads with their BatchNorm statistics when the checkpoint has matching ones.

    Restores only those parts, straight into the shardings of `abstract_state`.
    """
    return weights.load_params(
        path,
        abstract_state.params,
        required=("encoder",),
        optional=HEAD_KEYS,
        abstract_batch_stats=abstract_state.batch_stats,
    )


def load_queue(path: str, abstract_queue: nnclr.Queue) -> nnclr.Queue | None:
    """The NN queue of the checkpoint at `path` when it has one of the same shape (a MAE-CT
    stage with the same queue size and projection width), else None (e.g. a MAE run).

    Stage 3 starts with stage 2's queue as the official code, whose head restores its
    queue buffers with its weights. Restored straight into `abstract_queue`'s shardings.
    """
    state_dir = weights.find_checkpoint(path)
    saved = weights.saved_structure(state_dir).get("queue")
    abstract = serialization.to_state_dict(abstract_queue)
    if not checkpointing.same_shapes(saved, abstract):
        return None
    restored = checkpointing.restore_parts(state_dir, {"queue": abstract})["queue"]
    logging.info("Loaded the NN queue from %s", state_dir)
    return serialization.from_state_dict(abstract_queue, restored)


# -------------------------------------------------------------------- Model and optimiser


def make_model_and_optimizer(
    config: ml_collections.ConfigDict,
    stage: ml_collections.ConfigDict,
    steps_per_epoch: int,
    total_steps: int,
):
    """(model, tx, schedules) of a contrastive stage; tx covers the trainable params only.

    The encoder's trainable part gets AdamW (stage.optimizer) with layer-wise lr decay, the
    heads their own AdamW (stage.head_optimizer); with stage.ema_momentum > 0 an EMA copy
    of the projector rides in the optimiser state. `schedules` maps metric names to the
    lr and momentum schedules.
    """
    model = maect_model.build_model(config.model, config.input, config.maect)
    batch = config.input.global_batch_size
    head_lr = optim.learning_rate_schedule(
        stage.head_optimizer, batch, steps_per_epoch, total_steps
    )
    transforms = {"head": optim.adamw(stage.head_optimizer, head_lr)}
    schedules = {"learning_rate": head_lr}
    if not stage.freeze_encoder:
        encoder_lr = optim.learning_rate_schedule(
            stage.optimizer, batch, steps_per_epoch, total_steps
        )
        transforms["encoder"] = optax.chain(
            optim.adamw(stage.optimizer, encoder_lr),
            param_groups.scale_by_layer_decay(model.encoder_spec.depth, stage.layer_decay),
        )
        schedules["encoder_learning_rate"] = encoder_lr
    # Labels as a prefix tree over the top-level keys of the trainable params.
    labels = lambda params: {key: "encoder" if key == "encoder" else "head" for key in params}
    chain = [optax.multi_transform(transforms, labels)]
    # The EMA copies come last, after the final updates (opt_state[1], [2] when present).
    if stage.ema_momentum > 0:
        momentum = ema.momentum_schedule(stage.ema_momentum, total_steps, "constant")
        chain.append(ema.ema_target(momentum, ("projector",)))
        schedules["ema_momentum"] = momentum
    if keeps_encoder_ema(stage):
        momentum = ema.momentum_schedule(stage.encoder_ema_momentum, total_steps, "constant")
        chain.append(ema.ema_target(momentum, ("encoder",)))
    tx = optax.chain(*chain) if len(chain) > 1 else chain[0]
    return model, tx, schedules


def keeps_encoder_ema(stage: ml_collections.ConfigDict) -> bool:
    """Whether the stage keeps an EMA of its encoder (a frozen encoder is its own EMA)."""
    return stage.encoder_ema_momentum > 0 and not stage.freeze_encoder


def ema_encoder(state: MaectState, stage: ml_collections.ConfigDict) -> dict:
    """The EMA encoder params of a stage's state: the EMA of the trained leaves merged with
    the frozen leaves as they are (the EMA of a constant is that constant). Without an
    encoder EMA, the encoder itself."""
    if not keeps_encoder_ema(stage):
        return state.params["encoder"]
    freeze = dict(freeze_encoder=stage.freeze_encoder, frozen_blocks=stage.frozen_blocks)
    _, frozen = param_groups.split({"encoder": state.params["encoder"]}, **freeze)
    averaged = {"encoder": ema.target_params(state.opt_state)["encoder"]}
    return param_groups.merge(averaged, frozen)["encoder"]


def published_state(state: MaectState, stage: ml_collections.ConfigDict) -> dict | None:
    """What a finished stage hands to readers (later stages, evaluation, export) in place of
    its train state: params with the EMA encoder, BatchNorm statistics and queue. None when
    readers take the train state itself (no encoder EMA, or published_encoder 'raw')."""
    if not keeps_encoder_ema(stage) or stage.published_encoder == "raw":
        return None
    return {
        "params": {**state.params, "encoder": ema_encoder(state, stage)},
        "batch_stats": state.batch_stats,
        "queue": state.queue,
    }


def make_init_state(model: nn.Module, tx: optax.GradientTransformation, config, stage):
    """A function rng -> MaectState (leaves boxed with logical axis names), empty queue."""
    size, channels = config.input.image_size, config.input.channels
    freeze = dict(freeze_encoder=stage.freeze_encoder, frozen_blocks=stage.frozen_blocks)

    def init_state(rng):
        variables = model.init(rng, jnp.zeros((2, size, size, channels)), train=False)
        params = variables["params"]
        trainable, _ = param_groups.split(params, **freeze)
        return MaectState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(trainable),
            queue=nnclr.init_queue(config.maect.queue_size, model.projection_dim),
        )

    return init_state


# -------------------------------------------------------------------- Update step


def make_train_step(model: nn.Module, config, stage_name: str, stage, tx, schedules):
    """The update step of stages 2 and 3: NN lookup, NNCLR loss, update, enqueue."""
    freeze = dict(freeze_encoder=stage.freeze_encoder, frozen_blocks=stage.frozen_blocks)
    use_ema = stage.ema_momentum > 0
    # Independent NN picks per stage; per step they follow from (seed, step) alone, so a
    # resumed run draws what an uninterrupted one would.
    stage_rng = jax.random.fold_in(jax.random.key(config.seed), STAGES.index(stage_name))

    def train_step(state: MaectState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(stage_rng, state.step)
        trainable, frozen = param_groups.split(state.params, **freeze)

        def loss_fn(trainable):
            # Frozen parameters enter as constants: nothing is differentiated through them.
            params = param_groups.merge(trainable, frozen)
            batch_stats = state.batch_stats
            outputs, keys = [], []
            for images in (batch["view1"], batch["view2"]):
                out, updated = model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    images,
                    train=True,
                    mutable=["batch_stats"],
                )
                batch_stats = updated["batch_stats"]
                if use_ema:
                    # The EMA projector on this view's features; its BatchNorm uses the
                    # batch statistics and its running averages are never used.
                    key, _ = model.apply(
                        {
                            "params": {
                                "projector": ema.target_params(state.opt_state)["projector"]
                            },
                            "batch_stats": {"projector": state.batch_stats["projector"]},
                        },
                        jax.lax.stop_gradient(out["pooled"]),
                        train=True,
                        method=model.project,
                        mutable=["batch_stats"],
                    )
                else:
                    key = out["projection"]
                outputs.append(out)
                keys.append(losses.l2_normalize(jax.lax.stop_gradient(key)))
            lookups = [
                nnclr.nearest_neighbours(
                    state.queue,
                    keys[v],
                    batch["index"],
                    jax.random.fold_in(rng, v),
                    stage.topk,
                )
                for v in range(2)
            ]
            loss = nnclr.symmetric_nnclr_loss(
                (lookups[0][0], lookups[1][0]),
                (outputs[0]["prediction"], outputs[1]["prediction"]),
                stage.temperature,
            )
            return loss, (batch_stats, keys[0], lookups[0])

        (loss, (batch_stats, keys0, (_, rows0, found0))), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(trainable)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        # The current keys enter after both lookups (see cmae_jax.nnclr on "own entry").
        queue = nnclr.enqueue(state.queue, keys0, batch["label"], batch["index"])
        same = (state.queue.labels[rows0] == batch["label"]) & found0
        metrics = {
            "loss": loss,
            # How often view 0's chosen neighbour has the query's label.
            "nn_accuracy": same.sum() / jnp.maximum(found0.sum(), 1),
            "queue_fill": queue.count / queue.keys.shape[0],
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(trainable),
        }
        metrics.update({name: fn(state.step) for name, fn in schedules.items()})
        new_state = MaectState(
            step=state.step + 1,
            params=param_groups.merge(trainable, frozen),
            batch_stats=batch_stats,
            opt_state=opt_state,
            queue=queue,
        )
        return new_state, metrics

    return train_step


# -------------------------------------------------------------------- One contrastive stage


def train_stage(
    config: ml_collections.ConfigDict,
    stage_name: str,
    workdir: str,
    *,
    init_from: str,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Runs stage 2 or 3 in `workdir`: resumes its newest checkpoint, else starts from the
    checkpoint at `init_from`. Returns cmae_jax.loop.train's results: 'knn_top1' (when
    evaluated; with an encoder EMA also 'knn_top1_raw' and 'knn_top1_ema', the published
    one as 'knn_top1'), 'history', 'complete', 'preempted', ...

    `stop_at_step` ends the stage after saving a checkpoint at that step, as a preemption
    would; a later call resumes from there.
    """
    # TF-free: the input pipeline and the evaluations import TensorFlow, which only the
    # trainer needs, not the update step (benchmarks, compile-ahead).
    from cmae_jax.data import train_data
    from cmae_jax.evaluation import features
    from cmae_jax.evaluation import hooks as evaluation_hooks

    stage = config.stages[STAGE_SECTIONS[stage_name]]
    config = stage_config(config, stage_name)
    run = loop.set_up(
        config, workdir, method=config.method, data=train_data.TrainData.from_config(config)
    )

    # ---------------------------------------------------------------- Model and optimiser
    model, tx, schedules = make_model_and_optimizer(
        config, stage, run.steps_per_epoch, run.total_steps
    )
    freeze = dict(freeze_encoder=stage.freeze_encoder, frozen_blocks=stage.frozen_blocks)

    # ---------------------------------------------------------------- Hand-off
    def start_fresh(state: MaectState, run: loop.Run) -> MaectState:
        """The loaded parts replace the fresh ones, and the optimiser starts on them (zero
        moments; the EMA projector a copy of the loaded projector)."""
        params, batch_stats = load_pretrained(init_from, jax.eval_shape(lambda: state))

        def hand_off(state, params, batch_stats):
            params = {**state.params, **params}
            trainable, _ = param_groups.split(params, **freeze)
            return state.replace(
                params=params,
                batch_stats={**state.batch_stats, **batch_stats},
                opt_state=tx.init(trainable),
            )

        state = loop.update_in_place(hand_off, state, params, batch_stats)
        # Queue hand-off: stage 3 starts with stage 2's queue, restored into the fresh
        # queue's shardings (on none, the first step would compile for other input types
        # than every later step, and the step would compile twice).
        abstract_queue = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.queue
        )
        queue = load_queue(init_from, abstract_queue)
        if queue is not None:
            state = state.replace(queue=queue)
        return state

    # ---------------------------------------------------------------- Loop
    task = loop.Task(
        init_state=make_init_state(model, tx, config, stage),
        train_step=make_train_step(model, config, stage_name, stage, tx, schedules),
        batch_keys=(*methods.TWO_VIEWS, "label", "index"),
        start_fresh=start_fresh,
        log_line=lambda m: (
            f"loss {m['loss']:.4f} | NN acc {m['nn_accuracy']:.3f} | "
            f"queue {100 * m['queue_fill']:.0f}%"
        ),
    )
    hooks = evaluation_hooks.make_hooks(
        config,
        run.mesh,
        features.encoder_embed(model.encoder_spec),
        params_of=lambda state: (
            {"_raw": state.params, "_ema": {**state.params, "encoder": ema_encoder(state, stage)}}
            if keeps_encoder_ema(stage)
            else {"": state.params}
        ),
    )
    results = loop.train(run, task, hooks=hooks, stop_at_step=stop_at_step)
    if not results["complete"]:
        return results
    if keeps_encoder_ema(stage) and "knn_top1_raw" in results:
        chosen = "raw" if stage.published_encoder == "raw" else "ema"
        results["knn_top1"] = results[f"knn_top1_{chosen}"]
    # Publish the chosen encoder where weights.load_params reads.
    published = published_state(results["state"], stage)
    if published is not None:
        directory = epath.Path(os.path.abspath(workdir)) / "checkpoints"
        checkpointing.publish(directory, run.total_steps, published)
    return results


# -------------------------------------------------------------------- The staged recipe


def first_stage(config: ml_collections.ConfigDict) -> str:
    """The stage a run starts with: the last one with an `init_from`, else 1_mae."""
    for name in reversed(STAGES[1:]):
        if config.stages[STAGE_SECTIONS[name]].init_from:
            return name
    return STAGES[0]


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_at: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """Runs the stages from `first_stage` on in WORKDIR/1_mae, 2_head, 3_tune; returns
    {'stages': {name: {'knn_top1': ...}}}, also kept in WORKDIR/results.json.

    Finished stages (listed in results.json) are skipped, an interrupted one resumes.
    `stop_at=(stage, step)` stops that stage after its checkpoint at `step`, as a
    preemption would.
    """
    loop.check_workdir(workdir, "maect")
    is_chief = jax.process_index() == 0
    summary: dict[str, Any] = workdir_files.read_json(workdir, "results.json") or {"stages": {}}
    if is_chief:
        workdir_files.write_json(workdir, "config.json", config)

    start = STAGES.index(first_stage(config))
    for index in range(start, len(STAGES)):
        name = STAGES[index]
        stage_dir = os.path.join(workdir, name)
        done = summary["stages"].get(name)
        if done is None or not epath.Path(stage_dir).is_dir():
            stop_at_step = stop_at[1] if stop_at is not None and stop_at[0] == name else None
            start_time = time.time()
            if name == STAGES[0]:
                results = mae.METHOD.train(
                    stage_config(config, name), stage_dir, stop_at_step=stop_at_step
                )
            else:
                section = config.stages[STAGE_SECTIONS[name]]
                # The first stage run starts where its init_from points, later ones from
                # the stage before.
                init_from = (
                    section.init_from
                    if index == start
                    else os.path.join(workdir, STAGES[index - 1])
                )
                results = train_stage(
                    config, name, stage_dir, init_from=init_from, stop_at_step=stop_at_step
                )
            if not results["complete"]:
                summary["preempted"] = results["preempted"]
                summary["step"] = f"{results['step']} of stage {name}"
                logging.info("Stopped in stage %s; rerun the same command to resume.", name)
                break
            done = {"seconds": round(time.time() - start_time, 1)}
            done.update({k: v for k, v in results.items() if k.startswith("knn_top1")})
            summary["stages"][name] = done
            if is_chief:
                workdir_files.write_json(workdir, "results.json", summary)
        if "knn_top1" in done:
            # The command line's result line, once per stage.
            print(f"Stage {name}:", flush=True)
            print(f"k-NN top-1: {100 * done['knn_top1']:.2f}%", flush=True)
            for which in ("raw", "ema"):
                if f"knn_top1_{which}" in done:
                    score = 100 * done[f"knn_top1_{which}"]
                    print(f"k-NN top-1 of the {which} encoder: {score:.2f}%", flush=True)
    return summary


# -------------------------------------------------------------------- The registry entry


def set_defaults(config: ml_collections.ConfigDict) -> None:
    """Stage 1's keys (MAE's); config_defaults.maect_config adds the stages' recipe."""
    mae.set_defaults(config)


def validate(config: ml_collections.ConfigDict, checks: methods.Checks) -> None:
    """Stage 1's MAE keys, config.maect and the sections of stages 2 and 3 (config.stages)."""
    require(
        not config.get("init_from"),
        f"config.init_from={config.get('init_from')!r} starts CMAE/MAE pretraining; for "
        f"method={config.method!r} use config.stages.<stage>.init_from.",
    )
    mae.validate(config, checks)
    m = config.maect
    require(
        m.pooling in maect_model.POOLINGS,
        f"config.maect.pooling={m.pooling!r} is not one of {', '.join(maect_model.POOLINGS)}.",
    )
    require(
        "topk" not in m,
        "config.maect.topk is now per stage: set config.stages.head.topk (official: 0, the "
        "nearest neighbour) and config.stages.tune.topk (official: 20, or 10 for _aug B/L).",
    )
    depth = maect_model.build_model(config.model, config.input, m).encoder_spec.depth
    num_devices, process_count = checks.num_devices, checks.process_count
    for name in ("head", "tune"):
        stage, key = config.stages[name], f"config.stages.{name}"
        batch = stage.input.global_batch_size
        require(
            batch > 0 and batch % num_devices == 0 and batch % process_count == 0,
            f"{key}.input.global_batch_size={batch} must be a positive multiple of the "
            f"{num_devices} devices and {process_count} processes.",
        )
        require(
            m.queue_size >= batch,
            f"config.maect.queue_size={m.queue_size} cannot take a global batch of {batch} "
            f"keys ({key}.input.global_batch_size); make the queue at least that long.",
        )
        require(
            stage.input.views in ("two_crops", "two_crops_aug"),
            f"{key}.input.views={stage.input.views!r} must be 'two_crops' or 'two_crops_aug'.",
        )
        require_range(stage.input.crop_scale, f"{key}.input.crop_scale", "(0.08, 1.0)", upper=1.0)
        if stage.input.views == "two_crops_aug":
            require_two_view_augment(stage.input.view_augment, f"{key}.input.view_augment")
        require(stage.temperature > 0, f"{key}.temperature={stage.temperature} must be > 0.")
        require(
            0 <= stage.topk <= m.queue_size,
            f"{key}.topk={stage.topk} must lie in [0, config.maect.queue_size={m.queue_size}] "
            "(0: the nearest neighbour, as the official stage 2; k: one of the k nearest).",
        )
        require(
            0.0 <= stage.encoder_ema_momentum < 1.0,
            f"{key}.encoder_ema_momentum={stage.encoder_ema_momentum} must lie in [0, 1) "
            "(0: no encoder EMA; the official stage 3: 0.9999).",
        )
        require(
            stage.published_encoder in ("ema", "raw"),
            f"{key}.published_encoder={stage.published_encoder!r} must be 'ema' or 'raw'.",
        )
        require(
            0.0 <= stage.ema_momentum < 1.0,
            f"{key}.ema_momentum={stage.ema_momentum} must lie in [0, 1) (0: no EMA projector).",
        )
        require(
            0 <= stage.frozen_blocks <= depth,
            f"{key}.frozen_blocks={stage.frozen_blocks} must lie in [0, {depth}] (the depth).",
        )
        require(
            0.0 < stage.layer_decay <= 1.0,
            f"{key}.layer_decay={stage.layer_decay} must lie in (0, 1], e.g. 0.65.",
        )
        require(
            stage.num_epochs > 0 or stage.total_steps > 0,
            f"Set {key}.num_epochs or {key}.total_steps to a positive number.",
        )
        for opt_name in ("optimizer", "head_optimizer"):
            opt = stage[opt_name]
            require(
                opt.base_lr >= 0 and opt.weight_decay >= 0 and opt.views_per_example >= 1,
                f"{key}.{opt_name}: base_lr and weight_decay must be >= 0 and "
                "views_per_example >= 1.",
            )
        if checks.check_data and stage.init_from:
            require_checkpoint(stage.init_from, f"{key}.init_from")


def _stage(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config.stages section of a contrastive stage's config."""
    return config.stages[STAGE_SECTIONS[config.stage]]


def build(
    config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> methods.StepParts:
    """Model, initial state and update step of the stage, as train_stage builds them."""
    stage = _stage(config)
    model, tx, schedules = make_model_and_optimizer(config, stage, steps_per_epoch, total_steps)
    update = make_train_step(model, config, config.stage, stage, tx, schedules)
    return methods.StepParts(
        model, make_init_state(model, tx, config, stage), lambda state_shardings: update
    )


def flops_per_example(config: ml_collections.ConfigDict) -> float:
    """Analytic FLOPs of one example's update in stage 2 or 3 (matmuls and attention).

    Two whole views pass the encoder, projector and predictor; the frozen part of the
    encoder (all of it in stage 2; in stage 3 the patch embedding and the first
    `frozen_blocks` blocks, none of it when that is 0) runs forward only, everything else
    3x. The EMA projector and the top-k lookup in the queue (query x queue) run forward
    only; the two NNCLR logits rows (neighbour x batch) count 3x.
    """
    stage = _stage(config)
    model = maect_model.build_model(config.model, config.input, config.maect)
    spec = model.encoder_spec
    tokens = flops.view_tokens(config.input.image_size, spec.patch_size)
    dim = model.projection_dim
    channels = config.input.channels
    encoder = flops.encoder_flops(spec, tokens, channels)
    frozen = 0.0  # frozen_blocks = 0: the stem trains too (param_groups.is_frozen)
    if stage.freeze_encoder:
        frozen = encoder
    elif stage.frozen_blocks:
        frozen = flops.encoder_flops(spec, tokens, channels, depth=stage.frozen_blocks)
    trained = encoder - frozen
    projector, predictor = flops.projector_predictor_flops(model)
    trained += projector + predictor + 2 * config.input.global_batch_size * dim  # a row a view
    forward_only = frozen + 2 * config.maect.queue_size * dim
    if stage.ema_momentum > 0:
        forward_only += projector
    return flops.two_view_update_flops(trained, forward_only)


CONTRASTIVE_STEP = methods.Step(
    batch_spec=methods.two_view_batch_spec,
    views=methods.two_crop_views,
    build=build,
    flops_per_example=flops_per_example,
    random_batch=methods.random_batch,
)


def steps(config: ml_collections.ConfigDict) -> dict[str, tuple[methods.Step, Any]]:
    """The three stages with their configs; a stage's config (config.stage) is its own."""
    if "stage" in config:
        return {config.stage: (CONTRASTIVE_STEP, config)}
    out = {}
    for name in STAGES:
        stage_cfg = stage_config(config, name)
        out[name] = (methods.step_for(stage_cfg), stage_cfg)
    return out


METHOD = methods.Method(
    name="maect",
    defaults=set_defaults,
    validate=validate,
    steps=steps,
    train=train_and_evaluate,
)
