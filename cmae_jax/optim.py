"""Optimiser: AdamW with masked weight decay, warmup + cosine (or held) lr, optional clipping."""

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

# Leaves that get weight decay: the matrices of Dense/Conv layers. Biases, LayerNorm and
# BatchNorm scales, the cls and mask tokens (and the fixed position embeddings, which are
# not parameters at all) are excluded, as in MAE's optim_factory.
_DECAYED_LEAF_NAMES = ("kernel",)

# After the warmup: half-cycle cosine to min_lr, or the peak held to the end.
LR_SCHEDULES = ("cosine", "constant")


def weight_decay_mask(params: Any) -> Any:
    """A tree of bools over `params`: True where weight decay applies."""

    def decays(path, _):
        return getattr(path[-1], "key", None) in _DECAYED_LEAF_NAMES

    # Leaves boxed with logical axis names (abstract states) count as one leaf each.
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    return jax.tree_util.tree_map_with_path(decays, params, is_leaf=is_box)


def peak_learning_rate(opt_cfg: ml_collections.ConfigDict, global_batch_size: int) -> float:
    """The linear scaling rule: base_lr * global_batch * views_per_example / 256.

    `views_per_example` (default 1) counts the views each example contributes to a step:
    MAE-CT's official code scales by the number of views it sees (2).
    """
    return opt_cfg.base_lr * global_batch_size * opt_cfg.get("views_per_example", 1) / 256


def learning_rate_schedule(
    opt_cfg: ml_collections.ConfigDict,
    global_batch_size: int,
    steps_per_epoch: int,
    total_steps: int,
) -> optax.Schedule:
    """Linear warmup from 0 for warmup_epochs, then, per step, half-cycle cosine to min_lr
    (opt_cfg.schedule 'cosine', the default) or the peak held to the end ('constant')."""
    kind = opt_cfg.get("schedule", "cosine")
    if kind not in LR_SCHEDULES:
        raise ValueError(
            f"config.optimizer.schedule={kind!r} is not one of {', '.join(LR_SCHEDULES)}: "
            "set --config.optimizer.schedule=cosine (decay to min_lr) or constant (no decay)."
        )
    peak = peak_learning_rate(opt_cfg, global_batch_size)
    warmup_steps = round(opt_cfg.warmup_epochs * steps_per_epoch)
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        # A cosine from the peak to the peak is the peak.
        end_value=peak if kind == "constant" else opt_cfg.get("min_lr", 0.0),
    )


def adamw(
    opt_cfg: ml_collections.ConfigDict, learning_rate: optax.Schedule
) -> optax.GradientTransformation:
    """AdamW as MAE: betas from the config, decay masked to kernels (every parameter with
    opt_cfg.decay_all_params, as torch.optim.AdamW on model.parameters()), optional clipping."""
    parts = []
    if opt_cfg.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
    parts.append(
        optax.adamw(
            learning_rate,
            b1=opt_cfg.b1,
            b2=opt_cfg.b2,
            eps=1e-8,
            weight_decay=opt_cfg.weight_decay,
            mask=None if opt_cfg.get("decay_all_params", False) else weight_decay_mask,
        )
    )
    return optax.chain(*parts)
