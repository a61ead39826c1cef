"""Pulse-response statistics of a simulated chip and the device granularity derived from them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import PCMArray
from .params import PCMParams


@dataclass(frozen=True)
class PulseResponse:
    """Mean and standard deviation of noise-free G (uS) after 0..K SET pulses from RESET (index 0: after RESET)."""

    mean_us: np.ndarray
    std_us: np.ndarray
    n_devices: int

    @property
    def pulses(self) -> np.ndarray:
        return np.arange(self.mean_us.size)

    @property
    def granularity_us(self) -> float:
        """Mean conductance gained per SET pulse over the whole train from RESET (uS per pulse)."""
        return granularity_from_means(float(self.mean_us[0]), float(self.mean_us[-1]), self.mean_us.size - 1)


def granularity_from_means(mean_after_reset_us: float, mean_after_n_us: float, n_pulses: int) -> float:
    """Device granularity (uS per pulse): (mean G after n SET pulses from RESET - mean G after RESET) / n.

    The same definition serves a simulated chip and a measured one (calibration), so eps agrees.
    """
    if n_pulses < 1:
        raise ValueError(f"n_pulses must be at least 1, got {n_pulses}")
    return (mean_after_n_us - mean_after_reset_us) / n_pulses


def pulse_response(params: PCMParams | None = None, n_devices: int = 10_000, n_pulses: int = 20,
                   seed: int = 0, pulse_interval_s: float = 1e-6) -> PulseResponse:
    """Fabricate n_devices devices, RESET them, apply n_pulses SET pulses one at a time; summarize G (uS).

    Pulses are pulse_interval_s apart (s), shorter than the drift reference time, so no drift enters.
    """
    if n_pulses < 1 or n_devices < 2:
        raise ValueError(f"need n_pulses >= 1 and n_devices >= 2, got {n_pulses}, {n_devices}")
    chip = PCMArray(n_devices, params, seed=seed)
    addr = np.arange(n_devices)
    ones = np.ones(n_devices, np.int64)
    chip.reset(addr, 0.0)
    g = chip.conductance(addr, 0.0).astype(np.float64)
    means, stds = [g.mean()], [g.std()]
    t = 0.0
    for _ in range(n_pulses):
        t += pulse_interval_s
        chip.set_pulses(addr, ones, t)
        g = chip.conductance(addr, t).astype(np.float64)
        means.append(g.mean())
        stds.append(g.std())
    return PulseResponse(np.array(means), np.array(stds), n_devices)


def granularity_us(params: PCMParams | None = None, n_pulses: int = 20, n_devices: int = 10_000, seed: int = 0) -> float:
    """Device granularity (uS per SET pulse) of a simulated chip with these parameters; see granularity_from_means."""
    return pulse_response(params, n_devices, n_pulses, seed).granularity_us
