"""The driver contract: what the orchestrator and calibration code may ask of any array.

Vectorized: one call per read or program, never one call per device. Subclasses implement the
underscored methods; the public ones check input and safety first, so a refused program never
reaches the transport.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType

import numpy as np
import numpy.typing as npt

from .errors import DriverError
from .program import Block, Geometry, PulseProgram, ReadResult
from .safety import SafetyLimits

#: Capability name of a driver that does analog matrix-vector products on a block (mvm / mvm_t).
MVM = "mvm"
#: Capability name of a driver whose apply_and_read is one operation that also reports the driver clock as the
#: program started (so a run log need not ask the clock first): TesterDriver on a tester with PROG:APPL:READ?.
APPLY_READ = "apply-read"


class ArrayDriver(ABC):
    """A PCM array behind some link. Conductances in microsiemens, times in seconds."""

    def __init__(self, geometry: Geometry, limits: SafetyLimits | None = None) -> None:
        self._geometry = geometry
        self._limits = limits if limits is not None else SafetyLimits()
        # Pulses (SET + RESET) this driver knows each device has had: the endurance budget's ledger.
        self._lifetime_pulses = np.zeros(geometry.n_devices, np.int64)
        self._closed = False
        # The last program check_program passed and its devices' ledger totals once applied: applying it
        # stores those totals, and reading its addresses back needs no second check (a PulseProgram's
        # arrays are read-only).
        self._checked_program: PulseProgram | None = None
        self._checked_after: npt.NDArray[np.integer] | None = None
        self._checked_addresses: npt.NDArray[np.int64] | None = None

    # ------------------------------------------------------------------ description
    @property
    def geometry(self) -> Geometry:
        return self._geometry

    @property
    def limits(self) -> SafetyLimits:
        return self._limits

    def narrow_limits(self, limits: SafetyLimits) -> None:
        """Enforce the strictest of the limits in force and limits from now on (never widens them)."""
        self._limits = self._limits.intersect(limits)

    @property
    @abstractmethod
    def identity(self) -> str:
        """What the instrument says it is (`*IDN?`)."""

    @property
    def capabilities(self) -> frozenset[str]:
        """Optional capabilities this driver declares, e.g. {MVM}."""
        return frozenset()

    @property
    def lifetime_pulses(self) -> npt.NDArray[np.int64]:
        """Pulses (SET + RESET) each device has had as far as this driver knows (read-only view)."""
        v = self._lifetime_pulses.view()
        v.flags.writeable = False
        return v

    # ------------------------------------------------------------------ the contract
    def read(self, addresses: npt.ArrayLike | None = None) -> ReadResult:
        """Read conductances (uS, float32) of addresses, or of the whole array in address order."""
        self._check_open()
        if addresses is None:
            return self._read(np.arange(self._geometry.n_devices, dtype=np.int64), whole=True)
        if addresses is self._checked_addresses:
            return self._read(addresses, whole=False)
        return self._read(self._geometry.check_addresses(addresses), whole=False)

    def apply(self, program: PulseProgram) -> None:
        """Apply one program exactly once; checked against the safety limits before anything is sent."""
        self.check_program(program)
        self._apply_checked(program)

    def apply_and_read(self, program: PulseProgram) -> ReadResult:
        """apply(program), then read(program.addresses): the conductances (uS) right after the program.

        Every driver has it; one whose link has a combined command (TesterDriver with PROG:APPL:READ?) does
        both in one round trip, exactly once as apply() is. A refused program sends nothing and reads nothing.
        """
        self.check_program(program)
        return self._apply_and_read_checked(program)[1]

    def _apply_and_read_checked(self, program: PulseProgram) -> tuple[float | None, ReadResult]:
        """apply_and_read of a program check_program() passed: (the driver clock, s, as the program started when
        the driver learns it from the same reply, else None; the read-back). Wrappers call it on the driver
        they wrap; drivers with a combined command override it (and book the ledger with _book_pulses)."""
        self._apply_checked(program)
        return None, self.read(program.addresses)

    def check_program(self, program: PulseProgram) -> None:
        """Raise the error apply() would raise for program (addresses, safety limits, pulse budget); send nothing."""
        self._check_open()
        self._geometry.check_addresses(program.addresses)
        after = self._limits.check_program(program, self._geometry, self._lifetime_pulses)
        self._checked_program, self._checked_after = program, after
        self._checked_addresses = program.addresses

    def _apply_checked(self, program: PulseProgram) -> None:
        """Apply a program that check_program() passed and count its pulses in the endurance ledger.

        Wrappers (LoggedDriver) call this on the driver they wrap, so a program is checked once.
        """
        self._apply(program)
        self._book_pulses(program)

    def _book_pulses(self, program: PulseProgram) -> None:
        """Count an applied program's pulses in the endurance ledger."""
        if program is self._checked_program and self._checked_after is not None:
            # The check summed ledger and program already; nothing touched the ledger since.
            self._lifetime_pulses[program.addresses] = self._checked_after
            self._checked_program = self._checked_after = None
            return
        # Addresses are unique (checked), so a fancy-index add counts each once.
        pulses = program.set_counts + program.reset if program.reset_pulses else program.set_counts
        self._lifetime_pulses[program.addresses] += pulses

    def last_program_id(self) -> int | None:
        """Id of the last program the array applied (None if none since it was made)."""
        self._check_open()
        return self._last_program_id()

    def now(self) -> float:
        """The driver's clock, seconds."""
        self._check_open()
        return self._now()

    def mvm(self, block: Block, x: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """Analog forward product on block: y[b, c] = sum_r x[b, r] * G[row0+r, col0+c].

        x in volts (batch, block.rows); y in microamps (batch, block.cols). Only with capability MVM.
        """
        raise DriverError(f"{type(self).__name__} has no analog multiply (capability {MVM!r})")

    def mvm_t(self, block: Block, d: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """Analog transpose product on block: z[b, r] = sum_c d[b, c] * G[row0+r, col0+c] (V in, uA out)."""
        raise DriverError(f"{type(self).__name__} has no analog multiply (capability {MVM!r})")

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> ArrayDriver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise DriverError(f"{type(self).__name__} is closed")

    # ------------------------------------------------------------------ for subclasses
    @abstractmethod
    def _read(self, addresses: npt.NDArray[np.int64], whole: bool) -> ReadResult: ...

    @abstractmethod
    def _apply(self, program: PulseProgram) -> None: ...

    @abstractmethod
    def _last_program_id(self) -> int | None: ...

    @abstractmethod
    def _now(self) -> float: ...

    def _close(self) -> None:
        pass
