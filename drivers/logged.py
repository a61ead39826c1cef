"""LoggedDriver: wraps any driver and sends every read and every program to a run log."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

import numpy as np
import numpy.typing as npt

from .base import APPLY_READ, ArrayDriver
from .program import Block, PulseProgram, ReadResult
from .runlog import U32_MAX, RunLogError, RunLogWriter

#: Root attributes LoggedDriver writes so a replay can stand in for the driver.
DRIVER_ATTRS = ("driver_identity", "driver_rows", "driver_cols", "driver_limits_json")


class LoggedDriver(ArrayDriver):
    """Passes everything to inner; logs each read (step, t_s, wall time, reason) and each program.

    A program is logged before it is handed to inner.apply, so a crash mid-apply leaves it in the
    log (whether the chip applied it is then settled with last_program_id()). A program the safety
    limits refuse is neither logged nor sent. mvm/mvm_t pass through unlogged.

    When the log cannot take a row (a full disk), the writer's RunLogError propagates and the writer
    is closed: a program whose logging failed is not sent, and every later read or program raises
    RunLogError too, so nothing reaches the chip that the log lacks.
    """

    def __init__(self, inner: ArrayDriver, writer: RunLogWriter, *,
                 wall_clock: Callable[[], float] = time.time, program_times: bool = True) -> None:
        """program_times=False logs programs without a driver time (saves inner.now(), a query on a tester)."""
        super().__init__(inner.geometry, inner.limits)
        if inner.geometry.n_devices - 1 > U32_MAX:
            raise RunLogError(f"a {inner.geometry.n_devices}-device array is too large for the run log's uint32 addresses")
        self.inner = inner
        self.writer = writer
        self.wall_clock = wall_clock
        self.program_times = program_times
        self.step = 0
        self.reason = "periodic"
        self._record_driver(writer)

    def _record_driver(self, writer: RunLogWriter) -> None:
        """Write what a replay needs to stand in for inner; refuse a log made on a different geometry."""
        g = self.inner.geometry
        attrs = writer.attrs
        rows, cols = attrs.get("driver_rows"), attrs.get("driver_cols")
        if rows is not None and (int(rows), int(cols)) != (g.rows, g.cols):
            raise RunLogError(f"run log {writer.path} was made on a {int(rows)} x {int(cols)} array, "
                              f"this driver is {g.rows} x {g.cols}")
        writer.set_attrs(driver_identity=self.inner.identity, driver_rows=g.rows, driver_cols=g.cols,
                         driver_limits_json=self.inner.limits.model_dump_json())

    def reading(self, reason: str) -> _Reading:
        """Reads inside the block (a with statement) are logged with reason instead of self.reason."""
        return _Reading(self, reason)

    # ------------------------------------------------------------------ pass-through description
    @property
    def identity(self) -> str:
        return self.inner.identity

    @property
    def capabilities(self) -> frozenset[str]:
        return self.inner.capabilities

    # ------------------------------------------------------------------ the contract
    def read(self, addresses: npt.ArrayLike | None = None) -> ReadResult:
        """Read through inner (which checks the addresses) and log the result."""
        self._check_open()
        self.writer._check_open()   # a closed or failed log: no read that could not be logged
        r = self.inner.read(addresses)
        self.writer._log_reads(self.step, r.t_s, r.addresses, r.conductances_us, self.reason, self.wall_clock())
        return r

    def _read(self, addresses: npt.NDArray[np.int64], whole: bool) -> ReadResult:  # pragma: no cover - read() overrides
        return self.inner.read(None if whole else addresses)

    @property
    def lifetime_pulses(self) -> npt.NDArray[np.int64]:
        """The wrapped driver's endurance ledger: the one every program is checked against."""
        return self.inner.lifetime_pulses

    def check_program(self, program: PulseProgram) -> None:
        """Check program against the wrapped driver's geometry, limits and ledger; send nothing."""
        self._check_open()
        self.inner.check_program(program)

    def apply(self, program: PulseProgram) -> None:
        """Check once (on inner), log, then apply through inner: a program refused by the limits, or one
        the log could not take (RunLogError), is not sent."""
        self.check_program(program)
        t = self.inner.now() if self.program_times else None
        self.writer._log_program(self.step, program, t, self.wall_clock())
        self.inner._apply_checked(program)

    def apply_and_read(self, program: PulseProgram) -> ReadResult:
        """apply(program) then read(program.addresses) through inner's apply_and_read, logged with the same rows in
        the same order as the two calls (the read with the current reason).

        An inner driver with APPLY_READ reports its clock at the program's start in the same reply, so the
        program's row is written once that reply is in (with that time, where apply() would have asked the
        clock first: one round trip fewer); the log is checked to be open before anything is sent. Should the
        operation fail, the program is logged all the same (without a time), as apply() would have logged it.
        """
        self._check_open()
        inner = self.inner
        inner.check_program(program)
        if not (self.program_times and APPLY_READ in inner.capabilities):
            t = inner.now() if self.program_times else None
            self.writer._log_program(self.step, program, t, self.wall_clock())
            r = inner._apply_and_read_checked(program)[1]
        else:
            self.writer._check_open()
            wall = self.wall_clock()
            try:
                t, r = self.inner._apply_and_read_checked(program)
            except BaseException:
                try:
                    self.writer._log_program(self.step, program, None, wall)
                except RunLogError:
                    pass  # the log failed too; the driver's error says more about the chip
                raise
            self.writer._log_program(self.step, program, t, wall)
        self.writer._log_reads(self.step, r.t_s, r.addresses, r.conductances_us, self.reason, self.wall_clock())
        return r

    def _apply(self, program: PulseProgram) -> None:  # pragma: no cover - apply() overrides
        self.inner._apply_checked(program)

    def _last_program_id(self) -> int | None:
        return self.inner.last_program_id()

    def _now(self) -> float:
        return self.inner.now()

    def mvm(self, block: Block, x: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """Analog forward product of inner (not logged)."""
        self._check_open()
        return self.inner.mvm(block, x)

    def mvm_t(self, block: Block, d: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """Analog transpose product of inner (not logged)."""
        self._check_open()
        return self.inner.mvm_t(block, d)

    def _close(self) -> None:
        # The writer and inner belong to the caller, who may still want them; close only the wrapper.
        pass


class _Reading:
    """LoggedDriver.reading's context: a plain class, as it wraps every read-back of the training loop."""

    __slots__ = ("driver", "reason", "saved")

    def __init__(self, driver: LoggedDriver, reason: str) -> None:
        self.driver, self.reason = driver, reason

    def __enter__(self) -> None:
        self.saved = self.driver.reason
        self.driver.reason = self.reason

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.driver.reason = self.saved
