"""SafetyLimits.intersect / wider_than: the limits in force are never wider than any source."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from drivers import Range, SafetyLimits, SafetyViolation


def _limits(draw: st.DrawFn) -> SafetyLimits:
    def rng(lo: float, hi: float) -> Range:
        a, b = sorted((draw(st.floats(lo, hi)), draw(st.floats(lo, hi))))
        return Range(min=a, max=b)

    return SafetyLimits(set_amplitude_ua=rng(1, 1000), set_width_ns=rng(1, 5000), reset_amplitude_ua=rng(1, 1000),
                        reset_width_ns=rng(1, 5000), max_set_pulses_per_device=draw(st.integers(1, 100)),
                        max_devices_per_program=draw(st.integers(1, 10**6)),
                        lifetime_pulse_budget=draw(st.integers(1, 10**9)), address_min=draw(st.integers(0, 100)),
                        address_max=draw(st.one_of(st.none(), st.integers(100, 1000))))


limits = st.composite(_limits)


@given(limits(), limits())
def test_intersection_is_never_wider_than_either(a: SafetyLimits, b: SafetyLimits) -> None:
    try:
        both = a.intersect(b)
    except SafetyViolation:
        return  # disjoint ranges: nothing allowed, refused
    assert both.wider_than(a) == []
    assert both.wider_than(b) == []
    assert both == b.intersect(a)


def test_wider_than_names_each_widened_field() -> None:
    wide = SafetyLimits(set_amplitude_ua=Range(min=10, max=5000), lifetime_pulse_budget=10**9)
    lines = wide.wider_than(SafetyLimits())
    assert lines == ["set_amplitude_ua.max = 5000 is above 200", "lifetime_pulse_budget = 1000000000 is above 100000000"]
    assert SafetyLimits().wider_than(SafetyLimits()) == []


def test_disjoint_ranges_are_refused() -> None:
    a = SafetyLimits(set_amplitude_ua=Range(min=10, max=50))
    b = SafetyLimits(set_amplitude_ua=Range(min=60, max=200))
    with pytest.raises(SafetyViolation, match="do not overlap"):
        a.intersect(b)
