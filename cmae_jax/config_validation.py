"""Checks a config before anything compiles; errors name the key and the fix."""

import ml_collections

# cmae_jax.data first: TensorFlow must load through it (it hides matplotlib and the
# accelerators from TensorFlow); cmae_jax.weights reaches TensorFlow through clu.
from cmae_jax.data import masking, sources
from cmae_jax.models import cmae as cmae_model
from cmae_jax.models import vit
from cmae_jax.sharding import logical_axis_rules, mesh_shape
from cmae_jax.weights import CheckpointError, check_readable

METHODS = ("cmae", "mae", "maect", "eval")


class ConfigError(ValueError):
    """A config value that cannot work, with the key and how to fix it."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int,
    process_count: int = 1,
    check_data: bool = True,
) -> None:
    """Raises ConfigError for the first value that would fail later (or silently mislead)."""
    _require(
        config.method in METHODS,
        f"config.method={config.method!r} is unknown; use one of {', '.join(METHODS)}.",
    )
    _require(
        config.dataset.name in sources.DATASET_NAMES,
        f"config.dataset.name={config.dataset.name!r} is unknown; use one of "
        f"{', '.join(sources.DATASET_NAMES)} (set config.dataset.tfds_name for any TFDS dataset).",
    )
    try:
        vit.parse_variant(config.model.variant)
    except ValueError as e:
        raise ConfigError(f"config.model.variant={config.model.variant!r}: {e}") from None
    inp = config.input
    _require(
        0.0 < inp.mask_ratio < 1.0,
        f"config.input.mask_ratio={inp.mask_ratio} is outside (0, 1); it is the fraction of "
        "patches hidden from the encoder, e.g. 0.75 (MAE) or 0.65 (CMAE block masking).",
    )
    # Building the model (no parameters yet) and the mask lengths checks the variant, the
    # patch and image sizes, the dtype and the masking against each other.
    try:
        cmae_model.build_model(config.model, inp, contrastive=config.loss.contrastive_weight > 0)
        masking.mask_counts(inp.image_size // inp.patch_size, inp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(
        inp.shift >= 0, f"config.input.shift={inp.shift} must be >= 0 (pixels of target offset)."
    )
    master = inp.get("master_size") or 0
    _require(
        master == 0 or master >= inp.image_size + inp.shift,
        f"config.input.master_size={master} cannot hold a {inp.image_size} px view shifted by "
        f"up to {inp.shift} px; use 0 (image_size + shift + 1, the official 256 at 224 px) or "
        f"at least {inp.image_size + inp.shift}.",
    )
    _require(
        len(inp.mean) == inp.channels and len(inp.std) == inp.channels,
        f"config.input.mean/std have {len(inp.mean)}/{len(inp.std)} values for "
        f"config.input.channels={inp.channels}; give one per channel.",
    )

    batch = inp.global_batch_size
    _require(batch > 0, f"config.input.global_batch_size={batch} must be positive.")
    suggestion = max(num_devices, batch // num_devices * num_devices)
    _require(
        batch % num_devices == 0,
        f"config.input.global_batch_size={batch} is not divisible by the {num_devices} devices; "
        f"use a multiple of {num_devices} such as {suggestion}.",
    )
    _require(
        batch % process_count == 0,
        f"config.input.global_batch_size={batch} is not divisible by {process_count} processes.",
    )
    _require(
        config.eval.batch_size % num_devices == 0,
        f"config.eval.batch_size={config.eval.batch_size} is not divisible by the {num_devices} "
        "devices; use a multiple of the device count.",
    )
    try:
        mesh_shape(config.mesh, num_devices)
        logical_axis_rules(config.logical_axis_rules)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None

    contrastive = config.loss.contrastive_weight > 0
    _require(
        config.loss.contrastive_weight >= 0,
        f"config.loss.contrastive_weight={config.loss.contrastive_weight} must be >= 0.",
    )
    if config.method in ("mae", "maect"):  # MAE-CT's stage 1 is plain MAE
        _require(
            not contrastive,
            f"config.method={config.method!r} has no contrastive branch but "
            f"config.loss.contrastive_weight={config.loss.contrastive_weight}; set it to 0 or "
            "use method='cmae'.",
        )
    if contrastive:
        _require(
            inp.target_view,
            "config.loss.contrastive_weight > 0 needs the target view: set "
            "--config.input.target_view=True.",
        )
        _require(
            config.loss.temperature > 0,
            f"config.loss.temperature={config.loss.temperature} must be > 0.",
        )
        _require(
            0.0 <= config.ema.momentum <= 1.0,
            f"config.ema.momentum={config.ema.momentum} must lie in [0, 1], e.g. 0.996.",
        )
    _require(
        config.num_epochs > 0 or config.total_steps > 0,
        "Set config.num_epochs or config.total_steps to a positive number.",
    )

    if config.get("init_from"):
        _require(
            config.method in ("cmae", "mae"),
            f"config.init_from={config.init_from!r} starts CMAE/MAE pretraining; for "
            f"method={config.method!r} use "
            + ("config.init." if config.method == "eval" else "config.stages.<stage>.init_from."),
        )
        if check_data:
            _require_checkpoint(config.init_from, "config.init_from")
    if config.method == "maect":
        _validate_maect(config, num_devices, process_count, check_data)
    if config.method == "eval":
        _validate_eval(config, num_devices, check_data)
    _require(
        config.eval.every_steps >= 0 and config.eval.knn_subset >= 0,
        "config.eval.every_steps and config.eval.knn_subset must be >= 0 (0: off / all).",
    )

    if check_data:
        try:
            sources.check_source_available(config.dataset)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None


def _require_checkpoint(path: str, key: str) -> None:
    """A readable checkpoint of this project or a published one (file, HF folder) at `path`."""
    try:
        check_readable(path)
    except CheckpointError as e:
        raise ConfigError(f"{key}: {e}") from None


def _validate_maect(
    config: ml_collections.ConfigDict, num_devices: int, process_count: int, check_data: bool
) -> None:
    """The MAE-CT keys: config.maect and the sections of stages 2 and 3 (config.stages)."""
    from cmae_jax.models import maect as maect_model

    m = config.maect
    _require(
        m.pooling in maect_model.POOLINGS,
        f"config.maect.pooling={m.pooling!r} is not one of {', '.join(maect_model.POOLINGS)}.",
    )
    _require(
        "topk" not in m,
        "config.maect.topk is now per stage: set config.stages.head.topk (official: 0, the "
        "nearest neighbour) and config.stages.tune.topk (official: 20, or 10 for _aug B/L).",
    )
    depth = maect_model.build_model(config.model, config.input, m).encoder_spec.depth
    for name in ("head", "tune"):
        stage, key = config.stages[name], f"config.stages.{name}"
        batch = stage.input.global_batch_size
        _require(
            batch > 0 and batch % num_devices == 0 and batch % process_count == 0,
            f"{key}.input.global_batch_size={batch} must be a positive multiple of the "
            f"{num_devices} devices and {process_count} processes.",
        )
        _require(
            m.queue_size >= batch,
            f"config.maect.queue_size={m.queue_size} cannot take a global batch of {batch} "
            f"keys ({key}.input.global_batch_size); make the queue at least that long.",
        )
        _require(
            stage.input.views in ("two_crops", "two_crops_aug"),
            f"{key}.input.views={stage.input.views!r} must be 'two_crops' or 'two_crops_aug'.",
        )
        low, high = stage.input.crop_scale
        _require(
            0.0 < low <= high <= 1.0,
            f"{key}.input.crop_scale={tuple(stage.input.crop_scale)} must satisfy "
            "0 < low <= high <= 1, e.g. (0.08, 1.0).",
        )
        _require(stage.temperature > 0, f"{key}.temperature={stage.temperature} must be > 0.")
        _require(
            0 <= stage.topk <= m.queue_size,
            f"{key}.topk={stage.topk} must lie in [0, config.maect.queue_size={m.queue_size}] "
            "(0: the nearest neighbour, as the official stage 2; k: one of the k nearest).",
        )
        _require(
            0.0 <= stage.encoder_ema_momentum < 1.0,
            f"{key}.encoder_ema_momentum={stage.encoder_ema_momentum} must lie in [0, 1) "
            "(0: no encoder EMA; the official stage 3: 0.9999).",
        )
        _require(
            stage.published_encoder in ("ema", "raw"),
            f"{key}.published_encoder={stage.published_encoder!r} must be 'ema' or 'raw'.",
        )
        _require(
            0.0 <= stage.ema_momentum < 1.0,
            f"{key}.ema_momentum={stage.ema_momentum} must lie in [0, 1) (0: no EMA projector).",
        )
        _require(
            0 <= stage.frozen_blocks <= depth,
            f"{key}.frozen_blocks={stage.frozen_blocks} must lie in [0, {depth}] (the depth).",
        )
        _require(
            0.0 < stage.layer_decay <= 1.0,
            f"{key}.layer_decay={stage.layer_decay} must lie in (0, 1], e.g. 0.65.",
        )
        _require(
            stage.num_epochs > 0 or stage.total_steps > 0,
            f"Set {key}.num_epochs or {key}.total_steps to a positive number.",
        )
        for opt_name in ("optimizer", "head_optimizer"):
            opt = stage[opt_name]
            _require(
                opt.base_lr >= 0 and opt.weight_decay >= 0 and opt.views_per_example >= 1,
                f"{key}.{opt_name}: base_lr and weight_decay must be >= 0 and "
                "views_per_example >= 1.",
            )
        if check_data and stage.init_from:
            _require_checkpoint(stage.init_from, f"{key}.init_from")


def _validate_eval(config: ml_collections.ConfigDict, num_devices: int, check_data: bool) -> None:
    """The evaluation keys (method 'eval'): init, protocols and their sections."""
    from cmae_jax.evaluation.features import PIXELS, POOLINGS, RANDOM_INIT
    from cmae_jax.evaluation.protocols import NAMES as PROTOCOLS

    unknown = [p for p in config.protocols if p not in PROTOCOLS]
    _require(
        bool(config.protocols) and not unknown,
        f"config.protocols={tuple(config.protocols)} must name some of {', '.join(PROTOCOLS)}.",
    )
    _require(
        config.eval.feature in POOLINGS,
        f"config.eval.feature={config.eval.feature!r} is not one of {', '.join(POOLINGS)}.",
    )
    _require(config.eval.knn_k >= 1, f"config.eval.knn_k={config.eval.knn_k} must be >= 1.")
    _require(
        config.eval.knn_temperature > 0,
        f"config.eval.knn_temperature={config.eval.knn_temperature} must be > 0 (SPEC: 0.07).",
    )
    probe = config.linear_probe
    _require(
        probe.feature in POOLINGS,
        f"config.linear_probe.feature={probe.feature!r} is not one of {', '.join(POOLINGS)}.",
    )
    _require(
        probe.optimizer in ("lars", "sgd"),
        f"config.linear_probe.optimizer={probe.optimizer!r} must be 'lars' or 'sgd'.",
    )
    _require(
        probe.augment or probe.cache_features,
        "config.linear_probe: with augment=False the features are cached; set "
        "cache_features=True (or augment=True for RandomResizedCrop + flip).",
    )
    ft = config.finetune
    for key, batch in (("linear_probe", probe.batch_size), ("finetune", ft.batch_size)):
        _require(
            batch > 0 and batch % num_devices == 0,
            f"config.{key}.batch_size={batch} must be a positive multiple of the "
            f"{num_devices} devices.",
        )
    _require(
        all(n >= 1 for n in config.low_shot.shots)
        and all(0 < f <= 1 for f in config.low_shot.fractions),
        "config.low_shot: shots must be >= 1 and fractions in (0, 1].",
    )
    _require(
        ft.pooling in ("gap", "cls"), f"config.finetune.pooling={ft.pooling!r}: 'gap' or 'cls'."
    )
    _require(
        0.0 < ft.layer_decay <= 1.0 and 0.0 <= ft.drop_path < 1.0,
        f"config.finetune: layer_decay={ft.layer_decay} must lie in (0, 1] and "
        f"drop_path={ft.drop_path} in [0, 1).",
    )
    _require(
        ft.mixup_alpha >= 0 and ft.cutmix_alpha >= 0 and 0 <= ft.label_smoothing < 1,
        "config.finetune: mixup_alpha and cutmix_alpha must be >= 0, label_smoothing in [0, 1).",
    )
    _require(
        not (config.model.scan_layers and ft.layer_decay < 1.0 and "finetune" in config.protocols),
        "config.finetune.layer_decay < 1 needs unrolled blocks: set "
        "config.model.scan_layers=False.",
    )
    if config.init == PIXELS:
        _require(
            not {"finetune"} & set(config.protocols) and not probe.augment,
            "config.init='pixels' has no encoder to fine-tune or to run on augmented views; "
            "drop 'finetune' from config.protocols and set config.linear_probe.augment=False.",
        )
    elif config.init not in RANDOM_INIT and check_data:
        _require_checkpoint(config.init, "config.init")
