"""MockDriver: an in-process array backed by the behavioral PCM model (sim/).

Its clock is simulated: every operation advances it by a configurable duration, so drift acts on
the chip's own timeline and a run is reproducible whatever the host machine's speed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from sim import PCMArray, PCMParams
from sim.model import read_state_bytes

from .base import MVM, ArrayDriver
from .errors import DriverError
from .program import Block, Geometry, PulseProgram, ReadResult
from .safety import SafetyLimits


_MVM_ONLY, _NONE = frozenset({MVM}), frozenset()


class MockTiming(BaseModel):
    """How long each operation takes on the simulated clock (s)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    command_overhead_s: float = Field(1e-4, ge=0, description="Fixed cost of any read or program, s.")
    read_per_device_s: float = Field(1e-7, ge=0, description="Read time per device read, s.")
    pulse_gap_ns: float = Field(100.0, ge=0, description="Dead time after each pulse, ns.")
    mvm_s: float = Field(1e-6, ge=0, description="Time of one analog matrix-vector product, s.")


class MockDriver(ArrayDriver):
    """A simulated PCM chip of rows x cols devices behind the driver contract."""

    def __init__(self, rows: int, cols: int, *, params: PCMParams | None = None, seed: int = 0,
                 limits: SafetyLimits | None = None, timing: MockTiming | None = None,
                 analog_mvm: bool = False, chip: Any = None, device: str | None = None) -> None:
        """Make a fresh chip (seeded), or wrap an existing PCMArray (or TorchPCMArray) of rows*cols devices.

        device: None for the numpy model (sim.PCMArray), "cpu" or "cuda" for the torch one (sim/torch_model.py,
        the config's driver.device); DriverError in one line where torch lacks that device.
        """
        geometry = Geometry(rows, cols)
        super().__init__(geometry, limits)
        if chip is not None and chip.n_devices != geometry.n_devices:
            raise ValueError(f"chip has {chip.n_devices} devices, geometry {rows} x {cols} needs {geometry.n_devices}")
        if chip is None:
            chip = PCMArray(geometry.n_devices, params, seed=seed) if device is None else \
                _torch_chip(lambda m: m.TorchPCMArray(geometry.n_devices, params, seed=seed, device=device),
                            f'driver.device = "{device}"')
        self.chip = chip
        self.timing = timing if timing is not None else MockTiming()
        self._t = self.chip.now
        self._last_id: int | None = None
        self._analog_mvm = analog_mvm
        self._seed = seed
        self._pulse_ns: tuple = (None, None)

    @classmethod
    def from_state(cls, path: str | Path, rows: int, cols: int, **kwargs) -> MockDriver:
        """Wrap a chip saved with PCMArray.save or TorchPCMArray.save (its geometry must be rows x cols); the
        file says which model it holds, and a torch chip comes back on the device type it was saved on."""
        return cls(rows, cols, chip=load_chip(path), **kwargs)

    def restore_lifetime_pulses(self, addresses: npt.ArrayLike, counts: npt.ArrayLike) -> None:
        """Set the endurance ledger (pulses per device, SET + RESET) of addresses: a resumed run's restored chip
        gets its checkpoint's counts back, so the lifetime budget is checked against every pulse sent."""
        a = np.asarray(addresses, np.int64)
        c = np.asarray(counts, np.int64)
        if a.shape != c.shape or (a.size and (a.min() < 0 or a.max() >= self.geometry.n_devices)) or (c < 0).any():
            raise ValueError(f"lifetime counts: {c.size} counts for {a.size} addresses of a "
                             f"{self.geometry.n_devices}-device chip")
        self._lifetime_pulses[a] = c

    @property
    def identity(self) -> str:
        g = self.geometry
        backend = getattr(self.chip, "backend", None)  # the torch model's; the numpy model's identity is unchanged
        return f"pcm-hil,MockDriver,{g.rows}x{g.cols},seed={self._seed}" + (f",model={backend}" if backend else "")

    @property
    def capabilities(self) -> frozenset[str]:
        return _MVM_ONLY if self._analog_mvm else _NONE

    def advance(self, seconds: float) -> None:
        """Let simulated time pass (s), e.g. to study drift between operations."""
        if not seconds >= 0:
            raise ValueError(f"cannot advance the clock by {seconds} s")
        self._t += seconds

    def _read(self, addresses: npt.NDArray[np.int64], whole: bool) -> ReadResult:
        t = self._t
        g = self.chip.read(None if whole else addresses, t, validate=False)  # ArrayDriver.read checked them
        self._t += self.timing.command_overhead_s + addresses.size * self.timing.read_per_device_s
        return ReadResult(addresses, g, t)

    def _apply_and_read_checked(self, program: PulseProgram) -> tuple[float | None, ReadResult]:
        """apply then read of a checked program's devices, as ArrayDriver's (its addresses were checked with it);
        on the numpy chip model in one call (PCMArray.apply_and_read: the same state and read-back)."""
        both = getattr(self.chip, "apply_and_read", None)
        if both is None:
            self._apply_checked(program)
            return None, self._read(program.addresses, whole=False)
        t = self._t
        t_read = t + self._program_seconds(program)
        addr = program.addresses
        g = both(addr, program.set_counts, program.reset, t, t_read, has_reset=program.reset_pulses > 0)
        self._last_id = program.program_id
        self._book_pulses(program)
        self._t = t_read + (self.timing.command_overhead_s + addr.size * self.timing.read_per_device_s)
        return None, ReadResult(addr, g, t_read)

    def _apply(self, program: PulseProgram) -> None:
        t = self._t
        # ArrayDriver.check_program validated the program; the chip need not check it again (nor count its
        # RESET flags: the program counted them).
        self.chip.apply(program.addresses, program.set_counts, program.reset, t, validate=False,
                        has_reset=program.reset_pulses > 0)
        self._t += self._program_seconds(program)
        self._last_id = program.program_id

    def _program_seconds(self, program: PulseProgram) -> float:
        """How long program takes on the simulated clock (s): the fixed overhead and every pulse with its gap."""
        s, timing = program.shapes, self.timing
        if s is not self._pulse_ns[0] or timing is not self._pulse_ns[1]:
            # Per (frozen) shapes and timing: each pulse's width plus the gap, ns, and the fixed overhead, s.
            gap = timing.pulse_gap_ns
            self._pulse_ns = (s, timing, s.set.width_ns + gap, s.reset.width_ns + gap, timing.command_overhead_s)
        _, _, set_ns, reset_ns, overhead_s = self._pulse_ns
        busy_ns = program.set_pulses * set_ns + program.reset_pulses * reset_ns
        return overhead_s + busy_ns * 1e-9

    def _last_program_id(self) -> int | None:
        return self._last_id

    def _now(self) -> float:
        return self._t

    def _block_conductances(self, block: Block) -> npt.NDArray[np.float32]:
        g = self.geometry
        if block.row0 < 0 or block.col0 < 0 or block.row0 + block.rows > g.rows or block.col0 + block.cols > g.cols:
            raise ValueError(f"{block} does not fit the {g.rows} x {g.cols} array")
        rows = np.arange(block.row0, block.row0 + block.rows)[:, None]
        cols = np.arange(block.col0, block.col0 + block.cols)[None, :]
        addr = (rows * g.cols + cols).ravel()
        t = self._t
        self._t += self.timing.command_overhead_s + self.timing.mvm_s
        # One read-noise draw per device per product, as an analog array would see it.
        return self.chip.read(addr, t).reshape(block.rows, block.cols)

    def mvm(self, block: Block, x: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """Analog forward product (V in, uA out), see ArrayDriver.mvm."""
        self._check_open()
        if not self._analog_mvm:
            return super().mvm(block, x)
        return np.asarray(x, np.float64) @ self._block_conductances(block).astype(np.float64)

    def mvm_t(self, block: Block, d: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """Analog transpose product (V in, uA out), see ArrayDriver.mvm_t."""
        self._check_open()
        if not self._analog_mvm:
            return super().mvm_t(block, d)
        return np.asarray(d, np.float64) @ self._block_conductances(block).astype(np.float64).T


def load_chip(path: str | Path) -> Any:
    """The chip saved at path: a PCMArray, or a TorchPCMArray when the file holds the torch model's state."""
    data = read_state_bytes(path)
    if _state_format(data) == "pcm-hil-sim-torch-state":
        return _torch_chip(lambda m: m.TorchPCMArray.from_bytes(data, str(path)), f"the chip saved at {path}")
    return PCMArray.from_bytes(data, str(path))


def _state_format(data: bytes) -> Any:
    """The format named in a chip state's JSON header (only that member is read), or None if unreadable."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return json.loads(bytes(z["meta"]).decode()).get("format")
    except Exception:  # noqa: BLE001 - anything unreadable is left to PCMArray.from_bytes to name
        return None


def _torch_chip(make: Any, what: str) -> Any:
    """make(sim.torch_model), imported only here: the numpy path never loads torch. DriverError in one line,
    naming what asked for the device, where it is missing."""
    from sim import torch_model

    try:
        return make(torch_model)
    except torch_model.DeviceUnavailable as e:
        raise DriverError(f"{what}: {e}") from None
