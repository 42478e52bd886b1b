"""The trainers' progress lines in a notebook or script that did not start through absl's
app.run: cmae_jax's INFO records (losses, images/s, ETA, k-NN) and every library's
warnings, without the INFO chatter of orbax (several lines per checkpoint) and clu."""

import logging
import os

from absl import logging as absl_logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class OwnInfoFilter(logging.Filter):
    """Passes warnings and worse from anywhere, and lower levels only from cmae_jax's files."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether `record` is shown."""
        return record.levelno >= logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


def show_progress() -> None:
    """Logs at INFO, keeping only cmae_jax's own INFO records (absl's logger, idempotent)."""
    absl_logging.set_verbosity(absl_logging.INFO)
    logger = logging.getLogger("absl")
    if not any(isinstance(f, OwnInfoFilter) for f in logger.filters):
        logger.addFilter(OwnInfoFilter())
