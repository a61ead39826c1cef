"""Calibration round trip: characterize a simulated chip with known, non-default parameters and fit it back.

Tolerances follow from the number of devices: each fitted parameter must land within Z standard errors
of the truth, where the standard errors are the fit's own (bootstrap over devices, so they shrink as
1/sqrt(N)) and two of them are checked against their closed-form value for N devices. Z is the
Bonferroni two-sided normal quantile for a family-wise false-alarm rate of 1e-3 over the fields
checked, widened by the bootstrap's own relative error in a standard error, 1/sqrt(2 (B - 1)).
"""

from __future__ import annotations

import math
import numpy as np
import pytest
from scipy.stats import norm

from calibration.data import CharacterizationPlan
from calibration.experiments import cost, run_characterization
from calibration.run import characterize
from drivers.mock import MockDriver
from sim import PCMParams
from sim.response import granularity_us

N_DEVICES = 2000
N_PULSES = 20
BOOTSTRAP = 40
FAMILY_ALPHA = 1e-3

# A chip unlike the defaults in every field; its RESET level sits clear of g_min (an uncensored RESET
# distribution) and some devices reach g_max within the experiment (the upper bound is observable).
TRUE = PCMParams(g_min_us=0.1, g_max_us=16.0, set_mean_slope=-0.06, set_mean_offset_us=0.7, set_mean_history_us=1.8,
                 set_std_slope=0.07, set_std_offset_us=0.2, set_std_history_us=1.5, history_pulses=3.5,
                 reset_mean_us=0.8, reset_std_us=0.15, drift_t0_s=20.0, drift_nu_mean=0.06, drift_nu_std=0.015,
                 read_noise_rel=0.025, read_noise_abs_us=0.1, d2d_update_spread=0.1)
PLAN = CharacterizationPlan(n_pulses=N_PULSES)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "chip"
    driver = MockDriver(20, 100, params=TRUE, seed=11)
    return characterize(driver, np.arange(N_DEVICES), PLAN, out, bootstrap=BOOTSTRAP, seed=0), driver


def _z(n_checks: int) -> float:
    return norm.isf(FAMILY_ALPHA / (2 * n_checks)) * (1 + 1 / math.sqrt(2 * (BOOTSTRAP - 1)))


def test_every_fitted_parameter_is_within_its_tolerance(result):
    res, _ = result
    fitted, se = res.fit.params, res.fit.uncertainties()
    assert res.fit.warnings == []  # this chip fits without caveats (nothing censored, both bounds reached)
    # The bounds are read off exactly: the chip clips reads at them.
    assert fitted.g_min_us == pytest.approx(TRUE.g_min_us, abs=1e-6)
    assert fitted.g_max_us == pytest.approx(TRUE.g_max_us, abs=1e-5)
    fields = [k for k in PCMParams.model_fields if k not in ("g_min_us", "g_max_us")]
    z = _z(len(fields))
    bad = {k: (getattr(fitted, k), getattr(TRUE, k), se[k]) for k in fields
           if not abs(getattr(fitted, k) - getattr(TRUE, k)) <= z * se[k]}
    assert not bad, f"outside {z:.2f} standard errors (fitted, true, se): {bad}"


def test_the_tolerances_tell_another_chip_apart(result):
    """The same tolerances reject the default chip's parameters: the check above can fail."""
    res, _ = result
    se = res.fit.uncertainties()
    other = PCMParams()
    fields = [k for k in PCMParams.model_fields if k not in ("g_min_us", "g_max_us")]
    z = _z(len(fields))
    rejected = [k for k in fields if abs(getattr(res.fit.params, k) - getattr(other, k)) > z * se[k]]
    assert len(rejected) >= len(fields) - 2, rejected


def test_standard_errors_follow_from_the_number_of_devices(result):
    res, _ = result
    se = res.fit.uncertainties()
    r = PLAN.noise_reads
    # Mean of N device averages of r reads: var = reset_std^2 + s(G)^2 / r per device.
    s_reset = TRUE.read_noise_rel * TRUE.reset_mean_us + TRUE.read_noise_abs_us
    expected = math.sqrt((TRUE.reset_std_us ** 2 + s_reset ** 2 / r) / N_DEVICES)
    assert 0.8 * expected < se["reset_mean_us"] < 1.25 * expected
    # Mean drift exponent over the devices used: at least nu_std / sqrt(M), M <= N.
    m = res.fit.drift.devices_used
    assert TRUE.drift_nu_std / math.sqrt(m) * 0.8 < se["drift_nu_mean"] < 3 * TRUE.drift_nu_std / math.sqrt(m)


def test_eps_from_the_fitted_model_is_within_5_percent(result):
    res, _ = result
    true_eps = granularity_us(TRUE, n_pulses=N_PULSES)
    assert res.fit.eps_model_us == pytest.approx(true_eps, rel=0.05)
    assert res.fit.eps_measured_us.value == pytest.approx(true_eps, rel=0.05)


def test_fitted_file_loads_into_the_mock_and_reproduces_the_pulse_response(result):
    res, _ = result
    p = PCMParams.from_toml(res.params_file)
    assert p == res.fit.params
    twin = MockDriver(20, 100, params=p, seed=12345)
    sim = run_characterization(twin, np.arange(N_DEVICES), CharacterizationPlan(n_pulses=N_PULSES, drift=False))
    measured = res.data.pulse[0].reads_us
    simulated = sim.pulse[0].reads_us
    # Both curves carry sampling error var/N; the fitted parameters carry about the measured curve's again.
    tol = _z(N_PULSES + 1) * np.sqrt((2 * measured.var(axis=1) + simulated.var(axis=1)) / N_DEVICES)
    diff = np.abs(simulated.mean(axis=1) - measured.mean(axis=1))
    assert np.all(diff <= tol), f"pulse numbers off: {np.flatnonzero(diff > tol)} ({diff} vs {tol})"


def test_cost_is_what_the_run_spent(result):
    res, driver = result
    c = cost(PLAN, N_DEVICES)
    assert int(driver.lifetime_pulses.sum()) == c.set_pulses + c.reset_pulses
    from drivers.runlog import RunLogReader

    with RunLogReader(res.log) as r:
        ev = r.read_events()
        assert len(ev["step"]) == c.read_calls
        assert int(ev["count"].sum()) == c.device_reads
        assert set(ev["reason"]) == {"calibration-pulse", "calibration-noise", "calibration-drift"}
        progs = r.programs()
    assert sum(p.set_pulses + p.reset_pulses for _, _, p in progs) == c.set_pulses + c.reset_pulses


def test_the_log_holds_exactly_what_was_read(tmp_path):
    """A live run and the log it wrote give the same arrays (float32 reads) to the fit."""
    from calibration.data import load_calibration_log
    from drivers.logged import LoggedDriver  # noqa: F401  (the run logs through it)
    from drivers.runlog import RunLogWriter

    plan = CharacterizationPlan(n_pulses=10, noise_reads=5, drift_reads=6, drift_span_s=1e3,
                                set_shapes=[{"amplitude_ua": 100, "width_ns": 50}, {"amplitude_ua": 120, "width_ns": 40}])
    with RunLogWriter(tmp_path / "log.h5") as w:
        live = run_characterization(MockDriver(10, 40, seed=4), np.arange(30, 340), plan, writer=w)
    logged = load_calibration_log(tmp_path / "log.h5")
    assert logged.plan == plan
    np.testing.assert_array_equal(logged.addresses, live.addresses)
    for a, b in zip(live.pulse, logged.pulse, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a.reads_us, b.reads_us)
    np.testing.assert_array_equal(live.noise.after_reset_us, logged.noise.after_reset_us)
    np.testing.assert_array_equal(live.noise.after_pulses_us, logged.noise.after_pulses_us)
    np.testing.assert_array_equal(live.drift.reads_us, logged.drift.reads_us)
    np.testing.assert_array_equal(live.drift.t_s, logged.drift.t_s)
    assert live.drift.t_prog_s == logged.drift.t_prog_s


def test_the_drift_plot_draws_the_fitted_curves_beside_the_measured_points(result):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calibration.report import draw_drift, drift_curves

    res, _ = result
    d = res.fit.drift
    curves = drift_curves(d)
    assert [c.level for c in curves] == PLAN.levels()
    for c in curves:
        # The fitted model, read off at the measured times, lies on the measured means: the per-device lines
        # are fitted to these reads, so only read noise averaged over the level's devices separates them
        # (and the fit in log G, whose mean misses the mean of G by s^2 / 2 in relative terms).
        at_reads = np.interp(np.log(c.tau_s), np.log(c.model_tau_s), c.model_us)
        s = res.fit.read_noise.sd(c.measured_us)
        tol = _z(len(curves) * c.tau_s.size) * s / math.sqrt(c.devices) + 0.5 * s ** 2 / c.measured_us
        assert np.all(np.abs(at_reads - c.measured_us) <= tol), (at_reads, c.measured_us, tol)
        # Drawn on a fine grid through t0, where the model bends, not as chords between the reads.
        assert c.model_tau_s.size > 10 * c.tau_s.size and d.t0.value in c.model_tau_s
        flat = c.model_tau_s <= d.t0.value
        assert np.ptp(c.model_us[flat]) == pytest.approx(0.0, abs=1e-9 * c.model_us[0])
    fig, ax = plt.subplots()
    try:
        draw_drift(ax, res.fit)
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
    finally:
        plt.close(fig)
    for c in curves:
        fitted = lines[f"{c.level} SET pulses: fitted model"]
        np.testing.assert_array_equal(fitted.get_ydata(), c.model_us)
        measured = lines[f"{c.level} SET pulses: measured ({c.devices} devices)"]
        np.testing.assert_array_equal(measured.get_ydata(), c.measured_us)
