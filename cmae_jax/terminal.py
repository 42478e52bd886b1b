"""What the terminal shows: progress lines, the config, warnings and errors.

orbax logs about 40 INFO lines per checkpoint (its options, metadata reads and writes,
device-to-host transfers); they are hidden unless asked for (--verbosity=1, which also
shows every library's DEBUG lines, or config.log_orbax_info=True), and the loop logs one
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


def configure(show_orbax_info: bool) -> None:
    """Shows or hides orbax's INFO lines (however often called, one filter at most)."""
    for logger in _loggers():
        for existing in [f for f in logger.filters if isinstance(f, HideLibraryInfo)]:
            logger.removeFilter(existing)
        if not show_orbax_info:
            logger.addFilter(HideLibraryInfo())
