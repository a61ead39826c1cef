"""The emulated tester's state file: chip, clock, last applied program id, read voltage, lifetime counts.

One .npz (sim/files.py: atomic replacement, JSON header) that the emulator rewrites after every applied
program, before its reply leaves, and on shutdown; `pcm-hil emulator --state FILE` restores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim import PCMArray
from sim.files import npz_bytes, read_npz, write_atomic

from .errors import DriverError

STATE_FORMAT = "pcm-hil-emulator-state"
STATE_VERSION = 1
DEFAULT_READ_VOLTAGE_V = 0.2


@dataclass
class SavedState:
    """What the state file holds (lifetime: pulses per device, int64; t_s: the chip clock, s)."""

    chip: PCMArray
    t_s: float
    last_program_id: int | None
    lifetime: np.ndarray
    read_voltage_v: float


def save_state(path: Path, s: SavedState) -> None:
    """One .npz holding the chip (PCMArray.to_bytes), clock, last program id, lifetime counts; atomic."""
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "t_s": s.t_s, "last_program_id": s.last_program_id,
            "read_voltage_v": s.read_voltage_v}
    chip = np.frombuffer(s.chip.to_bytes(), np.uint8)
    write_atomic(path, npz_bytes(meta, {"chip": chip, "lifetime": np.asarray(s.lifetime, np.int64)}))


def load_state(path: Path) -> SavedState:
    try:
        meta, arrays = read_npz(path)
        chip = PCMArray.from_bytes(arrays["chip"].tobytes(), f"{path} (chip)")
        lifetime = np.asarray(arrays["lifetime"], np.int64)
    except Exception as e:  # any unreadable file is one clear error
        raise DriverError(f"{path} is not a readable emulator state file: {e}") from e
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise DriverError(f"{path} has format {meta.get('format')!r} version {meta.get('version')!r}, expected "
                          f"{STATE_FORMAT!r} version {STATE_VERSION}")
    if lifetime.shape != (chip.n_devices,):
        raise DriverError(f"{path}: lifetime counts for {lifetime.size} devices, chip has {chip.n_devices}")
    pid = meta.get("last_program_id")
    return SavedState(chip, float(meta["t_s"]), None if pid is None else int(pid), lifetime,
                  float(meta.get("read_voltage_v", DEFAULT_READ_VOLTAGE_V)))
