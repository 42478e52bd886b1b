"""Checks a config before anything compiles; errors name the key and the fix."""

import ml_collections

from cmae_jax.data import masking, sources
from cmae_jax.models import cmae as cmae_model
from cmae_jax.models import vit
from cmae_jax.sharding import mesh_shape

METHODS = ("cmae", "mae")


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
    except ValueError as e:
        raise ConfigError(str(e)) from None

    contrastive = config.loss.contrastive_weight > 0
    _require(
        config.loss.contrastive_weight >= 0,
        f"config.loss.contrastive_weight={config.loss.contrastive_weight} must be >= 0.",
    )
    if config.method == "mae":
        _require(
            not contrastive,
            f"config.method='mae' has no contrastive branch but config.loss.contrastive_weight="
            f"{config.loss.contrastive_weight}; set it to 0 or use method='cmae'.",
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

    if check_data:
        try:
            sources.check_source_available(config.dataset)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
