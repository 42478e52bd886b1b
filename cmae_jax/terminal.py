"""What the terminal shows: progress lines, the config, warnings and errors.

orbax logs about 40 INFO lines per checkpoint (its options, metadata reads and writes,
device-to-host transfers); they are hidden unless --verbosity >= 1, and the loop logs one
line of its own per save. orbax's warnings and errors always show.
"""

from __future__ import annotations

import logging
import os

# Where orbax's source files live: its records carry their file as `pathname`.
ORBAX_FOLDER = f"{os.sep}orbax{os.sep}"


class HideLibraryInfo(logging.Filter):
    """Drops records below WARNING that come from a source folder (e.g. orbax's)."""

    def __init__(self, folder: str = ORBAX_FOLDER) -> None:
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or self.folder not in record.pathname


def _loggers() -> tuple[logging.Logger, ...]:
    # orbax logs through absl's logger, and a few of its modules through the root logger.
    return (logging.getLogger("absl"), logging.getLogger())


def configure(verbosity: int) -> None:
    """Hides orbax's INFO lines at verbosity < 1 (absl's --verbosity), shows them above."""
    for logger in _loggers():
        for existing in [f for f in logger.filters if isinstance(f, HideLibraryInfo)]:
            logger.removeFilter(existing)
        if verbosity < 1:
            logger.addFilter(HideLibraryInfo())
