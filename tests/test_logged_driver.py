"""LoggedDriver: every read and program the driver serves is in the log, nothing else changes."""

from __future__ import annotations

import numpy as np
import pytest

from drivers import (MVM, Block, DriverError, LoggedDriver, MockDriver, PulseProgram, RunLogError, RunLogReader,
                     RunLogWriter, SafetyLimits, SafetyViolation)
from drivers.program import ReadResult


def _run(driver: LoggedDriver, steps: int, rng: np.random.Generator) -> tuple[list[ReadResult], list[PulseProgram]]:
    served, applied = [], []
    n = driver.geometry.n_devices
    for step in range(steps):
        driver.step = step
        a = rng.choice(n, 25, replace=False)
        served.append(driver.read(a))
        p = PulseProgram(step + 1, a[:5], rng.integers(0, 4, 5), np.zeros(5, bool))
        driver.apply(p)
        applied.append(p)
        with driver.reading("after-program"):
            served.append(driver.read(p.addresses))
        if step % 10 == 9:
            with driver.reading("evaluation"):
                served.append(driver.read())
    return served, applied


def test_the_log_holds_exactly_what_the_driver_served(tmp_path):
    rng = np.random.default_rng(0)
    inner = MockDriver(20, 30, seed=4)
    wall = iter(np.arange(10_000.0))
    with RunLogWriter(tmp_path / "run.h5") as w:
        d = LoggedDriver(inner, w, wall_clock=lambda: next(wall))
        served, applied = _run(d, 30, rng)
        assert w.counts["read_events"] == len(served)
        assert w.counts["reads"] == sum(r.addresses.size for r in served)
    with RunLogReader(tmp_path / "run.h5") as r:
        ev = r.read_events()
        assert len(ev["step"]) == len(served)
        assert np.array_equal(ev["t_s"], [x.t_s for x in served])
        flat = r.reads()
        assert np.array_equal(flat["address"], np.concatenate([x.addresses for x in served]))
        assert np.array_equal(flat["conductance_us"], np.concatenate([x.conductances_us for x in served]))
        assert list(ev["reason"][:3]) == ["periodic", "after-program", "periodic"]
        assert list(ev["reason"][19:21]) == ["after-program", "evaluation"]
        assert np.array_equal(ev["step"][:4], [0, 0, 1, 1])
        progs = r.programs()
        assert [p.program_id for _, _, p in progs] == [p.program_id for p in applied]
        assert all(np.array_equal(p.set_counts, q.set_counts) for (_, _, p), q in zip(progs, applied, strict=True))
        assert [s for s, _, _ in progs] == list(range(30))
        # The program's time is the driver clock just before it was sent: after the read of that step.
        assert all(t > ev["t_s"][2 * s] for s, t, _ in progs[:9])
        # Wall times come from the injected clock, one per logged call in call order.
        assert np.all(np.diff(np.sort(np.concatenate([ev["wall_s"], r.program_events()["wall_s"]]))) == 1)
        assert r.attrs["driver_identity"] == inner.identity
        assert (r.attrs["driver_rows"], r.attrs["driver_cols"]) == (20, 30)
        assert inner.limits.model_validate_json(r.attrs["driver_limits_json"]) == inner.limits
    # The chip got exactly the logged pulses.
    assert inner.last_program_id() == 30


def test_program_is_logged_before_the_inner_apply_runs(tmp_path, mocker):
    inner = MockDriver(4, 4)
    with RunLogWriter(tmp_path / "run.h5") as w:
        d = LoggedDriver(inner, w)
        seen: list[int] = []
        mocker.patch.object(inner, "_apply", side_effect=lambda p: seen.append(w.counts["programs"]))
        d.apply(PulseProgram(7, np.array([1, 2]), np.array([1, 1]), np.zeros(2, bool)))
        assert seen == [1]
        # An apply that fails on the way (a dropped link) still leaves the program in the log.
        mocker.patch.object(inner, "_apply", side_effect=DriverError("link dropped"))
        with pytest.raises(DriverError, match="link dropped"):
            d.apply(PulseProgram(8, np.array([3]), np.array([2]), np.zeros(1, bool)))
        assert w.counts["programs"] == 2


def test_a_refused_program_is_neither_logged_nor_sent(tmp_path):
    inner = MockDriver(4, 4)
    with RunLogWriter(tmp_path / "run.h5") as w:
        d = LoggedDriver(inner, w)
        with pytest.raises(SafetyViolation):
            d.apply(PulseProgram(1, np.array([0]), np.array([1000]), np.zeros(1, bool)))
        assert w.counts["programs"] == 0 and inner.last_program_id() is None
        with pytest.raises(DriverError):
            d.read(np.array([16]))
        assert w.counts["read_events"] == 0


def test_pass_through_of_description_clock_and_mvm(tmp_path):
    inner = MockDriver(6, 5, seed=2, analog_mvm=True)
    with RunLogWriter(tmp_path / "run.h5") as w:
        d = LoggedDriver(inner, w, program_times=False)
        assert d.identity == inner.identity and d.capabilities == frozenset({MVM})
        assert d.geometry == inner.geometry and d.limits == inner.limits
        assert d.now() == inner.now()
        x = np.ones((1, 6))
        y = d.mvm(Block(0, 6, 0, 5), x)
        assert y.shape == (1, 5) and w.counts["read_events"] == 0
        d.apply(PulseProgram(3, np.array([0]), np.array([1]), np.zeros(1, bool)))
        assert d.last_program_id() == 3
    with RunLogReader(tmp_path / "run.h5") as r:
        assert np.isnan(r.programs()[0][1])


def test_reading_restores_the_reason_even_on_error(tmp_path):
    with RunLogWriter(tmp_path / "run.h5") as w:
        d = LoggedDriver(MockDriver(2, 2), w)
        d.reason = "initial"
        with pytest.raises(ValueError):
            with d.reading("refresh-verify"):
                raise ValueError
        assert d.reason == "initial"


def test_a_log_from_another_geometry_is_refused(tmp_path):
    with RunLogWriter(tmp_path / "run.h5") as w:
        LoggedDriver(MockDriver(4, 4), w)
    with RunLogWriter(tmp_path / "run.h5", append=True) as w:
        with pytest.raises(RunLogError, match="4 x 4 array"):
            LoggedDriver(MockDriver(4, 5), w)
        LoggedDriver(MockDriver(4, 4), w)


def test_the_wrapper_checks_against_the_wrapped_drivers_pulse_ledger(tmp_path):
    """Pulses the inner driver had before it was wrapped count against the endurance budget."""
    inner = MockDriver(2, 2, limits=SafetyLimits(lifetime_pulse_budget=5))
    inner.apply(PulseProgram(1, np.array([0]), np.array([4]), np.zeros(1, bool)))
    with RunLogWriter(tmp_path / "run.h5") as w:
        d = LoggedDriver(inner, w)
        with pytest.raises(SafetyViolation, match="lifetime_pulse_budget") as e:
            d.apply(PulseProgram(2, np.array([0]), np.array([2]), np.zeros(1, bool)))
        assert e.value.device == 0 and w.counts["programs"] == 0 and inner.last_program_id() == 1
        d.apply(PulseProgram(3, np.array([0, 1]), np.array([1, 1]), np.zeros(2, bool)))
        # One ledger, counted once.
        assert d.lifetime_pulses.tolist() == inner.lifetime_pulses.tolist() == [5, 1, 0, 0]
