"""Pulse response and granularity of the simulated chip."""

import math

import numpy as np
import pytest

from sim import PCMParams
from sim.response import granularity_from_means, granularity_us, pulse_response


def test_pulse_response_is_monotone_in_mean_and_seeded() -> None:
    r = pulse_response(n_devices=20_000, n_pulses=20, seed=3)
    assert r.pulses.tolist() == list(range(21))
    assert np.all(np.diff(r.mean_us) > 0)
    assert r.mean_us[0] == pytest.approx(PCMParams().reset_mean_us, abs=0.01)
    again = pulse_response(n_devices=20_000, n_pulses=20, seed=3)
    assert np.array_equal(r.mean_us, again.mean_us)


def test_first_pulse_mean_matches_the_clipped_normal_from_reset() -> None:
    """From RESET (all at ~0.1 uS) one pulse gives max(G0 + dG, g_min); compare with the exact clipped mean."""
    p = PCMParams(d2d_update_spread=0.0, reset_std_us=0.0)
    n = 200_000
    r = pulse_response(p, n_devices=n, n_pulses=1, seed=1)
    g0 = p.reset_mean_us
    mu = g0 + p.set_mean_slope * g0 + p.set_mean_offset_us + p.set_mean_history_us * math.exp(-1 / p.history_pulses)
    sd = p.set_std_slope * g0 + p.set_std_offset_us + p.set_std_history_us * math.exp(-1 / p.history_pulses)
    a = (p.g_min_us - mu) / sd
    phi, cdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(a / math.sqrt(2)))
    expected = p.g_min_us * cdf + mu * (1 - cdf) + sd * phi
    assert abs(r.mean_us[1] - expected) < 5 * sd / math.sqrt(n)


def test_granularity_definition() -> None:
    assert granularity_from_means(0.1, 9.1, 20) == pytest.approx(0.45)
    with pytest.raises(ValueError):
        granularity_from_means(0.1, 1.0, 0)
    r = pulse_response(n_devices=5000, n_pulses=10, seed=0)
    assert granularity_us(n_pulses=10, n_devices=5000, seed=0) == pytest.approx((r.mean_us[10] - r.mean_us[0]) / 10)
    # A chip with a larger offset c1 has a coarser granularity.
    assert granularity_us(PCMParams(set_mean_offset_us=1.5), n_devices=5000) > granularity_us(n_devices=5000)
