"""`pcm-hil replay RUN_DIR --out NEW_DIR` and `--driver replay:PATH/run.h5` (issue 11): a replay of an unchanged
run reproduces it program for program and metric for metric; a changed setting stops at the first step it moves,
named with its program id; a read the log lacks is named as such; what cannot be replayed is one line, no NEW_DIR."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from drivers.runlog import RunLogReader, RunLogWriter
from hil.cli import app
from hil.config import RunConfig
from hil.replay import ReplayDiverged, ReplayRefused, replay_run
from hil.run import resume_run, start_run

TINY = {"data.name": "digits", "network.hidden": [16], "update.epochs": 2, "data.train_limit": 200}
CNN = {"data.name": "digits", "network.kind": "cnn", "network.cnn.channels": [8], "network.cnn.kernel": 3,
       "network.cnn.padding": 1, "network.cnn.fc": [], "update.lr": 0.03, "mapping.w_max": [1.0],
       "update.epochs": 1, "data.train_limit": 120, "data.test_limit": 100}


def _run(where: Path, **over) -> Path:
    start_run(RunConfig().with_overrides(**{**TINY, **over}), where, baseline=False)
    return where


def _cli(*args: str):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("orig") / "run")


def _programs(path: Path) -> list[tuple]:
    with RunLogReader(path) as r:
        return [(s, t, p.program_id, p.addresses.tolist(), p.set_counts.tolist(), p.reset.tolist())
                for s, t, p in r.programs()]


def _reads(path: Path) -> dict[str, np.ndarray]:
    with RunLogReader(path) as r:
        return r.reads()


def _epoch_metrics(path: Path) -> list[dict[str, float]]:
    with RunLogReader(path) as r:
        m = r.metrics()
    keys = ("epoch", "test_accuracy", "train_accuracy", "set_pulses", "reset_pulses", "refreshes", "programs_applied")
    return [{k: float(m[k][i]) for k in keys} for i in np.flatnonzero(~np.isnan(m["epoch"]))] if "epoch" in m else []


def _same_run(a: Path, b: Path, min_programs: int = 100) -> None:
    """The two runs' logs hold the same programs, reads and per-epoch metrics, and their summaries agree."""
    pa, pb = _programs(a / "run.h5"), _programs(b / "run.h5")
    assert len(pa) > min_programs and pa == pb
    ra, rb = _reads(a / "run.h5"), _reads(b / "run.h5")
    for k in ("step", "t_s", "address", "conductance_us", "reason"):
        assert np.array_equal(ra[k], rb[k]), k
    assert _epoch_metrics(a / "run.h5") == _epoch_metrics(b / "run.h5")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for k in ("test_accuracy", "steps", "programs_applied", "set_pulses", "reset_pulses", "refreshes", "reads_logged"):
        assert sa[k] == sb[k], k


def test_replay_of_an_unchanged_run_reproduces_it(run, tmp_path):
    new = tmp_path / "new"
    rows = []
    res = replay_run(run, new, on_epoch=lambda logged, got: rows.append((logged, got)))
    _same_run(run, new)
    s = json.loads((run / "summary.json").read_text())
    assert res.steps == s["steps"] == 400 and res.programs == s["programs_applied"] == len(_programs(run / "run.h5"))
    assert res.read_events == s["read_calls"] and res.device_reads == s["reads_logged"]
    assert [got for _, got in rows] == [{k: v for k, v in m.items()} for m in _epoch_metrics(run / "run.h5")]
    with RunLogReader(new / "run.h5") as r:     # NEW_DIR is a run directory whose chip was the log
        assert r.attrs["driver_identity"].startswith("replay of ") and str(run / "run.h5") in r.attrs["driver_identity"]
    assert 'kind = "replay"' in (new / "config.toml").read_text()


def test_the_cli_prints_each_epoch_and_what_it_compared(run, tmp_path):
    r = _cli("replay", run, "--out", tmp_path / "new")
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    acc = _epoch_metrics(run / "run.h5")
    for i, m in enumerate(acc, 1):
        assert f"epoch {i}: test accuracy {m['test_accuracy']:.4f} (logged {m['test_accuracy']:.4f})" in out
    assert "reproduced: every program and metric" in out and r.stderr == ""


def _first_difference(a: list[tuple], b: list[tuple]) -> tuple[int, int]:
    """(step, program id) of b's first program that differs from a's (time aside)."""
    for x, y in zip(a, b):
        if (x[0],) + x[2:] != (y[0],) + y[2:]:
            return y[0], y[2]
    raise AssertionError("no program differs")


def test_a_changed_learning_rate_stops_at_the_first_diverging_step(run, tmp_path):
    other = _run(tmp_path / "other", **{"update.lr": 0.05})   # what that lr really does on the same chip
    step, pid = _first_difference(_programs(run / "run.h5"), _programs(other / "run.h5"))
    assert step > 0      # the probe-free initial programming is the same; the updates differ
    r = _cli("replay", run, "--out", tmp_path / "new", "--set", "update.lr=0.05")
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and r.stdout.count("error") == 0, r.output
    assert lines[0].startswith(f"error: replay diverged at step {step}, program {pid}: program {pid} differs"), lines
    assert (tmp_path / "new" / "run.h5").exists()      # kept for a look, named in the line
    assert f"(the replay so far is in {tmp_path / 'new'})" in lines[0]


def test_a_read_the_replay_makes_but_the_log_lacks_is_named(run, tmp_path):
    # An extra periodic read of the whole array at step 50: the log never had it.
    with pytest.raises(ReplayDiverged, match=r"^replay diverged at step 50: asked for a read of \d+ devices, a read "
                                             r"that was never logged: the log's next operation \(\d+\) is program \d+"
                                             r" \(step 5\d\)") as e:
        replay_run(run, tmp_path / "new", overrides={"read_policy.every_steps": 50})
    assert e.value.step == 50 and e.value.program_id is None


def _copy_without_read(src: Path, dst: Path, drop: int, metric=None) -> tuple[int, str]:
    """RUN_DIR src copied to dst with read event `drop` left out of its log (written afresh, so it verifies);
    metric(step, values) may change a metrics record on the way."""
    dst.mkdir()
    for f in ("config.toml", "summary.json"):
        shutil.copy(src / f, dst / f)
    with RunLogReader(src / "run.h5") as r:
        from drivers.runlog.schema import RESERVED_ATTRS
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in r.attrs.items() if k not in RESERVED_ATTRS}
        ev, progs, m = r.read_events(), r.programs(), r.metrics()
        pev = r.program_events()
        arrays = {n: r.array(n) for n in r.array_names()}
        ops = sorted([(int(s), 0, i) for i, s in enumerate(ev["seq"])] + [(int(s), 1, i) for i, s in enumerate(pev["seq"])])
        with RunLogWriter(dst / "run.h5", attrs=attrs) as w:
            for n, a in arrays.items():
                w.write_array(n, a)
            for _, kind, i in ops:
                if kind == 1:
                    step, t, p = progs[i]
                    w.log_program(step, p, t, float(pev["wall_s"][i]))
                elif i != drop:
                    s, c = int(ev["start"][i]), int(ev["count"][i])
                    a, g = r.read_devices(s, s + c)
                    w.log_reads(int(ev["step"][i]), float(ev["t_s"][i]), a, g, str(ev["reason"][i]), float(ev["wall_s"][i]))
            names = [k for k in m if k not in ("step", "wall_s")]
            for j in range(len(m["step"])):
                values = {k: float(m[k][j]) for k in names if not np.isnan(m[k][j])}
                if metric is not None:
                    metric(int(m["step"][j]), values)
                w.log_metrics(int(m["step"][j]), **values)
    return int(ev["step"][drop]), str(ev["reason"][drop])


def test_a_read_removed_from_the_log_is_a_read_that_was_never_logged(run, tmp_path):
    with RunLogReader(run / "run.h5") as r:
        ev = r.read_events()
    drop = int(np.flatnonzero((ev["reason"] == "after-program") & (ev["step"] >= 30))[0])
    cut = tmp_path / "cut"
    step, reason = _copy_without_read(run, cut, drop)
    replay_run(run, tmp_path / "control")                # the copy machinery itself is faithful: see below
    shutil.rmtree(tmp_path / "control")
    r = _cli("replay", cut, "--out", tmp_path / "new")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
    line = r.stderr.strip()
    assert line.startswith(f"error: replay diverged at step {step}") and "a read that was never logged" in line, line
    assert reason == "after-program"


def test_a_faithful_copy_of_the_log_replays(run, tmp_path):
    """The copy of the test above with nothing left out replays exactly (so its divergence is the missing read)."""
    same = tmp_path / "same"
    _copy_without_read(run, same, drop=-1)
    replay_run(same, tmp_path / "new")
    assert _programs(tmp_path / "new" / "run.h5") == _programs(run / "run.h5")


def test_a_metric_that_differs_from_the_log_is_named(run, tmp_path):
    def bump(step, values):
        if values.get("epoch") == 1.0:
            values["test_accuracy"] += 0.01
    _copy_without_read(run, tmp_path / "tampered", drop=-1, metric=bump)
    acc = _epoch_metrics(run / "run.h5")[0]
    with pytest.raises(ReplayDiverged, match=rf"^replay diverged at step 200: "
                                             rf"epoch 1: test_accuracy is {acc['test_accuracy']:.10g}, logged "
                                             rf"{acc['test_accuracy'] + 0.01:.10g}"):
        replay_run(tmp_path / "tampered", tmp_path / "new")
    # a record only the log holds (the replay never made it) is named after the run, with its step and names
    _copy_without_read(run, tmp_path / "more", drop=-1,
                       metric=lambda step, values: values.update(extra=1.0) if step == 400 and "epoch" in values else None)
    with pytest.raises(ReplayDiverged, match=r"metrics record \d+: extra is absent, logged 1"):
        replay_run(tmp_path / "more", tmp_path / "new2")


def test_a_replay_numbers_its_programs_as_the_logged_run_did(tmp_path):
    """A run on a tester starts above the chip's last program id; so does a run on the replay of its log."""
    from drivers import LoggedDriver, MockDriver, PulseProgram
    from drivers.replay import ReplayDriver

    path = tmp_path / "run.h5"
    with RunLogWriter(path) as w:
        d = LoggedDriver(MockDriver(4, 4), w)
        d.read()
        d.apply(PulseProgram(501, np.array([1, 2]), np.array([1, 2]), np.zeros(2, bool)))
    with ReplayDriver(path) as r:
        assert r.last_program_id() == 500
        r.read()
        r.apply(PulseProgram(501, np.array([1, 2]), np.array([1, 2]), np.zeros(2, bool)))
        assert r.last_program_id() == 501 and r.remaining == 0 and r.replayed == 2


def test_train_with_the_replay_driver(run, tmp_path):
    new = tmp_path / "new"
    r = _cli("train", "--driver", f"replay:{run / 'run.h5'}", "--config", run / "config.toml", "--out", new)
    assert r.exit_code == 0, r.output
    _same_run(run, new)
    # a changed setting: the replay driver names the program, and a replay is not offered as resumable
    bad = tmp_path / "bad"
    r = _cli("train", "--driver", f"replay:{run / 'run.h5'}", "--config", run / "config.toml", "--out", bad,
             "--set", "update.lr=0.05")
    assert r.exit_code == 2 and "differs from the log's next program" in r.output and "resumable" not in r.output
    r = _cli("train", "--resume", new)
    assert r.exit_code == 2 and "a replay is not resumed" in r.output and "resumable" not in r.output
    r = _cli("train", "--driver", f"replay:{tmp_path / 'none.h5'}", "--config", run / "config.toml", "--out",
             tmp_path / "none")
    assert r.exit_code == 2 and "no run log at" in r.output and not (tmp_path / "none").exists()


def test_what_cannot_be_replayed_is_one_line_and_leaves_no_new_dir(run, tmp_path):
    killed = tmp_path / "killed"
    shutil.copytree(run, killed)
    (killed / "summary.json").unlink()
    resumed = tmp_path / "resumed"
    start_run(RunConfig().with_overrides(**TINY), resumed, stop_after_steps=150)
    resume_run(resumed)
    (tmp_path / "exists").mkdir()
    cases = [
        ((tmp_path / "nothing", tmp_path / "n1"), "is not a pcm-hil run directory"),
        ((run, tmp_path / "exists"), "already exists"),
        ((killed, tmp_path / "n2"), "has no summary.json: the run was killed or is still running"),
        ((resumed, tmp_path / "n3"), "was resumed (its log holds 1 'resume' read(s))"),
    ]
    for (src, out), msg in cases:
        r = _cli("replay", src, "--out", out)
        assert r.exit_code == 2 and r.stdout == "", r.output
        assert len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr
        assert out.name == "exists" or not out.exists()
    for bad, msg in (("driver.kind=mock", "a replay's driver is the run's log"),
                     ("update.lrr=1", "update.lrr: unknown key")):
        r = _cli("replay", run, "--out", tmp_path / "n4", "--set", bad)
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr
        assert not (tmp_path / "n4").exists()
    with pytest.raises(ReplayRefused):
        replay_run(resumed, tmp_path / "n5")


def test_a_stopped_run_replays_up_to_where_it_stopped(tmp_path):
    run = tmp_path / "run"
    start_run(RunConfig().with_overrides(**TINY), run, stop_after_steps=130)
    res = replay_run(run, tmp_path / "new")
    assert res.steps == 130 and not res.summary["finished"]
    _same_run(run, tmp_path / "new", min_programs=50)


def test_eps_auto_replays_with_its_probe_reads(tmp_path):
    run = _run(tmp_path / "run", **{"update.eps": "auto", "update.epochs": 1})
    with RunLogReader(run / "run.h5") as r:
        assert (r.read_events()["reason"] == "probe").sum() >= 20
    replay_run(run, tmp_path / "new")
    _same_run(run, tmp_path / "new")
    with RunLogReader(tmp_path / "new" / "run.h5") as a, RunLogReader(run / "run.h5") as b:
        assert a.attrs["response_probe_json"] == b.attrs["response_probe_json"]


def test_a_cnn_run_replays_exactly(tmp_path):
    run = tmp_path / "cnn"
    start_run(RunConfig().with_overrides(**CNN), run, baseline=False)
    res = replay_run(run, tmp_path / "new")
    assert res.epochs == 1 and res.programs > 50
    _same_run(run, tmp_path / "new", min_programs=50)
    with RunLogReader(tmp_path / "new" / "run.h5") as r:
        assert r.attrs["network_kind"] == "cnn"
