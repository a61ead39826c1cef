"""Command-line options every user reaches for: --set, --seed, --version, -v / --log-level, RUN_DIR/pcm-hil.log,
and the link statistics of a tester run in summary.json and the run log."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from hil.cli import app

TINY = ["--data", "digits", "--train-limit", "150", "--set", "network.hidden=[8]"]


def _cli(*args: str):
    r = CliRunner().invoke(app, list(args))
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


def test_set_and_seed_reach_the_resolved_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = _cli("train", *TINY, "--set", "update.lr=0.07", "--set", "refresh.mode=verify", "--seed", "4", "--out", str(run))
    assert r.exit_code == 0, r.output
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert cfg["seed"] == 4 and cfg["update"]["lr"] == 0.07 and cfg["network"]["hidden"] == [8]
    assert cfg["refresh"]["mode"] == "verify"  # a bare word stays a string


def test_bad_set_is_one_line(tmp_path: Path) -> None:
    for bad, msg in (("update.lrr=1", "update.lrr: unknown key (did you mean 'lr'?)"),
                     ("update", "expected KEY=VALUE"), ("update.lr.x=1", "lr is not a table"),
                     ("update.epochs=true", "update.epochs: Input should be a valid integer")):
        r = _cli("train", *TINY, "--set", bad, "--out", str(tmp_path / "run"))
        assert r.exit_code == 2 and msg in " ".join(r.output.split()), r.output
        assert not (tmp_path / "run").exists()


def test_version() -> None:
    from hil import __version__

    r = _cli("--version")
    assert r.exit_code == 0 and r.output.strip() == f"pcm-hil {__version__}"


def test_log_level_and_run_log_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = _cli("-v", "train", *TINY, "--out", str(run))
    assert r.exit_code == 0, r.output
    text = (run / "pcm-hil.log").read_text()
    assert "INFO    hil.run: new run in" in text and "limits in force" in text
    r = _cli("--log-level", "loud", "train")
    assert r.exit_code == 2 and "--log-level must be one of" in r.output


def test_link_stats_of_a_tester_run(tmp_path: Path) -> None:
    from drivers.runlog import RunLogReader
    from hil.cli_emulator import EmulatorProcess

    run = tmp_path / "run"
    with EmulatorProcess(["--rows", "65", "--cols", "36"]) as emu:
        # The emulated chip is the default model: uncalibrated on purpose.
        r = _cli("train", *TINY, "--driver", emu.resource, "--out", str(run), "--set", "driver.uncalibrated_ok=true")
    assert r.exit_code == 0, r.output
    link = json.loads((run / "summary.json").read_text())["link"]
    assert link["round_trips"] > 100 and link["reconnects"] == 0
    with RunLogReader(run / "run.h5") as lr:
        m = lr.metrics()
    logged = m["link_round_trips"]
    assert logged[~np.isnan(logged)][-1] == link["round_trips"]


def test_usage_mistakes_are_one_unframed_line() -> None:
    """typer's own errors (unknown option, bad value) come as one line, whatever the terminal width."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    for args, msg in ((["train", "--nope"], "pcm-hil train: error: No such option: --nope"),
                      (["emulator", "--rows", "0"], "pcm-hil emulator: error: Invalid value for '--rows'")):
        r = subprocess.run([sys.executable, "-m", "hil.cli", *args], cwd=root, capture_output=True, text=True,
                           env=dict(os.environ, COLUMNS="30"), timeout=120)
        assert r.returncode == 2 and r.stderr.startswith(msg), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "╭" not in r.stderr


def test_redirected_output_gets_epoch_lines_and_plain_progress(tmp_path: Path, monkeypatch) -> None:
    """Not a terminal: each epoch's metrics (chip, then the baseline's beside them) and plain progress lines."""
    from hil import cli_train

    monkeypatch.setattr(cli_train, "PLAIN_PROGRESS_EVERY_S", 0.0)
    r = CliRunner().invoke(app, ["train", "--data", "digits", "--epochs", "2", "--train-limit", "600", "--set",
                                 "network.hidden=[8]", "--baseline", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    chip = [ln for ln in lines if ln.startswith("epoch ") and "test accuracy" in ln]
    base = [ln for ln in lines if ln.startswith("baseline epoch ") and "test accuracy" in ln]
    progress = [ln for ln in lines if "samples/s" in ln]
    assert [ln.split(":")[0] for ln in chip] == ["epoch 1", "epoch 2"]
    assert [ln.split(":")[0] for ln in base] == ["baseline epoch 1", "baseline epoch 2"]
    assert all("; chip 0." in ln for ln in base)
    assert any(ln.startswith("baseline: training the float64 network") for ln in lines)
    # a line per progress call after the first of each run (every 200 samples), the baseline's too
    assert len([ln for ln in progress if ln.startswith("epoch")]) >= 4
    assert len([ln for ln in progress if ln.startswith("baseline epoch")]) >= 4
    assert lines.index(chip[0]) < lines.index(chip[1]) < lines.index(base[0])
