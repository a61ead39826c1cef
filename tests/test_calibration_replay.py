"""`pcm-hil characterize --driver replay:LOG`: a calibration log re-served by ReplayDriver reproduces the fit.

Both fits read their own log (float32 conductances, the same bytes: the replay re-serves the logged
values and logs them again), so the parameters must be equal exactly, not to a tolerance.
"""

from __future__ import annotations

import tomllib

import numpy as np
import pytest
from typer.testing import CliRunner

from calibration.data import CharacterizationPlan
from calibration.errors import ReplayDiverged
from calibration.run import characterize
from drivers.replay import ReplayDriver
from drivers.runlog import RunLogReader, RunLogWriter
from drivers.runlog.schema import RESERVED_ATTRS
from hil.cli import app

NARROW = {"COLUMNS": "30"}    # no message may depend on the terminal's width
LIVE = ["--devices", "300", "--pulses", "10", "--seed", "1", "--bootstrap", "4", "--drift-span", "2000",
        "--drift-reads", "8"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A characterization of the mock chip: its folder (calibration.h5, pcm.toml)."""
    out = tmp_path_factory.mktemp("cal") / "live"
    r = CliRunner(env=NARROW).invoke(app, ["characterize", "--out", str(out), *LIVE])
    assert r.exit_code == 0, r.output
    return out


def _pcm(folder) -> dict:
    return tomllib.loads((folder / "pcm.toml").read_text())["pcm"]


def test_characterize_over_a_replayed_log_fits_the_same_parameters(live, tmp_path):
    out = tmp_path / "replayed"
    # --seed (1) comes from the log; options given with the logged values are accepted
    r = CliRunner(env=NARROW).invoke(app, ["characterize", "--driver", f"replay:{live / 'calibration.h5'}",
                                           "--out", str(out), "--pulses", "10", "--bootstrap", "4"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[:2] == [
        f"replay of pcm-hil,MockDriver,1x300,seed=1 from {live / 'calibration.h5'}",
        "replaying the logged run: 300 devices from address 0, fit with --seed 1 --bootstrap 4"]
    assert f"the fitted parameters equal those of {live / 'pcm.toml'} (all 17)" in r.stdout
    assert _pcm(out) == _pcm(live)                     # every field, exactly
    with RunLogReader(live / "calibration.h5") as a, RunLogReader(out / "calibration.h5") as b:
        ra, rb = a.reads(), b.reads()
        for key in ("step", "t_s", "address", "conductance_us", "reason"):
            assert np.array_equal(ra[key], rb[key]), key
        assert a.attrs["calibration_drift_t_prog_s"] == b.attrs["calibration_drift_t_prog_s"]
        assert [p.program_id for _, _, p in a.programs()] == [p.program_id for _, _, p in b.programs()]


def _cut(src, dst, keep: int) -> None:
    """A copy of the log src with only its first `keep` reads and programs (in logged order), as a
    characterization killed there leaves it (verifying, with its plan and arrays)."""
    with RunLogReader(src) as r:
        attrs = {k: v for k, v in r.attrs.items() if k not in RESERVED_ATTRS}
        ev, reads = r.read_events(), r.reads()
        ops = sorted([(int(s), "read", i) for i, s in enumerate(ev["seq"])] +
                     [(int(e), "program", i) for i, e in enumerate(r.program_events()["seq"])])
        programs = r.programs()
        arrays = {n: r.array(n) for n in r.array_names()}
    with RunLogWriter(dst, attrs=attrs) as w:
        for name, data in arrays.items():
            w.write_array(name, data)
        for _, kind, i in ops[:keep]:
            if kind == "program":
                step, t, p = programs[i]
                w.log_program(step, p, t_s=t)
            else:
                s, n = int(ev["start"][i]), int(ev["count"][i])
                w.log_reads(int(ev["step"][i]), float(ev["t_s"][i]), reads["address"][s:s + n],
                            reads["conductance_us"][s:s + n], str(ev["reason"][i]))


def test_a_replay_whose_reads_run_out_says_where_and_leaves_nothing(live, tmp_path):
    cut = tmp_path / "cut.h5"
    # RESET, read, 16 noise reads, 10 x (pulse, read), 2 of the 16 noise reads after the train: 40 operations.
    _cut(live / "calibration.h5", cut, keep=40)
    out = tmp_path / "replayed"
    r = CliRunner(env=NARROW).invoke(app, ["characterize", "--driver", f"replay:{cut}", "--out", str(out)])
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]    # the rest: progress lines
    assert r.exit_code == 1 and len(lines) == 1 and r.stderr.splitlines()[-1] == lines[0], r.output
    assert lines[0] == (f"error: the replay of {cut} diverged at calibration step 29 (pulse response 100 uA x 50 ns): "
                        f"asked for a read of 300 devices, a read that was never logged: all 40 logged operations "
                        f"were replayed; nothing written ({out} not made)"), lines[0]
    assert not out.exists() and "Traceback" not in r.output


def test_a_plan_that_ends_before_the_log_does_is_named(live, tmp_path):
    """Two drift reads fewer than logged: every request is served, but the log has more (the library call)."""
    plan = CharacterizationPlan(n_pulses=10, drift_span_s=2000, drift_reads=8)
    drv = ReplayDriver(live / "calibration.h5")
    short = plan.model_copy(update={"drift_reads": 6})
    with pytest.raises(ReplayDiverged, match=r"ended at calibration step 49 with 2 of the log's 63 operations not "
                                             r"replayed \(the log's next: a read of 300 devices \(step 49, reason "
                                             r"'calibration-drift'\)\): the plan differs from the logged run's"):
        characterize(drv, np.arange(300), short, tmp_path / "short", bootstrap=4, seed=1)
    assert not (tmp_path / "short").exists()


def test_an_option_other_than_the_logged_plan_is_refused_before_anything(live, tmp_path):
    log = live / "calibration.h5"
    runner = CliRunner(env=NARROW)
    for args, line in ((["--pulses", "12"], "error: --pulses 12 differs from the logged run's 10"),
                       (["--devices", "400"], "error: --devices 400 differs from the logged run's 300"),
                       (["--no-drift"], "error: --drift/--no-drift False differs from the logged run's True")):
        r = runner.invoke(app, ["characterize", "--driver", f"replay:{log}", "--out", str(tmp_path / "x"), *args])
        assert r.exit_code == 2 and r.stderr.splitlines() == [
            f"{line}: a replay runs the logged plan (leave the option out, or give the logged value)"], r.output
        assert not (tmp_path / "x").exists()


def test_a_training_log_or_a_missing_file_is_one_line(tmp_path):
    train = tmp_path / "run.h5"
    with RunLogWriter(train, attrs={"driver_rows": 1, "driver_cols": 3}) as w:
        w.log_reads(0, 0.0, np.arange(3), np.ones(3, np.float32), "initial")
    runner = CliRunner(env=NARROW)
    r = runner.invoke(app, ["characterize", "--driver", f"replay:{train}", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and r.stderr.splitlines() == [
        f"error: {train} is a run log but not a calibration log (no 'calibration_plan' attribute): replay a training "
        f"run with `pcm-hil replay` or `pcm-hil train --driver replay:PATH`"], r.output
    r = runner.invoke(app, ["characterize", "--driver", f"replay:{tmp_path / 'none.h5'}", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and r.stderr.splitlines() == [
        f"error: cannot open driver 'replay:{tmp_path / 'none.h5'}': no run log at {tmp_path / 'none.h5'}"], r.output
    assert not (tmp_path / "x").exists()


def test_characterize_takes_a_visa_backend_and_a_missing_library_is_one_line(tmp_path):
    """--visa-backend reaches pyvisa (here a VISA library's path that is not there): one line, no folder."""
    lib = tmp_path / "no-such-libvisa.so"
    r = CliRunner(env=NARROW).invoke(app, ["characterize", "--driver", "TCPIP::127.0.0.1::1::SOCKET",
                                           "--visa-backend", str(lib), "--out", str(tmp_path / "x")])
    lines = r.stderr.splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith(f"error: cannot open driver 'TCPIP::127.0.0.1::1::SOCKET': cannot load VISA backend "
                               f"'{lib}'"), r.output
    assert not (tmp_path / "x").exists()
