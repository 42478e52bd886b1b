"""The config error and the checks that config_validation and the method modules share.

TensorFlow-free: the method modules (cmae_jax.methods) check their keys with these on
machines that have no TensorFlow.
"""

from cmae_jax.weights import CheckpointError, check_readable


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
