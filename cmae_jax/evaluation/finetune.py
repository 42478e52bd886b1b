"""End-to-end fine-tuning (SPEC, MAE's main_finetune) with the pretraining's sharded machinery.

Model: the pretrained encoder (stochastic depth `drop_path`, linear over the blocks),
global average pooling of the patch tokens before the encoder's final norm, a fresh
LayerNorm (fc_norm) and a Linear head (kernel ~ truncated normal, std 2e-5), as MAE's
global_pool=True; pooling='cls' takes the normed cls token instead.

Optimiser: AdamW (config.finetune.optimizer: base lr scaled by batch / 256, warmup +
cosine, weight decay on kernels only) with layer-wise lr decay (cmae_jax.param_groups:
the last block at decay x lr, the stem at decay^(depth+1) x lr, fc_norm and head at lr).

Data: RandomResizedCrop + flip, RandAugment, normalisation, random erasing
(cmae_jax.evaluation.augment) from the resumable tf.data stream; mixup / cutmix (one
lambda per batch, the batch mixed with its reverse, cutmix with probability
switch_prob when both are on, as timm's Mixup in 'batch' mode) and label smoothing on
device inside the step.

Sharding: the state is created in its sharded layout (train_state.create_sharded_state
with the encoder's logical axes), the step is jax.jit with explicit shardings and the
state donated, the batch split over data x fsdp; checkpoints in WORKDIR/finetune resume
exactly (the data position is recorded as in pretraining).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf

from cmae_jax import loop, optim, param_groups, train_state
from cmae_jax.data import pipeline, sources, train_data, views
from cmae_jax.evaluation import augment, features
from cmae_jax.models import vit
from cmae_jax.models.encoder_spec import EncoderSpec

# (config, mesh, embed) -> the hooks that evaluate the encoder during fine-tuning; the
# caller supplies them (cmae_jax.evaluation.hooks builds them from the protocols, which
# run this module: passing them in keeps the imports one-way).
PeriodicHooks = Callable[[ml_collections.ConfigDict, Any, Callable], list]


class Classifier(nn.Module):
    """Encoder (stochastic depth `drop_path`) + (GAP -> fc_norm | normed cls token) + Linear
    head."""

    encoder_spec: EncoderSpec
    num_classes: int
    pooling: str = "gap"
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        encoder = self.encoder_spec.encoder(drop_path=self.drop_path, name="encoder")
        out = encoder(images, None, train=train)
        if self.pooling == "gap":
            pooled = jnp.mean(out.prenorm[:, 1:], axis=1)
            pooled = vit.layer_norm(self.encoder_spec.dtype, "fc_norm")(pooled)
        else:
            pooled = out.tokens[:, 0]
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.truncated_normal(2e-5), ("embed", None)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
            name="head",
        )(pooled.astype(jnp.float32))


def mix_batch(
    rng: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """Mixup or cutmix of a batch with its reverse (timm 'batch' mode); soft targets mixed
    in the same proportion (for cutmix: the area actually kept)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    r_switch, r_mix, r_cut, r_y, r_x = jax.random.split(rng, 5)
    _, h, w, _ = images.shape
    flipped, flipped_targets = images[::-1], targets[::-1]
    lam_mix = jax.random.beta(r_mix, max(mixup_alpha, 1e-6), max(mixup_alpha, 1e-6))
    lam_cut = jax.random.beta(r_cut, max(cutmix_alpha, 1e-6), max(cutmix_alpha, 1e-6))
    if cutmix_alpha <= 0:
        use_cutmix = jnp.bool_(False)
    elif mixup_alpha <= 0:
        use_cutmix = jnp.bool_(True)
    else:
        use_cutmix = jax.random.uniform(r_switch) < switch_prob
    # Cutmix box: sides sqrt(1 - lam) of the image's, centre uniform, clipped to the image.
    cut = jnp.sqrt(1.0 - lam_cut)
    cut_h, cut_w = (cut * h).astype(jnp.int32), (cut * w).astype(jnp.int32)
    cy, cx = jax.random.randint(r_y, (), 0, h), jax.random.randint(r_x, (), 0, w)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
    lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)
    mixed = jnp.where(
        use_cutmix, jnp.where(box, flipped, images), lam_mix * images + (1 - lam_mix) * flipped
    )
    lam = jnp.where(use_cutmix, lam_cut, lam_mix)
    return mixed, lam * targets + (1 - lam) * flipped_targets


def smooth_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """One-hot targets with label smoothing: 1 - s + s / C on the class, s / C elsewhere."""
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + smoothing / num_classes


def make_train_step(model: Classifier, tx, schedule, finetune_cfg, num_classes: int, seed: int):
    """(state, batch) -> (state, metrics): mixup/cutmix, soft-target cross-entropy, update."""
    base_rng = jax.random.key(seed)

    def train_step(state: train_state.TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(base_rng, state.step)
        targets = smooth_targets(batch["label"], num_classes, finetune_cfg.label_smoothing)
        images, targets = mix_batch(
            jax.random.fold_in(rng, 0),
            batch["image"],
            targets,
            mixup_alpha=finetune_cfg.mixup_alpha,
            cutmix_alpha=finetune_cfg.cutmix_alpha,
            switch_prob=finetune_cfg.switch_prob,
        )

        def loss_fn(params):
            logits = model.apply(
                {"params": params},
                images,
                train=True,
                rngs={"dropout": jax.random.fold_in(rng, 1)},
            )
            return optax.softmax_cross_entropy(logits, targets).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        metrics = {
            "loss": loss,
            "learning_rate": schedule(state.step),
            "grad_norm": optax.global_norm(grads),
        }
        return new_state, metrics

    return train_step


def finetune_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config fine-tuning trains with: config.input with the fine-tuning batch and crop
    scale, no target shift; the fine-tuning length."""
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.input.global_batch_size = config.finetune.batch_size
        out.input.crop_scale = tuple(config.finetune.crop_scale)
        out.input.shift = 0
        out.total_steps = config.finetune.total_steps
        out.num_epochs = config.finetune.num_epochs
    return out


def train_view_fn(config: ml_collections.ConfigDict):
    """(uint8 image, seed) -> {'image'}: RandomResizedCrop + flip, RandAugment, normalise,
    random erasing."""
    ft, inp = config.finetune, config.input

    def view_fn(image: Any, seed: Any) -> dict[str, Any]:
        out = views.online_view(image, seed, inp)
        if ft.randaugment_ops > 0:
            out = augment.rand_augment(
                out,
                tf.random.experimental.stateless_fold_in(seed, 101),
                num_ops=ft.randaugment_ops,
                magnitude=ft.randaugment_magnitude,
                magnitude_std=ft.randaugment_magnitude_std,
            )
        out = pipeline.normalize(out, inp.mean, inp.std)
        if ft.random_erasing > 0:
            out = augment.random_erasing(
                out, tf.random.experimental.stateless_fold_in(seed, 102), prob=ft.random_erasing
            )
        return {"image": out}

    return view_fn


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    encoder_params: Any,
    *,
    writer: Any = None,
    periodic_hooks: PeriodicHooks | None = None,
) -> dict[str, float]:
    """Fine-tunes the encoder `encoder_params` ({'encoder': ...}), resuming from
    WORKDIR/finetune; returns {'top1'} on config.dataset.eval_split. `periodic_hooks`
    (config, mesh, embed) -> hooks: the periodic evaluations of the encoder being tuned."""
    ft = config.finetune
    config = finetune_config(config)
    num_classes = config.dataset.num_classes
    run = loop.set_up(
        config,
        os.path.join(workdir, "finetune"),
        method="finetune",
        data=train_data.TrainData.from_config(config, config.eval.train_split),
        writer=writer,
    )

    # ---------------------------------------------------------------- Model and optimiser
    spec = EncoderSpec.from_config(config.model, config.input)
    model = Classifier(spec, num_classes, pooling=ft.pooling, drop_path=ft.drop_path)
    schedule = optim.learning_rate_schedule(
        ft.optimizer, ft.batch_size, run.steps_per_epoch, run.total_steps
    )
    tx = optax.chain(
        optim.adamw(ft.optimizer, schedule),
        param_groups.scale_by_layer_decay(spec.depth, ft.layer_decay),
    )
    size, channels = config.input.image_size, config.input.channels

    def init_state(rng):
        params = model.init(rng, jnp.zeros((2, size, size, channels)), train=False)["params"]
        return train_state.TrainState(
            step=jnp.zeros([], jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params)
        )

    def start_fresh(state: train_state.TrainState, run: loop.Run) -> train_state.TrainState:
        """The pretrained encoder replaces the fresh one; head and optimiser stay fresh."""
        return loop.update_in_place(
            lambda s, p: s.replace(params={**s.params, **p}), state, encoder_params
        )

    # ---------------------------------------------------------------- Loop
    task = loop.Task(
        init_state=init_state,
        train_step=make_train_step(model, tx, schedule, ft, num_classes, config.seed),
        batch_keys=("image", "label"),
        view_fn=train_view_fn(config),
        start_fresh=start_fresh,
    )
    # The periodic protocols of config.evals on the encoder being tuned (off unless
    # config.eval.every_steps > 0): the labelled reference's learning curve, on the same
    # yardstick as the pretrainings' (benchmarks/representation.py).
    hooks = []
    if periodic_hooks is not None:
        hooks = periodic_hooks(config, run.mesh, features.encoder_embed(spec))
    results = loop.train(run, task, hooks=hooks)

    # ---------------------------------------------------------------- Evaluation
    params = results["state"].params
    batch_sharding = run.batch_sharding
    predict = jax.jit(
        lambda params, images: model.apply({"params": params}, images, train=False),
        out_shardings=batch_sharding,
    )
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
        logits, labels = features.features_of_split(
            config,
            lambda images: predict(params, images),
            sources.make_source(config.dataset, config.dataset.eval_split),
            batch_sharding,
        )
    return {"top1": float(np.mean(np.argmax(logits, -1) == labels))}
