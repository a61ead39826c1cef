"""kill -9 of `pcm-hil train` at random moments, then --resume: the accounting holds exactly.

- every sample is trained exactly once (samples_trained, step);
- chi + eps * (net SET pulses of update programs) equals the float64 sum of every update (audit);
- the net pulses per weight the trainer booked equal those of the log's applied update programs;
- against the emulated tester (whose chip outlives the trainer): per device, the pulses the
  emulator applied equal those the log's applied programs say, exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from drivers.runlog import RunLogReader

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
seed = 5
[network]
hidden = [16]
[data]
name = "digits"
[update]
epochs = 3
lr = 0.1
lr_decay = 0.9
[refresh]
check_every_steps = 25
threshold_us = 6.0
[read_policy]
every_steps = 300
[checkpoint]
every_steps = 60
audit = true
[logging]
flush_interval_s = 0.3
[driver]
seed = 3
"""


# The CNN (network.kind = "cnn"): a conv layer (3x3, 8 channels: 10 x 8 weights) and the output layer (129 x 10);
# its journal stores samples and read-backs, and a resume recomputes the steps (docs/checkpoint.md).
CNN_CONFIG = CONFIG.replace("[network]\nhidden = [16]\n", "[network]\nkind = \"cnn\"\n[network.cnn]\nchannels = [8]\n"
                            "kernel = 3\npadding = 1\nfc = []\n").replace("lr = 0.1\n", "lr = 0.03\n")
assert 'kind = "cnn"' in CNN_CONFIG and "lr = 0.03" in CNN_CONFIG
# Two devices per polarity (a weight's pulses go to its polarity's lowest copy) and every read averaged over two.
COPIES_CONFIG = CONFIG.replace("every_steps = 300\n", "every_steps = 300\naverage = 2\n") + \
    "[mapping]\ndevices_per_polarity = 2\n"
assert "average = 2" in COPIES_CONFIG


def _train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hil.cli", "train", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, COLUMNS="120"))


def _kill_at_random(proc: subprocess.Popen, run_dir: Path, rng: np.random.Generator) -> bool:
    """Wait until the run has a checkpoint, then kill -9 after a random delay; False if it finished first."""
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoint.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(float(rng.uniform(0.02, 0.5)))
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def _run_with_kills(start_args: list[str], resume_args: list[str], run_dir: Path, kills: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    proc = _train(start_args)
    killed = 0
    try:
        while True:
            if killed < kills and _kill_at_random(proc, run_dir, rng):
                killed += 1
                proc = _train(resume_args)
                continue
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            if json.loads((run_dir / "summary.json").read_text())["finished"]:
                return killed
            proc = _train(resume_args)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _applied_programs(run_dir: Path, unapplied: set[int]):
    with RunLogReader(run_dir / "run.h5") as r:
        progs = [p for _, _, p in r.programs()]
        plus = [r.array(f"mapping/layer{i}_gplus") for i in range(2)]
        minus = [r.array(f"mapping/layer{i}_gminus") for i in range(2)]
    ids = [p.program_id for p in progs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "program ids must increase strictly in the log"
    return [p for p in progs if p.program_id not in unapplied], plus, minus


def _check_accounting(run_dir: Path, n_devices: int) -> np.ndarray:
    summary = json.loads((run_dir / "summary.json").read_text())
    from hil.data import load_digits
    n_train = len(load_digits(5).y_train)
    assert summary["samples_trained"] == 3 * n_train
    with np.load(run_dir / "checkpoint.npz") as z:
        meta = json.loads(bytes(z["meta"]).decode())
        arrays = {k: z[k] for k in z.files}
    assert meta["position"]["step"] == 3 * n_train
    with RunLogReader(run_dir / "run.h5") as r:
        eps = json.loads(r.attrs["eps_per_layer_json"])
        steps = np.concatenate([r.read_events()["step"], r.program_events()["step"]])
        order = np.argsort(np.concatenate([r.read_events()["seq"], r.program_events()["seq"]]), kind="stable")
    # Steps never go backwards in the log, across resumes too (a resume's read belongs to its step).
    assert (np.diff(steps[order]) >= 0).all()
    for i in range(2):
        chi, net, total = arrays[f"chi{i}"], arrays[f"net{i}"], arrays[f"total{i}"]
        np.testing.assert_allclose(chi + eps[i] * net, total, rtol=0, atol=1e-9)
    applied, plus, minus = _applied_programs(run_dir, set(summary["unapplied_program_ids"]))
    # (several devices per polarity: the layer's addresses are (copies, rows, cols))
    copies = plus[0].shape[0] if plus[0].ndim == 3 else 1
    plus = [p.reshape(copies, *p.shape[-2:]) for p in plus]
    minus = [m.reshape(copies, *m.shape[-2:]) for m in minus]
    # The counters agree with the log, the window a resume rolled forward included: every mapped device was
    # RESET once by the initial programming, and each refresh RESETs every device of a weight.
    resets = sum(int(p.reset.sum()) for p in applied)
    assert summary["reset_pulses"] == resets
    assert summary["refreshes"] == (resets - 2 * sum(p.size for p in plus)) // (2 * copies)
    # Net SET pulses of update programs (no RESET in them) per device pair, from the log.
    per_device = np.zeros(n_devices, np.int64)
    upd = np.zeros(n_devices, np.int64)
    for p in applied:
        np.add.at(per_device, p.addresses, p.set_counts + p.reset)
        if not p.reset.any():
            np.add.at(upd, p.addresses, p.set_counts)
    for i in range(2):
        np.testing.assert_array_equal(upd[plus[i]].sum(0) - upd[minus[i]].sum(0), arrays[f"net{i}"])
    return per_device


@pytest.mark.slow
def test_kill9_resume_mock_chip(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG)
    run = tmp_path / "run"
    killed = _run_with_kills(["--config", str(cfg), "--out", str(run)], ["--resume", str(run)], run, kills=2, seed=11)
    assert killed >= 1
    per_device = _check_accounting(run, 65 * 52)
    # The restored mock chip keeps its endurance ledger across resumes (the lifetime budget is checked against
    # it): the final checkpoint's lifetime counts of the mapped devices are every pulse the log's programs sent.
    _, plus, minus = _applied_programs(run, set())
    mapped = np.unique(np.concatenate([a.ravel() for a in plus + minus]))
    with np.load(run / "checkpoint.npz") as z:
        np.testing.assert_array_equal(z["ledger"], per_device[mapped])


@pytest.mark.slow
@pytest.mark.parametrize("config, rows, cols, seed", [
    (CONFIG, 65, 52, 12),
    # the CNN's resume recomputes the journaled steps: the same exactness as the MLP's factors give
    (CNN_CONFIG, 129, 36, 13),
    (COPIES_CONFIG, 65, 104, 14),
], ids=["mlp", "cnn", "copies"])
def test_kill9_resume_emulated_tester_pulse_counts_match(config: str, rows: int, cols: int, seed: int,
                                                         tmp_path: Path) -> None:
    from drivers.tester import TesterDriver
    from hil.cli_emulator import EmulatorProcess

    cfg = tmp_path / "run.toml"
    cfg.write_text(config)
    run = tmp_path / "run"
    with EmulatorProcess(["--rows", str(rows), "--cols", str(cols), "--seed", "3"]) as emu:
        killed = _run_with_kills(["--config", str(cfg), "--out", str(run), "--driver", emu.resource,
                                  "--set", "driver.uncalibrated_ok=true"],
                                 ["--resume", str(run), "--driver", emu.resource], run, kills=3, seed=seed)
        assert killed >= 1
        per_device = _check_accounting(run, rows * cols)
        with TesterDriver.open(emu.resource) as t:
            applied_by_emulator = t.tester_lifetime_pulses()
    np.testing.assert_array_equal(applied_by_emulator, per_device)
