"""Safety limits, checked against every program before the first byte leaves the host."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing import Self

from .errors import SafetyViolation
from .program import _SMALL, Geometry, PulseProgram, PulseShape, PulseShapes


class Range(BaseModel):
    """Closed interval [min, max]."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min > self.max:
            raise ValueError(f"range min {self.min} exceeds max {self.max}")
        return self

    def __contains__(self, x: float) -> bool:
        return self.min <= x <= self.max


#: check_program's memo, by id(limits): (those limits, {(has RESET pulses, has SET pulses): the last PulseShapes
#: found within their ranges}). Both are referenced here, so an identity match is never a recycled id.
_SHAPES_OK: dict[int, tuple[SafetyLimits, dict[tuple[bool, bool], PulseShapes]]] = {}

_RANGES = ("set_amplitude_ua", "set_width_ns", "reset_amplitude_ua", "reset_width_ns")


class SafetyLimits(BaseModel):
    """What a program may do to the chip. Defaults are conservative for 90 nm doped-GST cells."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    set_amplitude_ua: Range = Field(Range(min=10, max=200), description="Allowed SET pulse amplitude, uA.")
    set_width_ns: Range = Field(Range(min=10, max=1000), description="Allowed SET pulse width, ns.")
    reset_amplitude_ua: Range = Field(Range(min=100, max=700), description="Allowed RESET pulse amplitude, uA.")
    reset_width_ns: Range = Field(Range(min=10, max=1000), description="Allowed RESET pulse width, ns.")
    max_set_pulses_per_device: int = Field(64, ge=1, description="Most SET pulses one device may get in one program.")
    max_devices_per_program: int = Field(1 << 20, ge=1, description="Most devices one program may address.")
    lifetime_pulse_budget: int = Field(10**8, ge=1, description="Most pulses (SET + RESET) a device may get in its life (endurance).")
    address_min: int = Field(0, ge=0, description="Lowest address programs may touch.")
    address_max: int | None = Field(None, ge=0, description="Highest address programs may touch; None: the last device of the array.")

    def intersect(self, other: SafetyLimits) -> SafetyLimits:
        """The strictest of both, field by field: never wider than either.

        Raises SafetyViolation if a range of one lies wholly outside the other's (nothing would be allowed).
        """
        ranges = {}
        for name in _RANGES:
            a, b = getattr(self, name), getattr(other, name)
            lo, hi = max(a.min, b.min), min(a.max, b.max)
            if lo > hi:
                raise SafetyViolation(name, f"the limits [{a.min}, {a.max}] and [{b.min}, {b.max}] do not overlap")
            ranges[name] = Range(min=lo, max=hi)
        his = [x for x in (self.address_max, other.address_max) if x is not None]
        return SafetyLimits(
            **ranges,
            max_set_pulses_per_device=min(self.max_set_pulses_per_device, other.max_set_pulses_per_device),
            max_devices_per_program=min(self.max_devices_per_program, other.max_devices_per_program),
            lifetime_pulse_budget=min(self.lifetime_pulse_budget, other.lifetime_pulse_budget),
            address_min=max(self.address_min, other.address_min),
            address_max=min(his) if his else None,
        )

    def wider_than(self, other: SafetyLimits) -> list[str]:
        """The limits of self that allow more than other's, as 'field: self vs other' lines (empty: none)."""
        out = []
        for name in _RANGES:
            a, b = getattr(self, name), getattr(other, name)
            if a.min < b.min:
                out.append(f"{name}.min = {a.min:g} is below {b.min:g}")
            if a.max > b.max:
                out.append(f"{name}.max = {a.max:g} is above {b.max:g}")
        for name in ("max_set_pulses_per_device", "max_devices_per_program", "lifetime_pulse_budget"):
            a, b = getattr(self, name), getattr(other, name)
            if a > b:
                out.append(f"{name} = {a} is above {b}")
        if self.address_min < other.address_min:
            out.append(f"address_min = {self.address_min} is below {other.address_min}")
        if other.address_max is not None and (self.address_max is None or self.address_max > other.address_max):
            out.append(f"address_max = {self.address_max} is above {other.address_max}")
        return out

    def check_shape(self, name: str, shape: PulseShape, amplitude: Range, width: Range) -> None:
        if shape.amplitude_ua not in amplitude:
            raise SafetyViolation(f"{name}_amplitude_ua", f"amplitude {shape.amplitude_ua} uA is outside "
                                  f"[{amplitude.min}, {amplitude.max}] uA")
        if shape.width_ns not in width:
            raise SafetyViolation(f"{name}_width_ns", f"width {shape.width_ns} ns is outside [{width.min}, {width.max}] ns")

    def check_program(self, program: PulseProgram, geometry: Geometry,
                      lifetime_pulses: npt.NDArray[np.integer] | None = None) -> npt.NDArray[np.integer] | None:
        """Raise SafetyViolation naming the limit (and the first offending device) if program breaks one.

        lifetime_pulses: pulses each device has had so far (indexed by address), for the endurance budget.
        The addresses must already have passed geometry.check_addresses (ArrayDriver.check_program does both).
        Returns, when lifetime_pulses is given, the pulses each addressed device will have had once the
        program is applied (in program order; None otherwise).
        """
        p = program
        n = p.n_devices
        has_reset = p.reset_pulses > 0  # counted once per program: the driver asks for it too
        # Counts are non-negative (PulseProgram checks), so any SET pulse means a positive maximum.
        most_sets = p.most_set_pulses
        # Limits and shapes are frozen: shapes once found within these limits' ranges stay so.
        kinds = (has_reset, most_sets > 0)
        memo = _SHAPES_OK.get(id(self))
        if memo is None or memo[0] is not self or memo[1].get(kinds) is not p.shapes:
            if has_reset:
                self.check_shape("reset", p.shapes.reset, self.reset_amplitude_ua, self.reset_width_ns)
            if most_sets > 0:
                self.check_shape("set", p.shapes.set, self.set_amplitude_ua, self.set_width_ns)
            if memo is None or memo[0] is not self:
                if len(_SHAPES_OK) >= 64:
                    _SHAPES_OK.clear()
                memo = _SHAPES_OK[id(self)] = (self, {})
            memo[1][kinds] = p.shapes
        if n > self.max_devices_per_program:
            raise SafetyViolation("max_devices_per_program",
                                  f"{n} devices addressed, at most {self.max_devices_per_program} allowed")
        if n == 0:
            return None if lifetime_pulses is None else np.zeros(0, np.int64)
        # Each check is one reduction on the good path; the offender is looked up only on failure.
        hi = geometry.n_devices - 1 if self.address_max is None else min(self.address_max, geometry.n_devices - 1)
        if self.address_min > 0 or hi < geometry.n_devices - 1:
            outside = (p.addresses < self.address_min) | (p.addresses > hi)
            if outside.any():
                raise SafetyViolation("address range", f"address outside the allowed range {self.address_min} .. {hi}",
                                      int(p.addresses[np.argmax(outside)]))
        if most_sets > self.max_set_pulses_per_device:
            i = int(np.argmax(p.set_counts > self.max_set_pulses_per_device))
            raise SafetyViolation("max_set_pulses_per_device",
                                  f"{int(p.set_counts[i])} SET pulses, at most {self.max_set_pulses_per_device} allowed",
                                  int(p.addresses[i]))
        if lifetime_pulses is not None:
            after = lifetime_pulses[p.addresses] + p.set_counts
            if has_reset:
                after += p.reset
            most_after = max(after.tolist()) if n <= _SMALL else np.maximum.reduce(after)
            if most_after > self.lifetime_pulse_budget:
                i = int(np.argmax(after > self.lifetime_pulse_budget))
                raise SafetyViolation("lifetime_pulse_budget",
                                      f"the program would bring the device to {int(after[i])} pulses, "
                                      f"budget {self.lifetime_pulse_budget}", int(p.addresses[i]))
            return after
        return None
