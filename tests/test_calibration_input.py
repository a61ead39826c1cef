"""Calibration on bad input: refused before any pulse, or a clear error naming the problem."""

from __future__ import annotations

import tomllib
import warnings

import h5py
import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from calibration.data import CalibrationData, CharacterizationPlan, NoiseData, PulseData
from calibration.errors import CalibrationError, FitDidNotConverge, InsufficientData, NotACalibrationLog, OutputExists
from calibration.experiments import run_characterization, runnable_plan
from calibration.fit import CalibrationWarning, fit_model
from calibration.run import characterize, fit_log
from drivers.errors import SafetyViolation
from drivers.mock import MockDriver
from drivers.program import PulseShape
from drivers.runlog import RunLogWriter
from drivers.safety import Range, SafetyLimits
from hil.cli import app

SMALL = CharacterizationPlan(n_pulses=10, noise_reads=6, drift_reads=8, drift_span_s=2e3)
#: A terminal narrower than any message: nothing may depend on the width (rich wraps at it).
NARROW = {"COLUMNS": "30"}
#: A folder name longer than any terminal line, with text rich would take for markup.
AWKWARD = "a-folder-name-that-no-terminal-line-holds-" * 3 + "[bold]chip[/bold] [0.5]"


def test_too_few_devices_is_refused_before_any_pulse(tmp_path):
    d = MockDriver(10, 10)
    with pytest.raises(InsufficientData, match="50 devices are too few"):
        characterize(d, np.arange(50), SMALL, tmp_path / "out")
    assert d.lifetime_pulses.sum() == 0
    assert not (tmp_path / "out").exists()


def test_too_few_pulses_or_reads_is_refused_by_the_plan():
    with pytest.raises(ValidationError, match="n_pulses"):
        CharacterizationPlan(n_pulses=2)
    with pytest.raises(ValidationError, match="noise_reads"):
        CharacterizationPlan(noise_reads=2)


def test_pulse_budget_and_shape_limits_are_checked_up_front(tmp_path):
    d = MockDriver(10, 40, limits=SafetyLimits(lifetime_pulse_budget=20))
    with pytest.raises(SafetyViolation, match="lifetime_pulse_budget"):
        characterize(d, np.arange(300), SMALL, tmp_path / "a")
    assert d.lifetime_pulses.sum() == 0
    d = MockDriver(10, 40, limits=SafetyLimits(set_amplitude_ua=Range(min=10, max=90)))
    with pytest.raises(SafetyViolation, match="set_amplitude_ua"):
        characterize(d, np.arange(300), SMALL, tmp_path / "b")
    assert d.lifetime_pulses.sum() == 0 and not (tmp_path / "b").exists()


def test_programs_are_split_to_the_per_program_pulse_limit():
    d = MockDriver(10, 40, limits=SafetyLimits(max_set_pulses_per_device=3))
    plan = CharacterizationPlan(n_pulses=10, noise_reads=5, drift_reads=6, drift_levels=[7])
    data = run_characterization(d, np.arange(300), plan)
    assert np.all(d.lifetime_pulses[:300] == 10 + 1 + 7 + 1)
    assert np.all(data.drift.levels == 7)


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(OutputExists):
        characterize(MockDriver(10, 40), np.arange(300), SMALL, tmp_path / "out")
    assert (tmp_path / "out" / "keep").read_text() == "x"


def _data(pulse: np.ndarray, noise: np.ndarray) -> CalibrationData:
    n = pulse.shape[1]
    return CalibrationData(CharacterizationPlan(n_pulses=pulse.shape[0] - 1, drift=False), np.arange(n),
                           [PulseData(PulseShape(amplitude_ua=100, width_ns=50), pulse)], NoiseData(noise, noise), None)


def test_all_zero_reads_are_named():
    with pytest.raises(InsufficientData, match="every read is zero"):
        fit_model(_data(np.zeros((11, 300)), np.zeros((6, 300))))


def test_saturated_reads_are_named():
    with pytest.raises(InsufficientData, match="saturated"):
        fit_model(_data(np.full((11, 300), 20.0), np.full((6, 300), 20.0)))
    # Reads that move (noise) but do not rise with the pulses.
    rng = np.random.default_rng(0)
    g = 5 + rng.normal(0, 0.3, (11, 300))
    with pytest.raises(InsufficientData, match="do not SET the devices"):
        fit_model(_data(g, 5 + rng.normal(0, 0.3, (6, 300))))


def test_drift_onset_outside_the_span_is_a_fit_that_did_not_converge():
    # Reads start long after t0 = 38.6 s: the onset cannot be located, so nothing is reported.
    plan = CharacterizationPlan(n_pulses=10, noise_reads=6, drift_first_s=500, drift_span_s=5e4, drift_reads=8)
    data = run_characterization(MockDriver(10, 40, seed=2), np.arange(400), plan)
    with warnings.catch_warnings(), pytest.raises(FitDidNotConverge, match="drift.*t0"):
        warnings.simplefilter("ignore", CalibrationWarning)
        fit_model(data, bootstrap=0)


def test_logs_of_another_kind_are_named(tmp_path):
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(NotACalibrationLog, match="not a pcm-hil run log"):
        fit_log(tmp_path / "text.h5", tmp_path / "o1")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(NotACalibrationLog, match="not a pcm-hil run log"):
        fit_log(tmp_path / "other.h5", tmp_path / "o2")
    with RunLogWriter(tmp_path / "train.h5") as w:
        w.log_reads(0, 0.0, np.arange(3), np.ones(3, np.float32), "periodic")
    with pytest.raises(NotACalibrationLog, match="not a calibration log"):
        fit_log(tmp_path / "train.h5", tmp_path / "o3")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_truncated_calibration_log_is_named(tmp_path):
    # An interrupted run: the plan is in the log, the reads stop short.
    with RunLogWriter(tmp_path / "cut.h5") as w:
        d = MockDriver(10, 40, seed=1)
        plan = CharacterizationPlan(n_pulses=10, noise_reads=5, drift=False)

        class Stop(Exception):
            pass

        def boom(*a, **k):
            raise Stop

        orig = d.read
        calls = {"n": 0}

        def read_then_stop(addresses=None):
            calls["n"] += 1
            if calls["n"] > 4:
                boom()
            return orig(addresses)

        d.read = read_then_stop
        with pytest.raises(Stop):
            run_characterization(d, np.arange(300), plan, writer=w)
    with pytest.raises(NotACalibrationLog, match="truncated or interrupted"):
        fit_log(tmp_path / "cut.h5", tmp_path / "o")


def test_cli_characterize_then_fit(tmp_path):
    runner = CliRunner(env=NARROW)
    out = tmp_path / "chip"
    r = runner.invoke(app, ["characterize", "--devices", "300", "--pulses", "10", "--out", str(out), "--seed", "1",
                            "--bootstrap", "4", "--drift-span", "2000", "--drift-reads", "8"])
    assert r.exit_code == 0, r.output
    assert "Cost: 300 devices" in r.stdout and "eps (fitted model" in r.stdout
    # Not a terminal: progress is plain lines, all on stderr (stdout holds the results only).
    for step in ("pulse response 100 uA x 50 ns", "drift over 2000 s", "fit: SET increments (bootstrap)", "plots"):
        assert f"{step}: started" in r.stderr and f"{step}: done" in r.stderr, r.stderr
    assert ": started" not in r.stdout and "0:00:0" not in r.output  # no bars (their elapsed-time column)
    for name in ("calibration.h5", "pcm.toml", "increments.png", "drift.png", "read_noise.png"):
        assert (out / name).stat().st_size > 0
    r = runner.invoke(app, ["fit", str(out / "calibration.h5"), "--out", str(tmp_path / "refit"), "--bootstrap", "4",
                            "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "eps (fitted model" in r.stdout and ": started (" not in r.stdout
    lines = r.stderr.splitlines()
    for step in ("fit: SET increments (bootstrap)", "fit: SET increments (bias correction", "fit: drift (bootstrap)",
                 "fit: eps of the fitted model", "plots"):
        assert any(ln.startswith(step) and ": started (" in ln for ln in lines), r.stderr
    assert r.stderr.count(": started") == r.stderr.count(": done") >= 5
    assert (tmp_path / "refit" / "pcm.toml").read_text().split("[calibration]")[0] == \
        (out / "pcm.toml").read_text().split("[calibration]")[0]
    r = runner.invoke(app, ["fit", str(out / "calibration.h5"), "--out", str(tmp_path / "refit")])
    assert r.exit_code != 0 and "exists already" in r.output
    r = runner.invoke(app, ["characterize", "--devices", "20", "--out", str(tmp_path / "few")])
    assert r.exit_code == 1 and "too few" in r.output and not (tmp_path / "few").exists()


def test_characterize_over_the_emulated_tester_matches_the_in_process_chip(tmp_path):
    """Through pyvisa-py and a real socket to `pcm-hil emulator`, the experiments read what the mock reads."""
    from drivers.tester import TesterDriver
    from hil.cli_emulator import EmulatorProcess

    plan = CharacterizationPlan(n_pulses=10, noise_reads=5, drift=False)
    with EmulatorProcess(["--rows", "10", "--cols", "30", "--seed", "5"]) as emu:
        with TesterDriver.open(emu.resource) as d:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CalibrationWarning)
                res = characterize(d, np.arange(300), plan, tmp_path / "chip", bootstrap=2)
    local = run_characterization(MockDriver(10, 30, seed=5), np.arange(300), plan)
    np.testing.assert_array_equal(res.data.pulse[0].reads_us, local.pulse[0].reads_us)
    np.testing.assert_array_equal(res.data.noise.after_pulses_us, local.noise.after_pulses_us)
    assert res.fit.not_measured == ["drift_t0_s", "drift_nu_mean", "drift_nu_std"]
    assert (tmp_path / "chip" / "pcm.toml").is_file()


def test_drift_is_refused_where_waiting_does_not_move_the_clock(tmp_path):
    d = MockDriver(10, 40)
    with pytest.raises(CalibrationError, match="--no-drift"):
        run_characterization(d, np.arange(300), SMALL, wait=lambda s: None)
    assert d.lifetime_pulses.sum() == 0
    # Refused before the log is written to: no plan in it, so nothing takes it for a calibration.
    with RunLogWriter(tmp_path / "log.h5") as w, pytest.raises(CalibrationError, match="--no-drift"):
        run_characterization(d, np.arange(300), SMALL, writer=w, wait=lambda s: None)
    with pytest.raises(NotACalibrationLog, match="not a calibration log"):
        fit_log(tmp_path / "log.h5", tmp_path / "o")


def test_runnable_plan_drops_drift_where_waiting_does_not_move_the_clock():
    plan, why = runnable_plan(MockDriver(10, 40), SMALL, wait=lambda s: None)
    assert plan == SMALL.model_copy(update={"drift": False})
    assert why.startswith("drift experiment skipped") and "MockDriver" in why
    assert runnable_plan(MockDriver(10, 40), SMALL) == (SMALL, None)  # simulated time follows advance()


def test_characterize_skips_drift_on_the_emulated_tester(tmp_path):
    """Its clock moves only with its operations, and nothing can advance it: drift is skipped, the rest runs."""
    from hil.cli_emulator import EmulatorProcess

    out = tmp_path / "chip"
    with EmulatorProcess(["--rows", "40", "--cols", "50"]) as emu:
        r = CliRunner(env=NARROW).invoke(app, ["characterize", "--driver", emu.resource, "--devices", "300",
                                               "--pulses", "10", "--noise-reads", "6", "--bootstrap", "2",
                                               "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "note: drift experiment skipped: the clock of 'pcm-hil,emulator" in r.stdout
    # The plan shown before the first pulse is the one that ran.
    no_drift = SMALL.model_copy(update={"drift": False, "noise_reads": 6})
    assert "no drift experiment" in r.stdout and "0 s of waiting for drift" in r.stdout
    from calibration.experiments import cost
    from drivers.runlog import RunLogReader

    with RunLogReader(out / "calibration.h5") as log:
        ev = log.read_events()
        assert set(ev["reason"]) == {"calibration-pulse", "calibration-noise"}
        assert len(ev["step"]) == cost(no_drift, 300).read_calls
    toml = tomllib.loads((out / "pcm.toml").read_text())["calibration"]
    assert toml["drift_measured"] is False and "emulated tester" in toml["drift_skipped"]
    assert toml["not_measured"] == ["drift_t0_s", "drift_nu_mean", "drift_nu_std"]


def test_cli_error_lines_are_whole_and_literal(tmp_path):
    """One line on stderr, whatever the terminal width; paths neither broken nor read as markup."""
    out = tmp_path / AWKWARD
    out.mkdir(parents=True)  # "[/bold]" makes it two folders: still one path rich would read as markup
    runner = CliRunner(env=NARROW)
    exists = f"error: {out} exists already; choose a new folder (nothing is overwritten)"
    for args in (["characterize", "--out", str(out)], ["fit", str(tmp_path / "x.h5"), "--out", str(out)]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and r.stderr.splitlines() == [exists] and r.stdout == "", r.output
    missing = tmp_path / f"{AWKWARD}.h5"
    r = runner.invoke(app, ["fit", str(missing), "--out", str(tmp_path / "new")])
    assert r.exit_code == 1 and r.stderr.splitlines() == [f"error: {missing}: no such file"], r.output


def test_cli_bad_input_is_one_line_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pcm]\ng_min_us = -1\n")
    new = str(tmp_path / "new")
    cases = {("characterize", "--out", new, "--set-shape", "100"): "error: --set-shape '100': expected AMPLITUDE_UA:WIDTH_NS",
             ("characterize", "--out", new, "--drift-reads", "2"): "error: bad experiment settings: --drift-reads: ",
             ("characterize", "--out", new, "--prior", str(tmp_path / "none.toml")): f"error: --prior {tmp_path / 'none.toml'}: ",
             ("characterize", "--out", new, "--params", str(bad)): f"error: --params {bad} is not a PCM parameter file: ",
             ("fit", str(tmp_path / "x.h5"), "--out", new, "--prior", str(bad)): f"error: --prior {bad} is not a PCM"}
    for args, start in cases.items():
        r = CliRunner(env=NARROW).invoke(app, list(args))
        lines = r.stderr.splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith(start), (args, r.output)
        assert "http" not in r.output and r.stdout == "" and not (tmp_path / "new").exists()


def test_progress_is_drawn_as_bars_on_a_terminal(monkeypatch):
    import io

    from rich.console import Console

    from hil import cli_calibration

    screen = io.StringIO()
    monkeypatch.setattr(cli_calibration, "progress_console", Console(file=screen, force_terminal=True, width=60))
    with cli_calibration._progress() as bar:
        with bar.task("fit: something slow", 4) as tick:
            for _ in range(4):
                tick()
    assert "fit: something slow" in screen.getvalue() and "4/4" in screen.getvalue()
    assert "started" not in screen.getvalue()  # the plain lines are for pipes only
