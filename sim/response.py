"""Pulse-response statistics of a simulated chip: G after 1..K SET pulses from RESET."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import PCMArray
from .params import PCMParams


@dataclass(frozen=True)
class PulseResponse:
    """Mean and standard deviation of noise-free G (uS) after each of K SET pulses from RESET."""

    pulses: np.ndarray  # 1..K
    mean_us: np.ndarray
    std_us: np.ndarray
    n_devices: int


def pulse_response(params: PCMParams | None = None, n_devices: int = 10_000, n_pulses: int = 20,
                   seed: int = 0, pulse_interval_s: float = 1e-6) -> PulseResponse:
    """Fabricate n_devices fresh devices, apply n_pulses SET pulses one at a time, and summarize G (uS).

    Pulses are pulse_interval_s apart (s), shorter than the drift reference time, so no drift enters.
    """
    chip = PCMArray(n_devices, params, seed=seed)
    addr = np.arange(n_devices)
    ones = np.ones(n_devices, np.int64)
    t = 0.0
    means, stds = [], []
    for _ in range(n_pulses):
        t += pulse_interval_s
        chip.set_pulses(addr, ones, t)
        g = chip.conductance(addr, t).astype(np.float64)
        means.append(g.mean())
        stds.append(g.std())
    return PulseResponse(np.arange(1, n_pulses + 1), np.array(means), np.array(stds), n_devices)
