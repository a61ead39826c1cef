"""The behavioral PCM model: statistics against the published formulas, drift, noise, persistence, bad input.

Statistical tolerances are Z standard errors of the estimate for the sample size used (not tuned);
every chip is seeded, so a failure repeats.
"""

import copy
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from sim import AddressError, ClockError, PCMArray, PCMParams, PulseCountError, StateFileError

Z = 5.0  # standard errors allowed: a correct model fails with probability < 1e-6 per check
N = 200_000  # devices per statistical experiment


def mean_tol(sigma: float, n: int) -> float:
    return Z * sigma / math.sqrt(n)


def std_tol(sigma: float, n: int) -> float:
    # Standard error of a sample standard deviation of n normal draws.
    return Z * sigma / math.sqrt(2 * (n - 1))


@pytest.mark.parametrize("g0,n_prev", [(8.0, 0), (5.0, 3), (3.0, 9), (10.0, 20), (6.0, 1)])
def test_set_increment_matches_published_formulas(g0: float, n_prev: int) -> None:
    p = PCMParams()
    chip = PCMArray(N, p, seed=11)
    addr = np.arange(N)
    chip.force_state(addr, g0, n_prev, t=0.0)
    chip.set_pulses(addr, np.ones(N, np.int64), t=1e-6)
    inc = chip.conductance(addr, 1e-6).astype(np.float64) - np.float32(g0)

    pulse_number = n_prev + 1
    mu = p.mean_increment_us(g0, pulse_number)
    sigma = p.std_increment_us(g0, pulse_number)
    # The device factor f ~ N(1, s^2) multiplies the mean: Var = sigma^2 + s^2 mu^2.
    total_sd = math.sqrt(sigma**2 + (p.d2d_update_spread * mu) ** 2)
    assert abs(inc.mean() - mu) < mean_tol(total_sd, N)
    assert abs(inc.std() - total_sd) < std_tol(total_sd, N)
    assert np.all(chip.pulses_since_reset(addr) == pulse_number)


def test_increment_without_device_variability_has_the_model_spread() -> None:
    p = PCMParams(d2d_update_spread=0.0)
    chip = PCMArray(N, p, seed=3)
    addr = np.arange(N)
    chip.force_state(addr, 7.0, 2, t=0.0)
    chip.set_pulses(addr, np.ones(N, np.int64), t=1.0)
    inc = chip.conductance(addr, 1.0).astype(np.float64) - np.float32(7.0)
    sigma = p.std_increment_us(7.0, 3)
    assert abs(inc.mean() - p.mean_increment_us(7.0, 3)) < mean_tol(sigma, N)
    assert abs(inc.std() - sigma) < std_tol(sigma, N)


def test_device_factor_scales_the_mean_per_device() -> None:
    p = PCMParams(d2d_update_spread=0.2, set_std_slope=0.0, set_std_offset_us=1e-3, set_std_history_us=0.0)
    chip = PCMArray(10_000, p, seed=5)
    addr = np.arange(10_000)
    chip.force_state(addr, 5.0, 50, t=0.0)
    chip.set_pulses(addr, np.ones(10_000, np.int64), t=1.0)
    inc = chip.conductance(addr, 1.0).astype(np.float64) - np.float32(5.0)
    expected = chip.update_factors() * p.mean_increment_us(5.0, 51)
    np.testing.assert_allclose(inc, expected, atol=Z * 1e-3 + 1e-5)
    f = chip.update_factors()
    assert abs(f.mean() - 1.0) < mean_tol(0.2, f.size) and abs(f.std() - 0.2) < std_tol(0.2, f.size)


def test_pulses_in_one_call_are_drawn_one_after_another() -> None:
    """k pulses in one call have the same distribution as k calls of one pulse."""
    p = PCMParams()
    n, k = 100_000, 6
    together = PCMArray(n, p, seed=1)
    apart = PCMArray(n, p, seed=2)
    addr = np.arange(n)
    together.set_pulses(addr, np.full(n, k), t=1e-3)
    for i in range(k):
        apart.set_pulses(addr, np.ones(n, np.int64), t=1e-3 * (i + 1))
    a = together.conductance(addr, 1e-3).astype(np.float64)
    b = apart.conductance(addr, 1e-3 * k).astype(np.float64)
    sd = max(a.std(), b.std())
    assert abs(a.mean() - b.mean()) < Z * sd * math.sqrt(2 / n)
    assert abs(a.std() - b.std()) < Z * sd / math.sqrt(n)
    assert np.all(together.pulses_since_reset() == k)


def test_mixed_pulse_counts_in_one_call() -> None:
    chip = PCMArray(1000, seed=0)
    addr = np.arange(1000)
    counts = np.arange(1000) % 7
    before = chip.conductance(None, 0.0)
    chip.set_pulses(addr, counts, t=1.0)
    after = chip.conductance(None, 1.0)
    assert np.array_equal(chip.pulses_since_reset(), counts.astype(np.uint32))
    # Untouched devices (count 0) keep their value exactly.
    assert np.array_equal(after[counts == 0], before[counts == 0])


@pytest.mark.parametrize("g_min", [0.05, 0.1])
def test_reset_distribution(g_min: float) -> None:
    """RESET draws N(0.1, 0.01^2) uS, clipped to the bounds: with the default g_min = 0.1 half sit at g_min."""
    p = PCMParams(g_min_us=g_min)
    chip = PCMArray(N, p, seed=9)
    addr = np.arange(N)
    chip.set_pulses(addr, np.full(N, 5), t=1.0)
    chip.reset(addr, t=2.0)
    g = chip.conductance(addr, 2.0).astype(np.float64)
    mu, s = p.reset_mean_us, p.reset_std_us
    a = (g_min - mu) / s  # clip point in standard units
    phi, cdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(a / math.sqrt(2)))
    # Moments of max(X, g_min) for X ~ N(mu, s^2).
    mean = g_min * cdf + mu * (1 - cdf) + s * phi
    second = g_min**2 * cdf + (mu**2 + s**2) * (1 - cdf) + s * (mu + g_min) * phi
    sd = math.sqrt(second - mean**2)
    assert abs(g.mean() - mean) < mean_tol(s, N) + 1e-6  # float32 rounding of 0.1
    assert abs(g.std() - sd) < std_tol(s, N) + 1e-6
    assert abs((g <= np.float32(g_min)).mean() - cdf) < Z * math.sqrt(cdf * (1 - cdf) / N) + 1e-9
    assert np.all(chip.pulses_since_reset() == 0)


@pytest.mark.parametrize("nu", [0.02, 0.04, 0.1])
def test_drift_log_log_slope_is_minus_nu(nu: float) -> None:
    p = PCMParams(drift_nu_mean=nu, drift_nu_std=0.0)
    chip = PCMArray(100, p, seed=0)
    addr = np.arange(100)
    chip.set_pulses(addr, np.full(100, 4), t=0.0)
    times = p.drift_t0_s * np.logspace(0.5, 5, 8)
    g = np.stack([chip.conductance(addr, float(t)) for t in times]).astype(np.float64)
    slopes = np.polyfit(np.log(times), np.log(g), 1)[0]
    np.testing.assert_allclose(slopes, -nu, atol=1e-5)


def test_drift_is_per_device_and_nu_never_negative() -> None:
    p = PCMParams(drift_nu_mean=0.01, drift_nu_std=0.02)
    chip = PCMArray(N, p, seed=4)
    nu = chip.drift_exponents()
    assert nu.min() >= 0.0
    # A normal clipped at zero: compare the mean with the clipped-normal formula.
    a = -0.01 / 0.02
    phi, cdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(a / math.sqrt(2)))
    clipped_mean = 0.01 * (1 - cdf) + 0.02 * phi
    assert abs(nu.mean() - clipped_mean) < mean_tol(0.02, N)

    addr = np.arange(1000)
    chip.set_pulses(addr, np.full(1000, 3), t=0.0)
    t1, t2 = 10 * p.drift_t0_s, 1000 * p.drift_t0_s
    g1, g2 = chip.conductance(addr, t1), chip.conductance(addr, t2)
    slope = (np.log(g2) - np.log(g1)) / (math.log(t2) - math.log(t1))
    np.testing.assert_allclose(slope, -nu[:1000], atol=1e-5)


def test_no_drift_before_reference_time() -> None:
    chip = PCMArray(100, seed=0)
    addr = np.arange(100)
    chip.set_pulses(addr, np.full(100, 3), t=0.0)
    g = chip.conductance(addr, 0.0)
    assert np.array_equal(chip.conductance(addr, chip.params.drift_t0_s * 0.999), g)


@pytest.mark.parametrize("g0", [0.5, 5.0, 15.0])
def test_read_noise_spread(g0: float) -> None:
    p = PCMParams()
    chip = PCMArray(N, p, seed=6)
    addr = np.arange(N)
    chip.force_state(addr, g0, 10, t=0.0)
    reads = chip.read(None, 1.0).astype(np.float64)
    true = chip.conductance(None, 1.0).astype(np.float64)
    sigma = p.read_noise_rel * g0 + p.read_noise_abs_us
    noise = reads - true
    if g0 - 3 * sigma > p.g_min_us:  # far from the clip
        assert abs(noise.mean()) < mean_tol(sigma, N)
        assert abs(noise.std() - sigma) < std_tol(sigma, N)
    assert reads.min() >= p.g_min_us and reads.max() <= p.g_max_us


def test_read_of_addresses_equals_full_read_statistics_and_leaves_state() -> None:
    chip = PCMArray(5000, seed=1)
    chip.set_pulses(np.arange(5000), np.full(5000, 2), t=0.0)
    state = copy.deepcopy(chip)
    r = chip.read(np.array([4999, 0, 17]), t=0.0)
    assert r.dtype == np.float32 and r.shape == (3,)
    # A read changes only the RNG position and the clock, never the devices.
    assert np.array_equal(chip.conductance(None, 0.0), state.conductance(None, 0.0))


@given(st.integers(0, 2**31), st.lists(st.integers(0, 30), min_size=1, max_size=50))
def test_bounds_hold_for_any_pulse_train(seed: int, counts: list[int]) -> None:
    p = PCMParams(g_max_us=12.0)
    chip = PCMArray(len(counts), p, seed=seed)
    addr = np.arange(len(counts))
    chip.set_pulses(addr, np.array(counts), t=1.0)
    for g in (chip.conductance(None, 1.0), chip.read(None, 2.0), chip.read(addr, 1e6)):
        assert g.min() >= p.g_min_us and g.max() <= p.g_max_us


def test_same_seed_same_chip_other_seed_other_chip() -> None:
    def run(seed: int) -> np.ndarray:
        chip = PCMArray(2000, seed=seed)
        chip.set_pulses(np.arange(0, 2000, 2), np.full(1000, 3), t=1.0)
        chip.reset(np.arange(0, 100), t=2.0)
        return chip.read(None, 500.0)

    assert np.array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))


def test_save_load_round_trip_is_exact_and_continues_identically(tmp_path) -> None:
    chip = PCMArray(3000, PCMParams(drift_nu_std=0.02, d2d_update_spread=0.1), seed=12)
    chip.set_pulses(np.arange(3000), np.arange(3000) % 5, t=3.0)
    chip.reset(np.arange(10), t=4.0)
    path = tmp_path / "chip.npz"
    chip.save(path)
    loaded = PCMArray.load(path)
    assert loaded.state_equal(chip)
    for c in (chip, loaded):
        c.set_pulses(np.arange(100), np.full(100, 2), t=10.0)
    assert np.array_equal(chip.read(None, 1e4), loaded.read(None, 1e4))
    assert loaded.state_equal(chip)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_load_refuses_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(StateFileError, match="no chip state"):
        PCMArray.load(tmp_path / "absent.npz")
    chip = PCMArray(100, seed=0)
    path = tmp_path / "chip.npz"
    chip.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(StateFileError):
        PCMArray.load(tmp_path / "trunc.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a chip")
    with pytest.raises(StateFileError):
        PCMArray.load(tmp_path / "junk.npz")


def _unchanged_after(chip: PCMArray, call) -> None:
    before = copy.deepcopy(chip)
    call()
    assert chip.state_equal(before)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda c: c.set_pulses(np.array([0, 1]), np.array([1, -1]), 5.0), PulseCountError, "negative"),
        (lambda c: c.set_pulses(np.array([0, 1]), np.array([1.5, 1]), 5.0), PulseCountError, "integers"),
        (lambda c: c.set_pulses(np.array([0, 1]), np.array([1]), 5.0), PulseCountError, "one SET pulse count"),
        (lambda c: c.set_pulses(np.array([0, 100]), np.array([1, 1]), 5.0), AddressError, "address 100"),
        (lambda c: c.set_pulses(np.array([-1, 3]), np.array([1, 1]), 5.0), AddressError, "address -1"),
        (lambda c: c.set_pulses(np.array([3, 4, 3]), np.array([1, 1, 1]), 5.0), AddressError, "more than once"),
        (lambda c: c.set_pulses(np.array([0.0]), np.array([1]), 5.0), AddressError, "integers"),
        (lambda c: c.set_pulses(np.array([0]), np.array([1]), float("nan")), ClockError, "finite"),
        (lambda c: c.set_pulses(np.array([0]), np.array([1]), 0.5), ClockError, "backward"),
        (lambda c: c.reset(np.array([[0]]), 5.0), AddressError, "1-D"),
        (lambda c: c.read(np.array([200]), 5.0), AddressError, "outside"),
        (lambda c: c.apply(np.array([0, 1]), np.array([1, 1]), np.array([1, 0]), 5.0), PulseCountError, "bool"),
    ],
)
def test_bad_input_raises_typed_error_and_changes_nothing(call, error, message) -> None:
    chip = PCMArray(100, seed=0)
    chip.set_pulses(np.arange(50), np.full(50, 2), t=1.0)
    with pytest.raises(error, match=message):
        _unchanged_after(chip, lambda: call(chip))
    assert chip.state_equal(chip)
    before = copy.deepcopy(chip)
    with pytest.raises(error):
        call(chip)
    assert chip.state_equal(before)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"g_min_us": 5.0, "g_max_us": 1.0}, "g_min_us < g_max_us"),
        ({"set_mean_slope": float("nan")}, "finite"),
        ({"drift_t0_s": 0.0}, "greater than 0"),
        ({"set_std_offset_us": -2.0}, "negative"),
        ({"reset_mean_us": 50.0}, "outside"),
        ({"unknown_field": 1.0}, "Extra inputs"),
        ({"drift_nu_std": -0.1}, "greater than or equal"),
    ],
)
def test_inconsistent_parameters_are_refused(kwargs, message) -> None:
    with pytest.raises(ValidationError, match=message):
        PCMParams(**kwargs)


def test_params_load_from_toml(tmp_path) -> None:
    (tmp_path / "p.toml").write_text("[pcm]\ng_max_us = 25.0\ndrift_nu_mean = 0.05\n")
    p = PCMParams.from_toml(tmp_path / "p.toml")
    assert p.g_max_us == 25.0 and p.drift_nu_mean == 0.05 and p.set_mean_slope == -0.084


def test_apply_resets_then_sets() -> None:
    chip = PCMArray(10, seed=0)
    addr = np.arange(10)
    chip.set_pulses(addr, np.full(10, 8), t=1.0)
    chip.apply(addr, np.array([0, 3] * 5), np.array([True, True] + [False] * 8), t=2.0)
    n = chip.pulses_since_reset()
    assert n[0] == 0 and n[1] == 3 and n[2] == 8 and n[3] == 11


def test_state_is_at_most_24_bytes_per_device() -> None:
    chip = PCMArray(1000, seed=0)
    assert chip.nbytes == 24 * 1000

