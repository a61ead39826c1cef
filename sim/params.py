"""Parameters of the behavioral PCM model (Nandakumar et al., J. Appl. Phys. 124, 152135, 2018).

Conductances are in microsiemens (uS), times in seconds. Every field names its unit and its source.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

_JAP2018 = "Nandakumar et al., J. Appl. Phys. 124, 152135 (2018), as fitted in public re-implementations"


class PCMParams(BaseModel):
    """Statistical PCM device model: SET increments, RESET, drift, read noise, variability."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # Conductance range of a device.
    g_min_us: float = Field(0.1, description="Lowest conductance a device reaches, uS. Source: pcm-hil issue 2 default.")
    g_max_us: float = Field(20.0, description="Highest conductance a device reaches, uS. Source: pcm-hil issue 2 default.")

    # SET increment dG ~ N(mu, sigma^2); mu = m1*G + c1 + A1*P, sigma = m2*G + c2 + A2*P, P = exp(-n/a).
    set_mean_slope: float = Field(-0.084, description="m1, slope of the mean increment against G, uS per uS. Source: " + _JAP2018)
    set_mean_offset_us: float = Field(0.880, description="c1, mean increment at G = 0 for late pulses, uS. Source: " + _JAP2018)
    set_mean_history_us: float = Field(1.40, description="A1, extra mean increment of early pulses after RESET, uS. Source: " + _JAP2018)
    set_std_slope: float = Field(0.091, description="m2, slope of the increment's standard deviation against G, uS per uS. Source: " + _JAP2018)
    set_std_offset_us: float = Field(0.260, description="c2, increment standard deviation at G = 0 for late pulses, uS. Source: " + _JAP2018)
    set_std_history_us: float = Field(2.15, description="A2, extra increment standard deviation of early pulses after RESET, uS. Source: " + _JAP2018)
    history_pulses: float = Field(2.6, gt=0, description="a, decay constant of the pulse-history term P = exp(-n/a), pulses. Source: " + _JAP2018)

    # RESET.
    reset_mean_us: float = Field(0.1, description="Mean conductance right after RESET, uS; draws are clipped to [g_min_us, g_max_us], so with the defaults half the devices sit at g_min_us. Source: pcm-hil issue 2.")
    reset_std_us: float = Field(0.01, ge=0, description="Standard deviation of the conductance after RESET, uS. Source: pcm-hil issue 2.")

    # Drift G(t) = G(t_p) * ((t - t_p) / t0)^(-nu), for t - t_p > t0.
    drift_t0_s: float = Field(38.6, gt=0, description="t0, reference time of the drift law after programming, s. Source: " + _JAP2018)
    drift_nu_mean: float = Field(0.04, ge=0, description="Mean drift exponent nu, dimensionless. Source: pcm-hil issue 2.")
    drift_nu_std: float = Field(0.01, ge=0, description="Device-to-device standard deviation of nu (0 allowed); nu is clipped at 0. Source: pcm-hil project default.")

    # Read noise G_read = G + N(0, (rel * G + abs)^2).
    read_noise_rel: float = Field(0.03, ge=0, description="Read-noise standard deviation per uS of conductance, dimensionless. Source: pcm-hil issue 2.")
    read_noise_abs_us: float = Field(0.13, ge=0, description="Read-noise standard deviation at G = 0, uS. Source: pcm-hil issue 2.")

    # Device-to-device variability.
    d2d_update_spread: float = Field(0.05, ge=0, lt=0.5, description="Relative standard deviation of the per-device factor on the mean SET increment, drawn once at fabrication; dimensionless. Source: pcm-hil project default ('a few percent').")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not 0 <= self.g_min_us < self.g_max_us:
            raise ValueError(f"need 0 <= g_min_us < g_max_us, got g_min_us={self.g_min_us}, g_max_us={self.g_max_us}")
        if not self.g_min_us <= self.reset_mean_us <= self.g_max_us:
            raise ValueError(f"reset_mean_us={self.reset_mean_us} lies outside [g_min_us, g_max_us]=[{self.g_min_us}, {self.g_max_us}]")
        # sigma is linear in G and in P in (0, exp(-1/a)]; its minimum over that box is at a corner.
        p_max = math.exp(-1.0 / self.history_pulses)
        for g in (self.g_min_us, self.g_max_us):
            for p in (0.0, p_max):
                sigma = self.set_std_slope * g + self.set_std_offset_us + self.set_std_history_us * p
                if sigma < 0:
                    raise ValueError(
                        f"SET increment standard deviation would be negative ({sigma:.4g} uS) at G={g} uS, P={p:.3g}: "
                        "check set_std_slope, set_std_offset_us, set_std_history_us"
                    )
        return self

    def mean_increment_us(self, g_us: float, pulse_number: int) -> float:
        """Mean SET increment (uS) of the pulse_number-th pulse since RESET at conductance g_us, before the device factor."""
        p = math.exp(-pulse_number / self.history_pulses)
        return self.set_mean_slope * g_us + self.set_mean_offset_us + self.set_mean_history_us * p

    def std_increment_us(self, g_us: float, pulse_number: int) -> float:
        """Standard deviation (uS) of the pulse_number-th SET increment since RESET at conductance g_us."""
        p = math.exp(-pulse_number / self.history_pulses)
        return self.set_std_slope * g_us + self.set_std_offset_us + self.set_std_history_us * p

    @classmethod
    def from_toml(cls, path: str | Path) -> PCMParams:
        """Load parameters from a TOML file: top-level keys, or a [pcm] table (calibration writes the latter)."""
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
        table = data.get("pcm", data)
        return cls.model_validate(table)
