"""DryRunDriver: see what a run would send to a chip without sending it."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .base import ArrayDriver
from .program import PulseProgram, ReadResult


class DryRunDriver(ArrayDriver):
    """Validates and records programs without sending them; reads go to the wrapped driver.

    For checking what a run would send to a real chip before it sends anything.
    """

    def __init__(self, inner: ArrayDriver) -> None:
        super().__init__(inner.geometry, inner.limits)
        self.inner = inner
        self.programs: list[PulseProgram] = []

    @property
    def identity(self) -> str:
        return f"dry-run of {self.inner.identity}"

    def _read(self, addresses: npt.NDArray[np.int64], whole: bool) -> ReadResult:
        return self.inner.read(None if whole else addresses)

    def _apply(self, program: PulseProgram) -> None:
        self.programs.append(program)

    def _last_program_id(self) -> int | None:
        return self.programs[-1].program_id if self.programs else None

    def _now(self) -> float:
        return self.inner.now()
