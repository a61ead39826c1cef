"""pcm-hil sweep on a real local Ray instance: points, table and plots; a failing point; kill -9 and re-run;
refusals (a tester, a bad key) before anything starts.

One Ray instance serves the whole module (hil.sweep.ray_session, as the command starts it); the kill test's
sweep runs as `pcm-hil sweep` in a process of its own, with its own Ray, which it kills.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hil.sweep import SweepError, check_out_dir, load_sweep, ray_session, run_sweep

ROOT = Path(__file__).resolve().parent.parent

# Seconds-scale points: digits, a 16-unit hidden layer, a few hundred samples.
BASE = """
[base]
seed = 0
[base.data]
name = "digits"
train_limit = {train}
test_limit = 200
[base.network]
hidden = [16]
[base.update]
epochs = {epochs}
[base.checkpoint]
every_steps = {every}
audit = true
"""


def _write(path: Path, grid: str, *, seeds: str = "[0]", train: int = 300, epochs: int = 1, every: int = 5000,
           extra: str = "") -> Path:
    path.write_text(f"seeds = {seeds}\n{extra}" + BASE.format(train=train, epochs=epochs, every=every) + grid)
    return path


@pytest.fixture(scope="module")
def ray_local():
    with ray_session(None, 2) as session:
        yield session


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_grid_makes_points_table_and_plots(tmp_path, ray_local):
    spec = _write(tmp_path / "s.toml", '[grid]\n"update.lr" = [0.03, 0.1]\n')
    sweep = load_sweep(spec)
    assert [p.name for p in sweep.points] == ["lr=0.03,seed=0", "lr=0.1,seed=0"]
    out = tmp_path / "out"
    assert set(check_out_dir(sweep, out).values()) == {"new"}
    events = []
    res = run_sweep(sweep, out, on_event=lambda kind, r, _: events.append((kind, r.name)))
    assert not res.failed and [r.status for r in res.results] == ["finished", "finished"]
    for p in sweep.points:
        s = _summary(out / p.name)
        assert s["finished"] and s["metric"]["name"] == "test_accuracy"
        assert (out / p.name / "run.h5").is_file()
    assert sorted(k for k, _ in events) == ["finished", "finished", "start", "start"]

    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["point"] for r in rows] == ["lr=0.03,seed=0", "lr=0.1,seed=0"]
    assert [float(r["update.lr"]) for r in rows] == [0.03, 0.1]
    for r, p in zip(rows, sweep.points, strict=True):
        s = _summary(out / p.name)
        assert r["status"] == "finished" and r["seed"] == "0" and r["metric"] == "test_accuracy"
        assert r["baseline"] == ""  # no baseline = true
        assert float(r["value"]) == s["test_accuracy"] and int(r["set_pulses"]) == s["set_pulses"]
        assert int(r["refreshes"]) == s["refreshes"] and float(r["wall_s"]) > 0
    png = out / "sweep-update.lr.png"
    assert res.plots == [png] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # pcm-hil compare reads a sweep's points like any runs
    from analysis import compare_runs

    c = compare_runs([out / p.name for p in sweep.points])
    assert c.labels == [p.name for p in sweep.points]
    assert [k for k, _ in c.differences] == ["update.lr"]

    # the same sweep again: every point is finished, nothing runs, nothing changes
    before = {p.name: (out / p.name / "summary.json").read_bytes() for p in sweep.points}
    again = run_sweep(load_sweep(spec), out)
    assert [r.status for r in again.results] == ["skipped", "skipped"]
    assert [r.value for r in again.results] == [r.value for r in res.results]
    assert before == {p.name: (out / p.name / "summary.json").read_bytes() for p in sweep.points}


def test_a_failing_point_is_reported_and_the_others_finish(tmp_path, ray_local):
    # update.eps is checked against the network's layers only when the run starts: the second point fails there
    spec = _write(tmp_path / "s.toml", '[grid]\n"update.eps" = [[0.05, 0.05], [0.05]]\n"update.lr" = [0.05]\n')
    sweep = load_sweep(spec)
    good, bad = (p.name for p in sweep.points)
    res = run_sweep(sweep, tmp_path / "out")
    by = {r.name: r for r in res.results}
    assert by[good].status == "finished" and _summary(tmp_path / "out" / good)["finished"]
    assert by[bad].status == "failed" and [r.name for r in res.failed] == [bad]
    assert "\n" not in by[bad].error and "update.eps has 1 values" in by[bad].error
    assert not (tmp_path / "out" / bad).exists()  # refused before its folder was made
    rows = {r["point"]: r for r in csv.DictReader((tmp_path / "out" / "sweep.csv").open())}
    assert rows[bad]["status"] == "failed" and "update.eps has 1 values" in rows[bad]["error"]
    assert rows[good]["status"] == "finished"


def _session_processes(sid: int) -> list[int]:
    """Processes of the session sid (the killed sweep's Ray, if any survived)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            rest = stat[stat.rindex(")") + 2:].split()
            if int(rest[3]) == sid and rest[0] != "Z":
                out.append(int(d))
    return out


def ray_tmp() -> list[Path]:
    """The local Ray instances' temporary folders (hil.sweep makes them under /tmp)."""
    return sorted(Path("/tmp").glob("pcm-hil-ray-*"))


def _journal_seq(run_dir: Path) -> int:
    seqs = [int(m.group(1)) for f in run_dir.glob("journal-*.bin") if (m := re.match(r"journal-(\d+)\.bin", f.name))]
    return max(seqs, default=0)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
def test_kill_mid_sweep_then_rerun_skips_and_resumes(tmp_path, ray_local):
    from hil.resume import load_checkpoint
    from hil.run import start_run

    spec = _write(tmp_path / "s.toml", '[grid]\n"update.lr" = [0.03, 0.1]\n', train=600, epochs=2, every=50)
    sweep = load_sweep(spec)
    first, second = sweep.points
    out = tmp_path / "out"
    tmp_before = ray_tmp()
    proc = subprocess.Popen([sys.executable, "-m", "hil.cli", "sweep", str(spec), "--out", str(out), "--workers", "1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, COLUMNS="80"))
    try:
        # kill -9 once the first point is finished and the second has checkpointed past its start
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline and not (
                (out / first.name / "summary.json").exists() and _journal_seq(out / second.name) >= 3):
            time.sleep(0.02)
        assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.stderr.read()}"
        assert not (out / second.name / "summary.json").exists(), "the second point finished before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Ray's processes go with it (the reaper kills what outlives the sweep's process)
        deadline = time.monotonic() + 30
        while _session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _session_processes(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pid in _session_processes(proc.pid):  # tidy up before failing, by id: the processes this test started
        os.kill(pid, signal.SIGKILL)
    assert left == [], "processes of the killed sweep survived it"
    assert not [d for d in ray_tmp() if d not in tmp_before], "the killed sweep left Ray's temporary folder"
    finished_before = (out / first.name / "summary.json").read_bytes()

    res = run_sweep(load_sweep(spec), out)
    by = {r.name: r for r in res.results}
    assert by[first.name].status == "skipped" and not by[first.name].resumed
    assert (out / first.name / "summary.json").read_bytes() == finished_before
    assert by[second.name].status == "finished" and by[second.name].resumed, by[second.name].error

    # the resumed point against the same point run without a kill: every sample trained once, the same steps
    # and epochs; and its accounting exact: chi + eps * net SET pulses equals the float64 sum of every update
    ref = start_run(second.cfg, tmp_path / "uninterrupted")
    got = _summary(out / second.name)
    for k in ("finished", "epochs", "steps", "samples_trained"):
        assert got[k] == ref[k], k
    meta, arrays = load_checkpoint(out / second.name)
    for i, eps in enumerate(meta["eps"]):
        np.testing.assert_allclose(arrays[f"chi{i}"] + eps * arrays[f"net{i}"], arrays[f"total{i}"],
                                   rtol=0, atol=1e-9)
    rows = {r["point"]: r for r in csv.DictReader((out / "sweep.csv").open())}
    assert rows[first.name]["status"] == "skipped" and rows[second.name]["resumed"] == "true"


def _refused(tmp_path: Path, spec: Path) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "hil.cli", "sweep", str(spec), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, COLUMNS="60"), timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()
    return r


def test_a_tester_config_is_refused(tmp_path):
    spec = _write(tmp_path / "s.toml", '[base.driver]\nkind = "visa"\nresource = "TCPIP::127.0.0.1::5025::SOCKET"\n'
                                       '[grid]\n"update.lr" = [0.03, 0.1]\n')
    r = _refused(tmp_path, spec)
    assert "real tester" in r.stderr and "simulated chips only" in r.stderr
    # a grid that makes one point a tester is refused the same way, naming the point
    spec = _write(tmp_path / "t.toml", '[grid]\n"driver.kind" = ["mock", "serial"]\n'
                                       '"driver.resource" = ["socket://127.0.0.1:5025"]\n')
    with pytest.raises(SweepError, match=r"^point kind=serial,resource=socket-.*real tester"):
        load_sweep(spec)


@pytest.mark.parametrize("grid, message", [
    ('"update.lrr" = [0.1]', r"^point lrr=0\.1,seed=0: update\.lrr: unknown key \(did you mean 'lr'\?\)$"),
    ('"update.lr" = [0.1, 20.0]', r"^point lr=20\.0,seed=0: update\.lr: Input should be less than or equal to 10$"),
    ('"seed" = [1, 2]', r"seed.*top-level seeds"),
    ('"update.lr" = []', r"'update\.lr' must be a non-empty list"),
])
def test_a_bad_key_or_value_is_refused_before_anything_starts(tmp_path, grid, message):
    spec = _write(tmp_path / "s.toml", f"[grid]\n{grid}\n")
    with pytest.raises(SweepError, match=message) as e:
        load_sweep(spec)
    assert "\n" not in str(e.value)


def test_the_command_refuses_a_bad_key_in_one_line(tmp_path):
    spec = _write(tmp_path / "s.toml", '[grid]\n"update.lrr" = [0.1]\n')
    r = _refused(tmp_path, spec)
    assert "point lrr=0.1,seed=0: update.lrr: unknown key" in " ".join(r.stderr.split())


def test_random_samples_are_seeded_and_named_by_their_values(tmp_path):
    # an unquoted dotted key is a nested table in TOML: the same key
    spec = _write(tmp_path / "s.toml", '[grid]\nnetwork.hidden = [[8], [16]]\n'
                                       '[random]\nsamples = 3\nseed = 4\n[random.keys]\n'
                                       '"update.lr" = { log_uniform = [0.01, 0.3] }\n', seeds="[0, 1]")
    a, b = load_sweep(spec), load_sweep(spec)
    assert [p.name for p in a.points] == [p.name for p in b.points] and len(a.points) == 3 * 2 * 2
    for p in a.points:
        lr = p.values["update.lr"]
        assert 0.01 <= lr <= 0.3 and p.cfg.update.lr == lr and p.cfg.seed == p.seed
        assert p.name == f"hidden={p.values['network.hidden'][0]},lr={lr!r},seed={p.seed}"
