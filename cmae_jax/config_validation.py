"""Checks a config before anything compiles; errors name the key and the fix.

The checks every method shares live here; each method checks its own keys (its module's
`validate`, cmae_jax.methods). 'eval' (cmae_jax.evaluate) is the evaluation entry point,
not a method.
"""

import ml_collections

from cmae_jax import methods, optim
from cmae_jax.config_checks import (
    ConfigError,
    require,
    require_checkpoint,
    require_pair,
    require_probability,
    require_range,
)
from cmae_jax.models import cmae as cmae_model
from cmae_jax.models import vit
from cmae_jax.sharding import logical_axis_rules, mesh_shape

EVAL = "eval"

__all__ = ["ConfigError", "validate"]


def validate(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int,
    process_count: int = 1,
    check_data: bool = True,
) -> None:
    """Raises ConfigError for the first value that would fail later (or silently mislead).

    `check_data` also checks the files: the dataset and any checkpoint to start from.
    """
    known = (*methods.names(), EVAL)
    require(
        config.method in known,
        f"config.method={config.method!r} is unknown; use one of {', '.join(known)}.",
    )
    try:
        vit.parse_variant(config.model.variant)
    except ValueError as e:
        raise ConfigError(f"config.model.variant={config.model.variant!r}: {e}") from None
    # Building the encoder-holding model (no parameters yet) checks the variant, the patch
    # and image sizes and the dtype against each other.
    try:
        cmae_model.build_model(config.model, config.input, contrastive=False)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    inp = config.input
    require(
        len(inp.mean) == inp.channels and len(inp.std) == inp.channels,
        f"config.input.mean/std have {len(inp.mean)}/{len(inp.std)} values for "
        f"config.input.channels={inp.channels}; give one per channel.",
    )
    _validate_view_augmentations(inp)

    batch = inp.global_batch_size
    require(batch > 0, f"config.input.global_batch_size={batch} must be positive.")
    suggestion = max(num_devices, batch // num_devices * num_devices)
    require(
        batch % num_devices == 0,
        f"config.input.global_batch_size={batch} is not divisible by the {num_devices} devices; "
        f"use a multiple of {num_devices} such as {suggestion}.",
    )
    require(
        batch % process_count == 0,
        f"config.input.global_batch_size={batch} is not divisible by {process_count} processes.",
    )
    require(
        config.eval.batch_size % num_devices == 0,
        f"config.eval.batch_size={config.eval.batch_size} is not divisible by the {num_devices} "
        "devices; use a multiple of the device count.",
    )
    try:
        data, fsdp, tensor = mesh_shape(config.mesh, num_devices)
        logical_axis_rules(config.logical_axis_rules)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    # Measured on 8 CPU devices (2026-12-07, jax 0.10.2): with the conv stem, a mesh that
    # splits both the batch and the tensor axis (4x1x2, 2x2x2) gets a CMAE step whose
    # contrastive-branch gradients differ from one device's by 1-8%; 1x1x8, 2x4x1 and 8x1x1
    # agree, and so does 4x1x2 with XLA's CSE pass off (--xla_disable_hlo_passes=cse): a
    # compiler fault, refused on every platform as only XLA's CPU backend could be checked
    # (tests/test_sharding.py).
    require(
        not (config.model.get("stem_channels", 0) > 0 and tensor > 1 and data * fsdp > 1),
        f"config.model.stem_channels={config.model.stem_channels} with a mesh of data x fsdp "
        f"x tensor = {data}x{fsdp}x{tensor}: the conv stem's step on a mesh that splits both "
        "the batch and the tensor axis does not match one device's (README, Mesh and sharding "
        "rules); use --config.mesh.tensor=1 (data/FSDP only) or "
        "--config.model.stem_channels=0.",
    )
    require(
        config.num_epochs > 0 or config.total_steps > 0,
        "Set config.num_epochs or config.total_steps to a positive number.",
    )

    schedule = config.get("optimizer", {}).get("schedule", "cosine")
    require(
        schedule in optim.LR_SCHEDULES,
        f"config.optimizer.schedule={schedule!r} is not one of {', '.join(optim.LR_SCHEDULES)}: "
        "'cosine' decays the lr to min_lr after the warmup, 'constant' holds its peak.",
    )

    if config.method == EVAL:
        require(
            not config.get("init_from"),
            f"config.init_from={config.init_from!r} starts CMAE/MAE pretraining; for "
            f"method={config.method!r} use config.init.",
        )
        _validate_eval(config, num_devices, check_data)
    else:
        checks = methods.Checks(num_devices, process_count, check_data)
        methods.get(config.method).validate(config, checks)
    require(
        config.eval.every_steps >= 0 and config.eval.knn_subset >= 0,
        "config.eval.every_steps and config.eval.knn_subset must be >= 0 (0: off / all).",
    )
    # Also for pretraining: its k-NN reads this feature after the first steps have run.
    require(
        config.eval.feature in vit.POOLINGS,
        f"config.eval.feature={config.eval.feature!r} is not one of {', '.join(vit.POOLINGS)}.",
    )
    if check_data:
        _validate_data(config)


def _validate_view_augmentations(inp: ml_collections.ConfigDict) -> None:
    require_range(inp.crop_scale, "config.input.crop_scale", "(0.08, 1.0)", upper=1.0)
    require_range(inp.crop_ratio, "config.input.crop_ratio", "(0.75, 1.333)")
    jitter = inp.get("color_jitter") or {}
    probabilities = {
        "color_jitter.prob": jitter.get("prob"),
        "grayscale_prob": inp.get("grayscale_prob"),
        "blur_prob": inp.get("blur_prob"),
        "erase_prob": inp.get("erase_prob"),
    }
    for key, value in probabilities.items():
        if value is not None:
            require_probability(value, f"config.input.{key}")
    if inp.get("blur_prob", 0.0) > 0:
        require_range(inp.blur_sigma, "config.input.blur_sigma", "(0.1, 2.0) pixels")
    if inp.get("erase_prob", 0.0) > 0:
        low, high = require_pair(inp.erase_scale, "config.input.erase_scale", "(0.02, 0.33)")
        require(
            0.0 < low <= high < 1.0,
            f"config.input.erase_scale={tuple(inp.erase_scale)} must be fractions of the "
            "view's area with 0 < low <= high < 1, e.g. (0.02, 0.33).",
        )
        require_range(inp.erase_ratio, "config.input.erase_ratio", "(0.3, 3.3)")


def _validate_data(config: ml_collections.ConfigDict) -> None:
    """The dataset: a known kind whose files are there."""
    # TF-free: the data sources import TensorFlow; checks without data (the compile-ahead,
    # the train-step benchmark) run where it is missing.
    from cmae_jax.data import sources

    require(
        config.dataset.name in sources.DATASET_NAMES,
        f"config.dataset.name={config.dataset.name!r} is unknown; use one of "
        f"{', '.join(sources.DATASET_NAMES)} (set config.dataset.tfds_name for any TFDS dataset).",
    )
    try:
        sources.check_source_available(config.dataset)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _validate_eval(config: ml_collections.ConfigDict, num_devices: int, check_data: bool) -> None:
    """The evaluation keys (method 'eval'): init, protocols and their sections."""
    # TF-free: the evaluation package imports TensorFlow; only evaluation configs need it.
    from cmae_jax.evaluation.features import PIXELS, RANDOM_INIT
    from cmae_jax.evaluation.protocols import NAMES as PROTOCOLS

    unknown = [p for p in config.protocols if p not in PROTOCOLS]
    require(
        bool(config.protocols) and not unknown,
        f"config.protocols={tuple(config.protocols)} must name some of {', '.join(PROTOCOLS)}.",
    )
    require(config.eval.knn_k >= 1, f"config.eval.knn_k={config.eval.knn_k} must be >= 1.")
    require(
        config.eval.knn_temperature > 0,
        f"config.eval.knn_temperature={config.eval.knn_temperature} must be > 0 (SPEC: 0.07).",
    )
    probe = config.linear_probe
    require(
        probe.feature in vit.POOLINGS,
        f"config.linear_probe.feature={probe.feature!r} is not one of {', '.join(vit.POOLINGS)}.",
    )
    require(
        probe.optimizer in ("lars", "sgd"),
        f"config.linear_probe.optimizer={probe.optimizer!r} must be 'lars' or 'sgd'.",
    )
    require(
        probe.augment or probe.cache_features,
        "config.linear_probe: with augment=False the features are cached; set "
        "cache_features=True (or augment=True for RandomResizedCrop + flip).",
    )
    ft = config.finetune
    for key, batch in (("linear_probe", probe.batch_size), ("finetune", ft.batch_size)):
        require(
            batch > 0 and batch % num_devices == 0,
            f"config.{key}.batch_size={batch} must be a positive multiple of the "
            f"{num_devices} devices.",
        )
    require(
        all(n >= 1 for n in config.low_shot.shots)
        and all(0 < f <= 1 for f in config.low_shot.fractions),
        "config.low_shot: shots must be >= 1 and fractions in (0, 1].",
    )
    require(
        ft.pooling in ("gap", "cls"), f"config.finetune.pooling={ft.pooling!r}: 'gap' or 'cls'."
    )
    require(
        0.0 < ft.layer_decay <= 1.0 and 0.0 <= ft.drop_path < 1.0,
        f"config.finetune: layer_decay={ft.layer_decay} must lie in (0, 1] and "
        f"drop_path={ft.drop_path} in [0, 1).",
    )
    require(
        ft.mixup_alpha >= 0 and ft.cutmix_alpha >= 0 and 0 <= ft.label_smoothing < 1,
        "config.finetune: mixup_alpha and cutmix_alpha must be >= 0, label_smoothing in [0, 1).",
    )
    require(
        not (config.model.scan_layers and ft.layer_decay < 1.0 and "finetune" in config.protocols),
        "config.finetune.layer_decay < 1 needs unrolled blocks: set "
        "config.model.scan_layers=False.",
    )
    if config.init == PIXELS:
        require(
            not {"finetune"} & set(config.protocols) and not probe.augment,
            "config.init='pixels' has no encoder to fine-tune or to run on augmented views; "
            "drop 'finetune' from config.protocols and set config.linear_probe.augment=False.",
        )
    elif config.init not in RANDOM_INIT and check_data:
        require_checkpoint(config.init, "config.init")
