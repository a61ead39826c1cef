"""`pcm-hil watch`: a finished run once, a live run followed to its end (SWMR, never blocking the writer)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hil.config import RunConfig
from hil.run import start_run

ROOT = Path(__file__).resolve().parent.parent


def _watch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hil.cli", "watch", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, COLUMNS="200"))


def _rows(text: str) -> list[dict[str, str]]:
    """Each printed table as {quantity: value}."""
    tables: list[dict[str, str]] = []
    for line in text.splitlines():
        if line.startswith("pcm-hil watch:"):
            tables.append({})
        elif line.count("│") == 3 and tables:
            _, k, v, _ = line.split("│")
            tables[-1][k.strip()] = v.strip()
    return tables


def test_watch_once_on_a_finished_run(tmp_path: Path) -> None:
    cfg = RunConfig().with_overrides(**{"data.name": "digits", "network.hidden": [16], "update.epochs": 2,
                                        "data.train_limit": 300})
    s = start_run(cfg, tmp_path / "run", baseline=True)
    r = _watch(str(tmp_path / "run"), "--once")
    assert r.returncode == 0, r.stderr
    (t,) = _rows(r.stdout)
    assert t["state"] == "finished" and t["step"] == f"{s['steps']:,}"
    assert t["SET pulses"] == f"{s['set_pulses']:,}" and t["RESET pulses"] == f"{s['reset_pulses']:,}"
    assert t["programs"] == f"{s['programs_applied']:,}"
    assert t["refreshed pairs"] == f"{s['refreshes']:,}"
    assert t["running accuracy"].endswith("(epoch 2)")  # logged at step 500 of 600
    assert t["epoch 2"].startswith(f"test {s['test_accuracy']:.4f}")
    assert f"baseline {s['baseline_test_accuracy']:.4f}" in t["epoch 2"]


def test_watch_follows_a_live_run_to_its_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train = subprocess.Popen([sys.executable, "-m", "hil.cli", "train", "--data", "digits", "--epochs", "3",
                              "--set", "network.hidden=[16]", "--set", "logging.flush_interval_s=0.2",
                              "--out", str(run)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "run.h5").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        w = _watch(str(run), "--every", "0.3")
        _, err = train.communicate(timeout=300)
    finally:
        if train.poll() is None:
            train.kill()
    assert train.returncode == 0, err
    assert w.returncode == 0, w.stderr
    tables = _rows(w.stdout)
    states = [t["state"] for t in tables]
    assert "being written" in states and states[-1] in ("finished", "stopped")
    steps = [int(t["step"].replace(",", "")) for t in tables]
    assert steps == sorted(steps) and steps[-1] > steps[0]
    summary = json.loads((run / "summary.json").read_text())
    # the last table was taken once the writer had let go: it shows the whole run
    assert steps[-1] == summary["steps"]
    assert tables[-1]["SET pulses"] == f"{summary['set_pulses']:,}"
    assert any(re.fullmatch(r"[\d,]+", t["samples/s"]) for t in tables[1:])


@pytest.mark.parametrize("args, match", [(["nowhere"], "nowhere does not exist"),
                                         (["--every", "0", "x"], "--every")])
def test_watch_bad_input_is_one_line(args: list[str], match: str) -> None:
    r = _watch(*args)
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr + r.stdout


def test_watch_html_once_writes_the_report(tmp_path: Path) -> None:
    start_run(RunConfig().with_overrides(**{"data.name": "digits", "network.hidden": [8], "data.train_limit": 100}),
              tmp_path / "run")
    r = _watch(str(tmp_path / "run"), "--html", "--once")
    assert r.returncode == 0, r.stderr
    html = tmp_path / "run" / "report" / "report.html"
    assert html.is_file() and f"{html}" in r.stdout and "(finished)" in r.stdout
