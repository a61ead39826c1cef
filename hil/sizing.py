"""Will a run fit in this machine's memory? Checked before any large array is allocated.

A mistyped size (`hidden = [100000, 100000]`, `mapping.row0 = 1e9`) should be one clear refusal,
not a MemoryError traceback after the run folder exists.
"""

from __future__ import annotations

from sim.platform_memory import available_memory_bytes

from .config import ConfigError

#: Host bytes per array device: conductance copy (f64), mapping inverse (i16 + i64 + i8), endurance ledger (i64),
#: and slack for the full-array read's temporaries.
HOST_BYTES_PER_DEVICE = 8 + 11 + 8 + 16
#: The in-process simulated chip (sim.PCMArray, 24 B/device) and its driver's ledger.
MOCK_BYTES_PER_DEVICE = 24 + 8
#: The same on the torch model (sim/torch_model.py, driver.device = "cpu": float64 state, 36 B/device).
TORCH_MOCK_BYTES_PER_DEVICE = 36 + 8
#: Host bytes per weight: weights, chi, net pulses, initial weights, and the optimizer's temporaries.
BYTES_PER_WEIGHT = 8 * 8
#: Addresses travel and are logged as uint32.
MAX_DEVICES = 2**32


def check_run_fits(n_devices: int, n_weights: int, *, simulated_chip: bool, what: str,
                   chip_bytes_per_device: int = MOCK_BYTES_PER_DEVICE) -> None:
    """ConfigError unless a run over n_devices array devices and n_weights weights fits in memory
    (chip_bytes_per_device: host bytes of a simulated chip per device, where simulated_chip)."""
    if n_devices > MAX_DEVICES:
        raise ConfigError(f"{what} needs {n_devices:,} devices; addresses are 32-bit, at most {MAX_DEVICES:,}")
    need = n_devices * (HOST_BYTES_PER_DEVICE + (chip_bytes_per_device if simulated_chip else 0))
    need += n_weights * BYTES_PER_WEIGHT
    have = available_memory_bytes()
    if have is not None and need > have:
        raise ConfigError(f"{what} needs about {need / 2**30:,.1f} GiB of memory ({n_devices:,} devices, "
                          f"{n_weights:,} weights); this machine has {have / 2**30:,.1f} GiB available. "
                          f"Check network.hidden and mapping.row0/col0")
