"""ReplayDriver: a recorded run log standing in for the chip (the third way the stack runs).

Each read returns what the log recorded for the same request, in the recorded order; each program
must equal the one the log recorded next, and counts as applied (the chip of the log applied it).
A request that departs from the log raises ReplayMismatch naming where and how.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .base import ArrayDriver
from .errors import DriverError
from .program import Geometry, PulseProgram, ReadResult
from .runlog import RunLogError, RunLogReader, RunLogWarning
from .runlog.reader import format_problems
from .safety import SafetyLimits

WINDOW_ROWS = 1 << 20   # per-device rows fetched from the file at a time


class ReplayMismatch(DriverError):
    """A read or program asked of a ReplayDriver is not the one the log recorded next.

    op: the position of the logged operation it was compared with (reads and programs in logged order; == the
    number of operations replayed before it); logged_step: that operation's step (None past the log's end);
    program_id: the id of the program asked for (None for a read); never_logged: the request has no counterpart
    in the log (a read or program where the log has none, or past its end).
    """

    def __init__(self, message: str, *, op: int = 0, logged_step: int | None = None,
                 program_id: int | None = None, never_logged: bool = False) -> None:
        super().__init__(message)
        self.op, self.logged_step, self.program_id, self.never_logged = op, logged_step, program_id, never_logged


class ReplayDriver(ArrayDriver):
    """Re-serves the reads of a run log (written through LoggedDriver) in order; conductances in uS, times in s.

    The log must have been closed or flushed up to the part to replay; its checksums are verified
    before anything is served. Analog mvm is not recorded in a log, so a replay offers no MVM capability.
    last_program_id() starts one below the log's first program id (what the logged run's chip said), so a run
    started on a replay numbers its programs as the logged one did.
    """

    def __init__(self, log: str | Path | RunLogReader, *, geometry: Geometry | None = None,
                 limits: SafetyLimits | None = None, verify: bool = True) -> None:
        """log: the run log (path or open reader); geometry/limits: override what the log's attributes say.

        verify: recompute the log's checksums first and refuse (RunLogError naming dataset and rows) a
        log that fails them; a schema-1 log has none and is replayed with a RunLogWarning.
        """
        self._reader = log if isinstance(log, RunLogReader) else RunLogReader(log)
        self._own_reader = not isinstance(log, RunLogReader)
        try:
            if verify:
                self._verify()
            attrs = self._reader.attrs
            if geometry is None:
                if "driver_rows" not in attrs or "driver_cols" not in attrs:
                    raise RunLogError(f"run log {self._reader.path} does not say the array's geometry "
                                      f"(driver_rows / driver_cols, written by LoggedDriver); pass geometry=")
                geometry = Geometry(int(attrs["driver_rows"]), int(attrs["driver_cols"]))
            if limits is None and "driver_limits_json" in attrs:
                limits = SafetyLimits.model_validate_json(attrs["driver_limits_json"])
            self._recorded_identity = str(attrs.get("driver_identity", "unknown driver"))
            super().__init__(geometry, limits)
            self._reads = self._reader.read_events()
            progs = self._reader.program_events()
            self._programs = self._reader.programs()
        except BaseException:
            if self._own_reader:
                self._reader.close()
            raise
        # One timeline across reads and programs, in the order they were logged.
        kinds = np.concatenate([np.zeros(len(self._reads["seq"]), np.int8), np.ones(len(progs["seq"]), np.int8)])
        index = np.concatenate([np.arange(len(self._reads["seq"])), np.arange(len(progs["seq"]))])
        order = np.argsort(np.concatenate([self._reads["seq"], progs["seq"]]), kind="stable")
        self._op_kind = kinds[order]
        self._op_index = index[order]
        times = np.concatenate([self._reads["t_s"], progs["t_s"]])[order]
        self._op_time = times
        self._next = 0
        # Before the log's first program the chip's last id was the one below it (a run's ids continue above the
        # chip's last one), so a run made on this driver numbers its programs as the logged run did.
        first = int(progs["program_id"][0]) if len(progs["program_id"]) else 0
        self._last_id: int | None = first - 1 if first > 1 else None
        self._window = (0, 0)
        self._win_addr = np.empty(0, np.int64)
        self._win_g = np.empty(0, np.float32)

    def _verify(self) -> None:
        r = self._reader
        if not r.has_checksums:
            warnings.warn(f"run log {r.path} has no checksums (schema 1): replaying it unverified",
                          RunLogWarning, stacklevel=3)
            return
        problems = r.verify()
        if problems:
            raise RunLogError(format_problems(r.path, problems, "refusing to replay it"))

    # ------------------------------------------------------------------ description
    @property
    def identity(self) -> str:
        return f"replay of {self._recorded_identity} from {self._reader.path}"

    @property
    def log_path(self) -> Path:
        """The replayed run log."""
        return self._reader.path

    @property
    def log_attrs(self) -> dict:
        """The replayed log's root attributes (what the logged run recorded: its plan, its config...)."""
        return dict(self._reader.attrs)

    def log_array(self, name: str) -> np.ndarray:
        """The array the replayed log stores under /arrays/name (RunLogError if it has none)."""
        return self._reader.array(name)

    def advance(self, seconds: float) -> None:
        """Let time pass: nothing to do, the clock of a replay is the log's (now() is the logged time of the next
        operation, so a wait the logged run made between two operations is already in their times)."""

    @property
    def replayed(self) -> int:
        """Logged operations (reads and programs) re-served so far."""
        return self._next

    @property
    def remaining(self) -> int:
        """Logged operations (reads and programs) not yet re-served."""
        return len(self._op_kind) - self._next

    # ------------------------------------------------------------------ the contract
    def _read(self, addresses: npt.NDArray[np.int64], whole: bool) -> ReadResult:
        i = self._expect(0, f"a read of {addresses.size} devices", None)
        start, count = int(self._reads["start"][i]), int(self._reads["count"][i])
        addr, g = self._devices(start, count)
        if addr.shape != addresses.shape or not np.array_equal(addr, addresses):
            raise ReplayMismatch(f"read {i} of the log (step {int(self._reads['step'][i])}, reason "
                                 f"{str(self._reads['reason'][i])!r}) was of {count} devices "
                                 f"{_first_difference(addr, addresses)}; this request differs",
                                 op=self._next, logged_step=int(self._reads["step"][i]))
        self._next += 1
        return ReadResult(addresses, g.copy(), float(self._reads["t_s"][i]))

    def _apply(self, program: PulseProgram) -> None:
        i = self._expect(1, f"program {program.program_id}", program.program_id)
        step, _, logged = self._programs[i]
        what = _program_difference(logged, program)
        if what:
            raise ReplayMismatch(f"program {program.program_id} differs from the log's next program (id "
                                 f"{logged.program_id}, logged at step {step}): {what}", op=self._next,
                                 logged_step=step, program_id=program.program_id)
        self._next += 1
        self._last_id = program.program_id

    def _expect(self, kind: int, what: str, program_id: int | None) -> int:
        """The index (among the log's reads, or programs) of the next logged operation, which must be of kind."""
        never = "a read that was never logged" if kind == 0 else "a program that was never logged"
        if self._next >= len(self._op_kind):
            raise ReplayMismatch(f"asked for {what}, {never}: all {len(self._op_kind)} logged operations were "
                                 "replayed", op=self._next, program_id=program_id, never_logged=True)
        if self._op_kind[self._next] != kind:
            j = int(self._op_index[self._next])
            if self._op_kind[self._next]:
                step = self._programs[j][0]
                nxt = f"program {self._programs[j][2].program_id} (step {step})"
            else:
                step = int(self._reads["step"][j])
                nxt = f"a read (step {step}, reason {str(self._reads['reason'][j])!r})"
            raise ReplayMismatch(f"asked for {what}, {never}: the log's next operation ({self._next}) is {nxt}",
                                 op=self._next, logged_step=step, program_id=program_id, never_logged=True)
        return int(self._op_index[self._next])

    def next_operation(self) -> str | None:
        """The log's next operation in words ('program 7 (step 3)', 'a read (step 3, reason ...)'); None at the end."""
        if self._next >= len(self._op_kind):
            return None
        j = int(self._op_index[self._next])
        if self._op_kind[self._next]:
            return f"program {self._programs[j][2].program_id} (step {self._programs[j][0]})"
        return f"a read of {int(self._reads['count'][j])} devices (step {int(self._reads['step'][j])}, reason " \
               f"{str(self._reads['reason'][j])!r})"

    def _devices(self, start: int, count: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        lo, hi = self._window
        if start < lo or start + count > hi:
            lo, hi = start, start + max(count, WINDOW_ROWS)
            a, g = self._reader.read_devices(lo, hi)
            self._win_addr, self._win_g, self._window = a, g, (lo, lo + a.size)
        s = start - lo
        return self._win_addr[s:s + count], self._win_g[s:s + count]

    def _last_program_id(self) -> int | None:
        return self._last_id

    def _now(self) -> float:
        """The logged time of the next operation (what the chip's clock said then), else of the last one."""
        times = self._op_time
        for j in range(self._next, len(times)):
            if not math.isnan(times[j]):
                return float(times[j])
        for j in range(min(self._next, len(times)) - 1, -1, -1):
            if not math.isnan(times[j]):
                return float(times[j])
        return 0.0

    def _close(self) -> None:
        if self._own_reader:
            self._reader.close()


def _first_difference(logged: np.ndarray, asked: np.ndarray) -> str:
    if logged.size != asked.size:
        return f"(this request has {asked.size})"
    k = int(np.flatnonzero(logged != asked)[0])
    return f"(position {k}: logged address {int(logged[k])}, requested {int(asked[k])})"


def _program_difference(logged: PulseProgram, p: PulseProgram) -> str:
    if logged.program_id != p.program_id:
        return f"logged id {logged.program_id}"
    if logged.n_devices != p.n_devices or not np.array_equal(logged.addresses, p.addresses):
        if logged.n_devices != p.n_devices:
            return f"addresses differ ({logged.n_devices} logged, {p.n_devices} given)"
        k = int(np.flatnonzero(logged.addresses != p.addresses)[0])
        return (f"addresses differ (position {k}: logged device {int(logged.addresses[k])}, "
                f"given {int(p.addresses[k])})")
    if not np.array_equal(logged.set_counts, p.set_counts):
        k = int(np.flatnonzero(logged.set_counts != p.set_counts)[0])
        return (f"SET count of device {int(p.addresses[k])} is {int(p.set_counts[k])}, "
                f"logged {int(logged.set_counts[k])}")
    if not np.array_equal(logged.reset, p.reset):
        k = int(np.flatnonzero(logged.reset != p.reset)[0])
        return f"RESET of device {int(p.addresses[k])} is {bool(p.reset[k])}, logged {bool(logged.reset[k])}"
    if logged.shapes != p.shapes:
        return f"pulse shapes {p.shapes} differ from the logged {logged.shapes}"
    return ""
