"""Progress of the long calibration steps: rich bars on a terminal, plain lines anywhere else.

The experiments and the fit only call `reporter.task(description, total)` and tick; what the user sees
is the caller's choice. A pipe or a log file gets one line when a step starts and one when it ends:
redrawn bars there are noise, and an unterminated bar leaves no record of how far a run got.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol, TextIO, runtime_checkable

Tick = Callable[[], None]


@runtime_checkable
class Reporter(Protocol):
    def task(self, description: str, total: int) -> AbstractContextManager[Tick]:
        """A step of `total` units; the context yields the function to call once per unit done."""
        ...


class NoProgress:
    """Shows nothing."""

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Tick]:
        yield lambda: None


class RichProgress:
    """Bars on a started rich.progress.Progress (the caller owns its start and stop)."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Tick]:
        tid = self.progress.add_task(description, total=total)
        try:
            yield lambda: self.progress.advance(tid)
        finally:
            self.progress.update(tid, completed=total)


class LineProgress:
    """One line per step started and one per step finished, flushed at once (for pipes and log files)."""

    def __init__(self, stream: TextIO | None = None, prefix: str = "") -> None:
        self._stream = stream
        self.prefix = prefix

    @property
    def stream(self) -> TextIO:
        # Resolved at each write: a test runner swaps sys.stderr per command.
        return self._stream if self._stream is not None else sys.stderr

    def _say(self, text: str) -> None:
        print(f"{self.prefix}{text}", file=self.stream, flush=True)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Tick]:
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1

        t0 = time.monotonic()
        self._say(f"{description}: started ({total} step{'' if total == 1 else 's'})")
        ok = False
        try:
            yield tick
            ok = True
        finally:
            what = "done" if ok else f"stopped after {min(done, total)} of {total} steps"
            self._say(f"{description}: {what} ({time.monotonic() - t0:.1f} s)")


def as_reporter(progress: object) -> Reporter:
    """None: nothing shown; a rich.progress.Progress: bars on it; a Reporter: itself."""
    if progress is None:
        return NoProgress()
    if isinstance(progress, Reporter):
        return progress
    if hasattr(progress, "add_task") and hasattr(progress, "advance"):
        return RichProgress(progress)
    raise TypeError(f"progress must be None, a rich.progress.Progress or have task(description, total), "
                    f"not {type(progress).__name__}")
