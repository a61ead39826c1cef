"""Python logging for pcm-hil: one logger per module (`logging.getLogger(__name__)`: hil.*, drivers.*,
calibration.*), a console handler on stderr set by `pcm-hil -v / --log-level`, and RUN_DIR/pcm-hil.log
for every run (info and above, or the console's level if lower).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PACKAGES = ("hil", "drivers", "calibration", "sim")
RUN_LOG_NAME = "pcm-hil.log"
_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_console: logging.Handler | None = None


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (a test runner swaps it per command)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def parse_level(verbose: int, level: str | None) -> int:
    """The console level: --log-level wins; else warning, info with -v, debug with -vv."""
    if level is not None:
        value = logging.getLevelName(level.strip().upper())
        if not isinstance(value, int):
            raise ValueError(f"--log-level must be one of debug, info, warning, error; got {level!r}")
        return value
    return {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)


def setup_console_logging(verbose: int = 0, level: str | None = None) -> None:
    """Route the project's loggers to stderr at the chosen level (idempotent)."""
    global _console
    lvl = parse_level(verbose, level)
    if _console is None:
        _console = _Stderr()
        _console.setFormatter(logging.Formatter(_FORMAT))
        # Records the command line prints itself (the error that ends a run) go to the run's file only.
        _console.addFilter(lambda record: not getattr(record, "file_only", False))
        for name in PACKAGES:
            logging.getLogger(name).addHandler(_console)
    _console.setLevel(lvl)
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(min(lvl, logging.INFO))  # the run's file gets info even when the console shows less
        logger.propagate = False


@contextmanager
def run_log_file(run_dir: Path) -> Iterator[None]:
    """Append the project's log records (info and above) to RUN_DIR/pcm-hil.log while the block runs."""
    handler = logging.FileHandler(run_dir / RUN_LOG_NAME, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.DEBUG if _console is not None and _console.level < logging.INFO else logging.INFO)
    loggers = [logging.getLogger(name) for name in PACKAGES]
    for logger in loggers:
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()
