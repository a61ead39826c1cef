"""The data the driver contract speaks: geometry, pulse shapes, programs, read results."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from .errors import AddressError, ProgramError


@dataclass(frozen=True)
class Geometry:
    """Array size; a device's flat address is row * cols + col."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.rows <= 0 or self.cols <= 0:
            raise ValueError(f"geometry needs positive rows and cols, got {self.rows} x {self.cols}")

    @property
    def n_devices(self) -> int:
        return self.rows * self.cols

    def check_addresses(self, addresses: npt.ArrayLike, *, unique: bool = True) -> npt.NDArray[np.int64]:
        """Return addresses as int64 after checking they are 1-D integers inside the array (and unique)."""
        a = np.asarray(addresses)
        if a.ndim != 1:
            raise AddressError(f"addresses must be a 1-D array, got shape {a.shape}")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise AddressError(f"addresses must be integers, got dtype {a.dtype}")
        a = a.astype(np.int64, copy=False)
        if a.size:
            # One sort gives the range and the duplicates (this runs on every step's program and read).
            s = np.sort(a) if unique else a
            lo, hi = (int(s[0]), int(s[-1])) if unique else (int(a.min()), int(a.max()))
            if lo < 0 or hi >= self.n_devices:
                raise AddressError(f"address {lo if lo < 0 else hi} is outside the {self.rows} x {self.cols} array "
                                   f"(0 .. {self.n_devices - 1})")
            if unique and a.size > 1 and (s[1:] == s[:-1]).any():
                dup = s[1:][s[1:] == s[:-1]][0]
                raise AddressError(f"address {int(dup)} appears more than once in one request")
        return a


class PulseShape(BaseModel):
    """One pulse: amplitude in microamps (the tester drives current), width in nanoseconds."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    amplitude_ua: float = Field(gt=0)
    width_ns: float = Field(gt=0)


class PulseShapes(BaseModel):
    """SET and RESET pulse shapes of a program (project defaults, typical of 90 nm doped-GST cells)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    set: PulseShape = PulseShape(amplitude_ua=100.0, width_ns=50.0)
    reset: PulseShape = PulseShape(amplitude_ua=450.0, width_ns=50.0)


@dataclass(frozen=True, eq=False)
class PulseProgram:
    """What one apply() sends: per addressed device a SET pulse count and/or a RESET (RESET first).

    program_id is a positive integer unique within a run; the tester remembers the last one it
    applied, which is how a program is applied exactly once across a dropped link.
    """

    program_id: int
    addresses: npt.NDArray[np.int64]
    set_counts: npt.NDArray[np.int64]
    reset: npt.NDArray[np.bool_]
    shapes: PulseShapes = field(default_factory=PulseShapes)

    def __post_init__(self) -> None:
        if isinstance(self.program_id, bool) or not isinstance(self.program_id, (int, np.integer)) \
                or not 0 < int(self.program_id) < 2**63:
            raise ProgramError(f"program_id must be an integer in 1 .. 2**63-1, got {self.program_id!r}")
        addr = np.asarray(self.addresses)
        cnt = np.asarray(self.set_counts)
        rst = np.asarray(self.reset)
        if addr.ndim != 1 or cnt.shape != addr.shape or rst.shape != addr.shape:
            raise ProgramError(f"addresses, set_counts and reset must be 1-D of one length, got shapes "
                               f"{addr.shape}, {cnt.shape}, {rst.shape}")
        if addr.size and not np.issubdtype(addr.dtype, np.integer):
            raise ProgramError(f"addresses must be integers, got dtype {addr.dtype}")
        if cnt.size and not np.issubdtype(cnt.dtype, np.integer):
            raise ProgramError(f"set_counts must be integers, got dtype {cnt.dtype}")
        if rst.size and rst.dtype != np.bool_:
            raise ProgramError(f"reset must be booleans, got dtype {rst.dtype}")
        if cnt.size and cnt.min() < 0:
            i = int(np.argmin(cnt))
            raise ProgramError(f"negative SET count {int(cnt[i])} for device {int(addr[i])}")
        object.__setattr__(self, "program_id", int(self.program_id))
        object.__setattr__(self, "addresses", addr.astype(np.int64, copy=False))
        object.__setattr__(self, "set_counts", cnt.astype(np.int64, copy=False))
        object.__setattr__(self, "reset", rst.astype(np.bool_, copy=False))

    @property
    def n_devices(self) -> int:
        return int(self.addresses.size)

    @property
    def set_pulses(self) -> int:
        """Total SET pulses in the program."""
        return int(self.set_counts.sum())

    @property
    def reset_pulses(self) -> int:
        """Total RESET pulses in the program."""
        return int(self.reset.sum())


@dataclass(frozen=True, eq=False)
class ReadResult:
    """Conductances (microsiemens, float32) of the requested addresses, and when they were read.

    t_s is the read's time on the driver's clock in seconds (the simulated clock for a mock chip,
    the tester's clock for a real one).
    """

    addresses: npt.NDArray[np.int64]
    conductances_us: npt.NDArray[np.float32]
    t_s: float


@dataclass(frozen=True)
class Block:
    """A rectangle of the array used as one analog matrix: rows row0..row0+rows-1, cols likewise."""

    row0: int
    rows: int
    col0: int
    cols: int
