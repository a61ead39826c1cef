"""The data the driver contract speaks: geometry, pulse shapes, programs, read results."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from .errors import AddressError, ProgramError


_INT64 = np.dtype(np.int64)
_BOOL = np.dtype(np.bool_)
# Reductions called as ufunc methods: the same arithmetic as ndarray.max() etc., without their Python
# wrappers (every program and read of the training loop goes through these).
_min, _max, _sum, _any = np.minimum.reduce, np.maximum.reduce, np.add.reduce, np.logical_or.reduce
#: Arrays up to this many elements are checked and summed through Python lists (tolist + builtins), which on
#: a step's few devices cost a fraction of numpy's per-call overhead; the results are the same either way.
_SMALL = 64


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
        a = addresses if type(addresses) is np.ndarray else np.asarray(addresses)
        if a.ndim != 1:
            raise AddressError(f"addresses must be a 1-D array, got shape {a.shape}")
        if a.dtype is not _INT64:
            if a.size and a.dtype.kind not in "iu":  # numpy's integer kinds: what np.issubdtype(dt, np.integer) accepts
                raise AddressError(f"addresses must be integers, got dtype {a.dtype}")
            a = a.astype(np.int64, copy=False)
        n = a.size
        if not n:
            return a
        if n <= _SMALL:
            # A step's program and read-back address tens of devices: Python's sort and set beat numpy's per-call cost.
            values = a.tolist()
            lo, hi = min(values), max(values)
            self._check_range(lo, hi)
            if unique and len(set(values)) != n:
                s = sorted(values)
                dup = next(v for v, w in zip(s, s[1:]) if v == w)  # the smallest repeated one, as the sort below says
                raise AddressError(f"address {dup} appears more than once in one request")
            return a
        # One sort gives the range and the duplicates (this runs on every step's program and read).
        if unique:
            s = a.copy()
            s.sort()  # (np.sort is this behind a Python wrapper)
            self._check_range(int(s[0]), int(s[-1]))
            if _any(s[1:] == s[:-1]):
                dup = s[1:][s[1:] == s[:-1]][0]
                raise AddressError(f"address {int(dup)} appears more than once in one request")
        else:
            self._check_range(int(_min(a)), int(_max(a)))
        return a

    def _check_range(self, lo: int, hi: int) -> None:
        if lo < 0 or hi >= self.n_devices:
            raise AddressError(f"address {lo if lo < 0 else hi} is outside the {self.rows} x {self.cols} array "
                               f"(0 .. {self.n_devices - 1})")


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


def _frozen(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """a as a read-only array of dtype: a itself if it is one already, else a read-only copy."""
    if a.dtype is dtype or a.dtype == dtype:
        if not a.flags.writeable and a.flags.c_contiguous:
            return a
        out = a.copy()
    else:
        out = a.astype(dtype)
    out.flags.writeable = False
    return out


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
        pid = self.program_id
        if type(pid) is not int and (isinstance(pid, bool) or not isinstance(pid, (int, np.integer))) \
                or not 0 < int(pid) < 2**63:
            raise ProgramError(f"program_id must be an integer in 1 .. 2**63-1, got {pid!r}")
        if type(pid) is not int:
            object.__setattr__(self, "program_id", int(pid))
        addr, cnt, rst = self.addresses, self.set_counts, self.reset
        if type(addr) is not np.ndarray:
            addr = np.asarray(addr)
        if type(cnt) is not np.ndarray:
            cnt = np.asarray(cnt)
        if type(rst) is not np.ndarray:
            rst = np.asarray(rst)
        if addr.ndim != 1 or cnt.shape != addr.shape or rst.shape != addr.shape:
            raise ProgramError(f"addresses, set_counts and reset must be 1-D of one length, got shapes "
                               f"{addr.shape}, {cnt.shape}, {rst.shape}")
        # Integer dtypes are numpy's kinds "i" and "u" (what np.issubdtype(dt, np.integer) accepts).
        if addr.dtype is not _INT64 and addr.size and addr.dtype.kind not in "iu":
            raise ProgramError(f"addresses must be integers, got dtype {addr.dtype}")
        if cnt.dtype is not _INT64 and cnt.size and cnt.dtype.kind not in "iu":
            raise ProgramError(f"set_counts must be integers, got dtype {cnt.dtype}")
        if rst.size and rst.dtype != np.bool_:
            raise ProgramError(f"reset must be booleans, got dtype {rst.dtype}")
        # The program keeps read-only arrays of its own: drivers rely on a checked program staying as it
        # was checked (its read-back skips a second address check, its pulse totals are counted once).
        addr, cnt, rst = _frozen(addr, _INT64), _frozen(cnt, _INT64), _frozen(rst, _BOOL)
        n = addr.size
        # The pulse totals are counted here, once (the driver, the run log and the trainer's books all ask).
        if n == 0:
            lo = most = total = 0
        elif n <= _SMALL:
            values = cnt.tolist()
            lo, most, total = min(values), max(values), sum(values)
        else:
            lo, most, total = int(_min(cnt)), int(_max(cnt)), int(_sum(cnt))
        if lo < 0:
            i = int(np.argmin(cnt))
            raise ProgramError(f"negative SET count {int(cnt[i])} for device {int(addr[i])}")
        object.__setattr__(self, "addresses", addr)
        object.__setattr__(self, "set_counts", cnt)
        object.__setattr__(self, "reset", rst)
        d = self.__dict__
        d["set_pulses"], d["most_set_pulses"] = total, most
        d["reset_pulses"] = int(np.count_nonzero(rst)) if n else 0

    @property
    def n_devices(self) -> int:
        return int(self.addresses.size)

    # Counted in __post_init__ (the instance's values shadow these; they document the attributes).
    @cached_property
    def set_pulses(self) -> int:
        """Total SET pulses in the program."""
        return int(_sum(self.set_counts))

    @cached_property
    def most_set_pulses(self) -> int:
        """The largest SET count of any device in the program (0 for an empty one)."""
        return int(_max(self.set_counts)) if self.set_counts.size else 0

    @cached_property
    def reset_pulses(self) -> int:
        """Total RESET pulses in the program."""
        return int(np.count_nonzero(self.reset))


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
