"""The results of a calibration fit: estimates with standard errors, and what each part of the fit found."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


class CalibrationWarning(UserWarning):
    """A fit was made but something limits it (censored data, bound not reached, ...)."""


@dataclass(frozen=True)
class Estimate:
    """A fitted value and its standard error (same unit)."""

    value: float
    se: float


@dataclass(frozen=True)
class Bounds:
    """Conductance bounds (uS); reached: reads pile up exactly at the bound (the chip clips there)."""

    g_min: float
    g_max: float
    min_reached: bool
    max_reached: bool

    def clipped(self, g: np.ndarray) -> np.ndarray:
        """True where a read sits at a bound the chip clips at."""
        out = np.zeros(g.shape, np.bool_)
        if self.min_reached:
            out |= g <= self.g_min
        if self.max_reached:
            out |= g >= self.g_max
        return out


@dataclass(frozen=True)
class ReadNoiseFit:
    rel: Estimate
    abs_us: Estimate
    device_mean_us: FloatArray  # per device used: mean of its repeated reads
    device_std_us: FloatArray  # and their sample standard deviation

    def sd(self, g: np.ndarray | float) -> np.ndarray:
        """Read-noise standard deviation (uS) at conductance g (uS)."""
        return self.rel.value * np.asarray(g, np.float64) + self.abs_us.value


@dataclass(frozen=True)
class IncrementFit:
    """mu = f (m1 G + c1 + A1 P), sigma = m2 G + c2 + A2 P, P = exp(-n / a); f ~ N(1, d2d^2)."""

    m1: Estimate
    c1: Estimate
    a1: Estimate
    history: Estimate
    m2: Estimate
    c2: Estimate
    a2: Estimate
    d2d: Estimate
    rows_used: int  # increments used (neither read at a bound)


@dataclass(frozen=True)
class DriftFit:
    t0: Estimate
    nu_mean: Estimate
    nu_std: Estimate
    devices_used: int
    g0_us: FloatArray  # per device used: fitted programmed conductance
    nu: FloatArray  # per device used: fitted drift exponent
    levels: npt.NDArray[np.int64]  # per device used
    tau_s: FloatArray  # read times after programming, s (T,)
    reads_us: FloatArray  # reads of the devices used (T, M)
