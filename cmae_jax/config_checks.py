"""The config error and the checks that config_validation and the method modules share.

TensorFlow-free: the method modules (cmae_jax.methods) check their keys with these on
machines that have no TensorFlow.
"""

from typing import Any

from cmae_jax.weights import CheckpointError, check_readable

# ml_collections joins the values of a tuple key given twice on the command line
# ("--config.k=(0,0) --config.k=(1,0.1)" gives (0, 0, 1, 0.1)), and code that reads one
# value per view would silently take the first two.
_REPEATED_TUPLE_HINT = (
    "A tuple key given twice on the command line is joined into one longer tuple: give it once."
)


class ConfigError(ValueError):
    """A config value that cannot work, with the key and how to fix it."""


def require(ok: bool, message: str) -> None:
    """Raises ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def require_checkpoint(path: str, key: str) -> None:
    """A readable checkpoint of this project or a published one (file, HF folder) at `path`."""
    try:
        check_readable(path)
    except CheckpointError as e:
        raise ConfigError(f"{key}: {e}") from None


def require_probability(value: Any, key: str) -> None:
    """A number in [0, 1] at `key`."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    require(
        number and 0.0 <= value <= 1.0,
        f"{key}={value!r} is a probability; give a value in [0, 1].",
    )


def require_pair(value: Any, key: str, example: str) -> tuple[float, float]:
    """The two numbers at `key` (a range, or one value per view)."""
    is_sequence = isinstance(value, (tuple, list))
    numbers = is_sequence and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )
    require(
        numbers and len(value) == 2,
        f"{key}={tuple(value) if is_sequence else value!r} must be two numbers, e.g. "
        f"{example}. {_REPEATED_TUPLE_HINT}",
    )
    return float(value[0]), float(value[1])


def require_range(value: Any, key: str, example: str, upper: float | None = None) -> None:
    """A range to draw from at `key`: two numbers with 0 < low <= high (<= upper if given)."""
    low, high = require_pair(value, key, example)
    bound = "" if upper is None else f" <= {upper:g}"
    require(
        0.0 < low <= high and (upper is None or high <= upper),
        f"{key}={tuple(value)} must satisfy 0 < low <= high{bound}, e.g. {example}.",
    )


def require_two_view_augment(augment: Any, key: str) -> None:
    """BYOL's colour ops of two-crop views (MoCo v3, MAE-CT '_aug'), some given per view."""
    require_probability(augment.color_jitter.prob, f"{key}.color_jitter.prob")
    require_probability(augment.grayscale_prob, f"{key}.grayscale_prob")
    for name in ("blur_prob", "solarize_prob"):
        per_view = require_pair(augment[name], f"{key}.{name}", "(1.0, 0.1): view 1, view 2")
        for view, probability in enumerate(per_view):
            require_probability(probability, f"{key}.{name}[{view}]")
    require_range(augment.blur_sigma, f"{key}.blur_sigma", "(0.1, 2.0) pixels")
