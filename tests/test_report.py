"""`pcm-hil report` and `pcm-hil compare` (analysis/) on a finished, a killed and a live run, and report.html in a
real browser (headless Chromium: loads it from disk, every image decoded, no console message, a non-blank screenshot).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from analysis import AnalysisError, compare_runs, load_run, write_report
from analysis.report import CSP, HTML_FILE

ROOT = Path(__file__).resolve().parent.parent
#: A folder name longer than any terminal line, with text rich would take for markup.
AWKWARD = "a-run-folder-name-that-no-terminal-line-holds-" * 2 + "[bold]x[red] [0.5]"
TRAIN_FIGURES = ("accuracy.png", "pulses.png", "refreshes.png", "conductance.png", "weights.png", "endurance.png")
#: A digits run long enough to be caught mid-write (3 epochs of the full digits set take a few seconds).
TRAIN_ARGS = ["--data", "digits", "--set", "network.hidden=[16]", "--set", "logging.flush_interval_s=0.2",
              "--set", "checkpoint.every_steps=100", "--baseline"]


def cli(*args: str, columns: int = 80, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hil.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, COLUMNS=str(columns)))


def no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr


def train(run_dir: Path, epochs: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hil.cli", "train", *TRAIN_ARGS, "--epochs", str(epochs),
                             "--out", str(run_dir)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, COLUMNS="120"))


def wait_for(proc: subprocess.Popen, cond, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def logged_epochs(run_dir: Path) -> int:
    from drivers.runlog import RunLogReader

    if not (run_dir / "run.h5").exists():
        return 0
    try:
        with RunLogReader(run_dir / "run.h5") as r:
            m = r.metrics()
    except Exception:  # noqa: BLE001 - the log may be mid-creation
        return 0
    return int(np.isfinite(m["epoch"]).sum()) if "epoch" in m else 0


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    from hil.config import RunConfig
    from hil.run import start_run

    run_dir = tmp_path_factory.mktemp("report") / AWKWARD
    cfg = RunConfig().with_overrides(**{"data.name": "digits", "network.hidden": [16], "update.epochs": 2,
                                        "data.train_limit": 300})
    start_run(cfg, run_dir, baseline=True)
    return run_dir


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    from hil.config import RunConfig
    from hil.run import start_run

    run_dir = tmp_path_factory.mktemp("report") / "lr-0.05"
    cfg = RunConfig().with_overrides(**{"data.name": "digits", "network.hidden": [16], "update.epochs": 2,
                                        "data.train_limit": 300, "update.lr": 0.05, "seed": 3})
    start_run(cfg, run_dir, baseline=False)
    return run_dir


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """`pcm-hil train` killed with SIGKILL once its log holds an epoch (its checkpoint exists by then)."""
    run_dir = tmp_path_factory.mktemp("report") / "killed"
    proc = train(run_dir, epochs=30)
    try:
        wait_for(proc, lambda: (run_dir / "checkpoint.npz").exists() and logged_epochs(run_dir) >= 1, "first epoch")
    finally:
        proc.kill()
        proc.wait()
    assert not (run_dir / "summary.json").exists()
    return run_dir


# ---------------------------------------------------------------------------------------------- report
@pytest.mark.parametrize("columns", [30, 250])
def test_report_finished_run(finished, tmp_path, columns):
    out = tmp_path / ("o" * 120) / "report"
    r = cli("report", str(finished), "--out", str(out), columns=columns)
    assert r.returncode == 0, r.stdout + r.stderr
    no_traceback(r)
    summary = json.loads((finished / "summary.json").read_text())
    lines = r.stdout.splitlines()
    # soft wrap: the table at its natural width, every row on one line, paths unbroken
    row = {ln.split("│")[1].strip(): ln.split("│")[2].strip() for ln in lines if ln.count("│") == 3}
    assert row["state"] == "finished"
    assert row["epochs"] == "2 of 2"
    assert row["steps"] == f"{summary['steps']:,}"
    assert row["SET pulses"] == f"{summary['set_pulses']:,}" and row["RESET pulses"] == f"{summary['reset_pulses']:,}"
    assert row["refreshed pairs"] == f"{summary['refreshes']:,}"
    assert row["test accuracy (chip, last epoch)"] == f"{summary['test_accuracy']:.4f}"
    assert row["test accuracy (baseline)"] == f"{summary['baseline_test_accuracy']:.4f}"
    assert f"report: {out / HTML_FILE}" in lines
    # the trainer logs the baseline's epochs (baseline_epoch, baseline_test_accuracy): they are drawn, no note
    assert "per-epoch accuracy is not in the run log" not in r.stdout
    assert list(load_run(finished).baseline_epochs["epoch"]) == [1.0, 2.0]
    for name in TRAIN_FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (out / HTML_FILE).read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == len(TRAIN_FIGURES)
    assert not re.search(r'(src|href)="(?!data:)', page), "report.html must not load anything"
    assert CSP in page


def test_report_default_folder_and_api(finished):
    rep = write_report(finished)
    assert rep.out == finished / "report" and rep.html.is_file()
    run = rep.run
    s = json.loads((finished / "summary.json").read_text())
    assert (run.set_pulses, run.reset_pulses, run.refreshes) == (s["set_pulses"], s["reset_pulses"], s["refreshes"])
    assert run.pulses_per_device.sum() == s["set_pulses"] + s["reset_pulses"]
    assert list(run.epochs["epoch"]) == [1.0, 2.0]
    assert [f.reason for f in run.full_reads] == ["initial", "evaluation", "evaluation"]
    # the weights at the end: the last read of every device, through the mapping and beta
    assert len(run.layers) == 2 and all(np.isfinite(lm.weights(run.final_g)).all() for lm in run.layers)
    last = run.full_reads[-1]
    g = np.full(run.n_devices, np.nan)
    g[last.addresses] = last.g_us
    np.testing.assert_array_equal(run.final_g[last.addresses], g[last.addresses])
    again = write_report(finished)  # a second report replaces the first
    assert again.html.read_text().count("<img") == len(TRAIN_FIGURES)
    assert not [p for p in (finished / "report").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_report_killed_run(killed):
    r = cli("report", str(killed))
    assert r.returncode == 0, r.stdout + r.stderr
    no_traceback(r)
    assert "stopped without finishing (killed or crashed" in r.stdout and "resumable" in r.stdout
    run = load_run(killed)
    assert run.epochs_done >= 1 and run.prog_step.size and run.full_reads[0].reason == "initial"
    for name in TRAIN_FIGURES:
        assert (killed / "report" / name).stat().st_size > 0


@pytest.mark.slow
def test_report_and_compare_live_run(finished, tmp_path):
    run_dir = tmp_path / "live"
    proc = train(run_dir, epochs=200)
    try:
        wait_for(proc, lambda: logged_epochs(run_dir) >= 1, "first epoch")
        r = cli("report", str(run_dir), columns=200)
        c = cli("compare", str(finished), str(run_dir), "--out", str(tmp_path / "live.png"), columns=200)
        assert proc.poll() is None, "the run must still be writing while the report is taken"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert r.returncode == 0, r.stdout + r.stderr
    no_traceback(r)
    assert "being written (live" in r.stdout
    assert (run_dir / "report" / HTML_FILE).is_file()
    assert c.returncode == 0, c.stdout + c.stderr
    live_row = next(ln for ln in c.stdout.splitlines() if ln.startswith("│ live "))
    assert live_row.split("│")[2].strip() == "live", c.stdout


@pytest.mark.slow
def test_report_calibration_log(tmp_path):
    out = tmp_path / "chip"
    r = cli("characterize", "--devices", "300", "--pulses", "10", "--out", str(out), "--seed", "1", "--bootstrap",
            "4", "--drift-span", "2000", "--drift-reads", "8")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("report", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    no_traceback(r)
    assert "calibration (pcm-hil characterize)" in r.stdout
    names = {p.name for p in (out / "report").iterdir()}
    assert {"pulse_response.png", "increments.png", "drift.png", "read_noise.png", "endurance.png", HTML_FILE} <= names
    assert (out / "report" / "increments.png").read_bytes() == (out / "increments.png").read_bytes()
    c = cli("compare", str(out), str(out))
    assert c.returncode != 0 and "compare takes training runs" in c.stderr
    no_traceback(c)


@pytest.mark.parametrize("case", ["missing", "empty", "not-h5", "garbage-log", "one-run", "out-is-file"])
def test_errors_are_one_line(case, tmp_path, finished):
    d = tmp_path / "d"
    args: list[str]
    if case == "missing":
        args, want = ["report", str(d)], "does not exist"
    elif case == "empty":
        d.mkdir()
        args, want = ["report", str(d)], "is not a run folder: it has no run.h5"
    elif case == "not-h5":
        d.write_text("x")
        args, want = ["report", str(d)], "is not a run folder or a run log"
    elif case == "garbage-log":
        d.mkdir()
        (d / "run.h5").write_bytes(b"not hdf5 at all" * 100)
        args, want = ["report", str(d)], "run.h5"
    elif case == "one-run":
        args, want = ["compare", str(finished)], "compare takes two or more runs"
    else:
        d.write_text("x")
        args, want = ["report", str(finished), "--out", str(d)], "exists and is not a folder"
    r = cli(*args, columns=30)
    assert r.returncode == (1 if case == "garbage-log" else 2), r.stderr
    no_traceback(r)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and want in err[0], r.stderr


# ---------------------------------------------------------------------------------------------- compare
@pytest.mark.parametrize("columns", [30, 250])
def test_compare(finished, other, killed, tmp_path, columns):
    png = tmp_path / "curves.png"
    r = cli("compare", str(finished), str(other), str(killed), "--out", str(png), columns=columns)
    assert r.returncode == 0, r.stdout + r.stderr
    no_traceback(r)
    assert png.read_bytes()[:4] == b"\x89PNG"
    rows = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:-1]]
            for ln in r.stdout.splitlines() if ln.startswith("│")}
    s = json.loads((finished / "summary.json").read_text())
    a = rows[AWKWARD]
    assert a[:4] == ["finished", f"{s['test_accuracy']:.4f}", f"{s['baseline_test_accuracy']:.4f}", "2/2"]
    assert a[4:8] == [f"{s['steps']:,}", f"{s['set_pulses']:,}", f"{s['reset_pulses']:,}", f"{s['refreshes']:,}"]
    assert a[8] == f"{s['us_per_sample']:,.1f}"  # any machine speed: 1,430.2 as well as 658.8
    assert rows["lr-0.05"][2] == "-"  # no baseline
    assert rows["killed"][0] == "killed" and rows["killed"][-1] == "-"
    # the config differences: dotted keys, one column per run
    assert rows["update.lr"][1] == "0.05" and rows["update.lr"][0] == rows["update.lr"][2]
    assert rows["seed"][1] == "3"
    assert rows["update.epochs"] == ["2", "2", "30"]
    assert "data.train_limit" in rows and rows["data.train_limit"][2] == "-"


def test_compare_api(finished, other):
    c = compare_runs([finished, other])
    keys = dict(c.differences)
    assert keys["seed"][1] == "3" and keys["update.lr"][1] == "0.05"
    assert "data.name" not in keys
    with pytest.raises(AnalysisError, match="two or more"):
        compare_runs([finished])


# ---------------------------------------------------------------------------------------------- the browser
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium not found (Debian: apt-get install -y chromium): report.html not opened in a browser")


def _browse(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=120)


def _console_messages(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@pytest.mark.slow
def test_report_in_a_real_browser(finished, tmp_path):
    chromium = _chromium()
    out = tmp_path / "a folder with spaces & 'quotes'" / "report"
    rep = write_report(finished, out)
    page = rep.html.read_text()
    # A copy with a script that writes each image's state into the DOM once the page has loaded (the report
    # itself has no script and its policy allows none: the copy's policy allows this inline one).
    probe = out / "probe.html"
    probe.write_text(page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
                     .replace("</body>", "<script>window.addEventListener('load', () => document.body.setAttribute("
                              "'data-images', [...document.images].map(i => i.complete + ':' + i.naturalWidth + 'x'"
                              " + i.naturalHeight).join(' ')));</script></body>"))
    r = _browse(chromium, tmp_path / "profile", "--dump-dom", probe.as_uri())
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r'data-images="([^"]*)"', r.stdout)
    assert m, f"the page did not finish loading: {r.stdout[:500]} {r.stderr[-2000:]}"
    images = m.group(1).split()
    assert len(images) == len(rep.figures) == len(TRAIN_FIGURES)
    for state, f in zip(images, rep.figures, strict=True):
        done, size = state.split(":")
        w, h = (int(x) for x in size.split("x"))
        assert done == "true" and w > 100 and h > 100, (f.file, state)
    assert not _console_messages(r.stderr), _console_messages(r.stderr)

    shot = tmp_path / "shot.png"
    r = _browse(chromium, tmp_path / "profile", "--hide-scrollbars", "--window-size=1280,2400",
                f"--screenshot={shot}", rep.html.as_uri())
    assert r.returncode == 0 and shot.is_file(), r.stderr[-3000:]
    assert not _console_messages(r.stderr), _console_messages(r.stderr)
    import matplotlib.image as mpimg

    px = mpimg.imread(shot)[..., :3]
    assert px.shape[0] >= 2000 and px.shape[1] >= 1200
    ink = (px < 0.9).any(axis=2)
    assert ink.mean() > 0.03, "the screenshot is (nearly) blank"
    # figures drawn, not only text: many distinct colours
    assert len(np.unique((px[ink] * 255).astype(np.uint8), axis=0)) > 100
