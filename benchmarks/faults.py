"""scripts/bench faults: a digits training run over the emulated tester with injected faults, side by side.

Each case is a fresh `pcm-hil emulator` (hil.cli_emulator.EmulatorProcess) and a fresh
`pcm-hil train --data digits` over pyvisa-py (TCPIP::127.0.0.1::PORT::SOCKET): first fault-free, then
P (default 2%) of each fault kind per query (lose, drop, delay, corrupt, error), then all of them at
once. A run that exits nonzero is resumed (`train --resume RUN_DIR --driver RESOURCE`) until it
finishes. Printed per case: the wall time of all train invocations, us per trained sample from it,
the ratio to the fault-free run, resumes needed, the driver's link figures, and the ledger check:
the tester's lifetime pulses per device (LIFE:ALL? over a TesterDriver once training is done, through the
same faults) against the SET + RESET pulses of every program in the run log (programs the run lists as
unapplied excluded). No --state: the emulator lives through the whole case, and a state file's writes would
be in every figure. Beside each ratio: the time the injected delays themselves take (the emulator's count
of delayed replies, printed as it exits, times --delay-s), and the ratio without it: the recovery's cost.
Goals: ledgers equal in every case; each case at most 3x the fault-free time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("lose", "drop", "delay", "corrupt", "error")


@dataclass
class Case:
    name: str
    wall_s: float
    samples: int
    resumes: int
    finished: bool
    devices_differ: int
    tester_pulses: int
    log_pulses: int
    delayed: int = 0
    note: str = ""


def _train(args: list[str], log: Path) -> int:
    with open(log, "a") as f:
        return subprocess.run([sys.executable, "-m", "hil.cli", "train", *args], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT).returncode


def _log_pulses(run: Path, n_devices: int) -> np.ndarray:
    """SET + RESET pulses per device of every program the run log holds, less those the run says never ran."""
    from drivers.runlog import RunLogReader

    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    with RunLogReader(run / "run.h5") as r:
        return r.pulses_per_device(n_devices, summary.get("unapplied_program_ids") or [])


def run_case(name: str, faults: dict[str, float], a: argparse.Namespace, tmp: Path) -> Case:
    """One fresh emulator and one training run (resumed until it finishes) under the given fault rates."""
    from hil.cli_emulator import EmulatorProcess

    folder = tmp / name
    folder.mkdir()
    run, log = folder / "run", folder / "train.log"
    cfg = folder / "run.toml"
    cfg.write_text(f'seed = {a.seed}\n[data]\nname = "digits"\n[network]\nhidden = [{a.hidden}]\n'
                   f"[update]\nepochs = {a.epochs}\n[driver]\nkind = \"visa\"\nresource = \"unused\"\n"
                   f"timeout_s = {a.timeout_s}\n# the emulator simulates the default PCM model, so its response is known\nuncalibrated_ok = true\n")
    emu_args = ["--rows", str(a.rows), "--cols", str(a.cols), "--seed", str(a.seed),
                "--fault-seed", str(a.seed + 1), "--fault-delay-s", str(a.delay_s)]
    for kind, p in faults.items():
        emu_args += [f"--fault-{kind}", str(p)]
    with EmulatorProcess(emu_args) as emu:
        t0 = time.perf_counter()
        rc = _train(["--config", str(cfg), "--driver", emu.resource, "--out", str(run)], log)
        resumes = 0
        while rc != 0 and resumes < a.max_resumes and (run / "config.toml").exists():
            resumes += 1
            rc = _train(["--resume", str(run), "--driver", emu.resource], log)
        wall = time.perf_counter() - t0
        tester = _tester_lifetime(emu.resource, a.timeout_s)
    delayed = _delayed_replies(emu.stderr_text())
    summary = json.loads((run / "summary.json").read_text()) if rc == 0 else {}
    logged = _log_pulses(run, tester.size) if (run / "run.h5").exists() else np.zeros_like(tester)
    note = "" if rc == 0 else f"did not finish (rc {rc}); see {log}"
    return Case(name, wall, int(summary.get("samples_trained", 0)), resumes, rc == 0,
                int(np.count_nonzero(tester != logged)), int(tester.sum()), int(logged.sum()), delayed, note)


def _tester_lifetime(resource: str, timeout_s: float) -> np.ndarray:
    """LIFE:ALL? of the tester, asked through its faults (the driver retries them; connecting is tried again)."""
    from drivers import DriverError, TesterDriver

    for attempt in range(20):
        try:
            with TesterDriver.open(resource, timeout_s=timeout_s, retries=50) as drv:
                return drv.tester_lifetime_pulses()
        except DriverError:
            if attempt == 19:
                raise
    raise AssertionError("unreachable")


def _delayed_replies(stderr: str) -> int:
    """The emulator's count of delayed replies, from its exit line 'injected faults: ... delay N, ...'."""
    for line in stderr.splitlines():
        if "injected faults:" in line:
            return int(line.split(" delay ", 1)[1].split(",", 1)[0].replace(",", ""))
    return 0


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench faults")
    ap.add_argument("--p", type=float, default=0.02, help="per-query probability of each injected fault")
    ap.add_argument("--hidden", type=int, default=32, help="hidden layer width")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--timeout-s", type=float, default=1.0, help="driver.timeout_s of the run")
    ap.add_argument("--delay-s", type=float, default=0.2, help="lateness of a delayed reply, s")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--cols", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-resumes", type=int, default=20)
    ap.add_argument("--cases", default="clean," + ",".join(KINDS) + ",all",
                    help="comma-separated subset of: clean, " + ", ".join(KINDS) + ", all")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    a = ap.parse_args(argv)
    names = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in ("clean", "all", *KINDS)]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r}")
    if "clean" not in names:
        names.insert(0, "clean")  # every ratio is to the fault-free run of this invocation

    tmp = Path(tempfile.mkdtemp(prefix="pcm-hil-bench-faults-"))
    cases: list[Case] = []
    try:
        for name in names:
            faults = {} if name == "clean" else {k: a.p for k in KINDS} if name == "all" else {name: a.p}
            cases.append(run_case(name, faults, a, tmp))
            c = cases[-1]
            print(f"  ... {c.name}: {c.wall_s:.1f} s, {c.resumes} resumes", file=sys.stderr, flush=True)
    finally:
        if a.keep:
            print(f"run folders kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    clean = cases[0]
    print(f"scripts/bench faults: digits 64-{a.hidden}-10, {a.epochs} epoch(s), pyvisa-py over loopback to the "
          f"emulated tester ({a.rows}x{a.cols}), driver timeout {a.timeout_s:g} s, fault delay {a.delay_s:g} s; "
          f"each fault kind at {100 * a.p:g}% per query")
    print(f"  {'case':9s} {'wall s':>7s} {'us/sample':>10s} {'vs clean':>8s} {'delays s':>8s} {'less delays':>11s} "
          f"{'resumes':>7s}  {'ledger (tester vs log)':28s}")
    for c in cases:
        us = c.wall_s / c.samples * 1e6 if c.samples else float("nan")
        ledger = (f"equal ({c.tester_pulses:,} pulses)" if c.devices_differ == 0
                  else f"{c.devices_differ} devices differ ({c.tester_pulses:,} vs {c.log_pulses:,})")
        delays = c.delayed * a.delay_s
        print(f"  {c.name:9s} {c.wall_s:7.1f} {us:10.0f} {c.wall_s / clean.wall_s:7.2f}x {delays:8.1f} "
              f"{(c.wall_s - delays) / clean.wall_s:10.2f}x {c.resumes:7d}  {ledger}{'  ' + c.note if c.note else ''}")
    equal = all(c.devices_differ == 0 and c.finished for c in cases)
    worst = max(cases, key=lambda c: c.wall_s)
    fast = all(c.finished and c.wall_s <= 3 * clean.wall_s for c in cases)
    print(f"  goal ledgers equal in every case: {'met' if equal else 'NOT met'}")
    print(f"  goal at most 3x the fault-free time: {'met' if fast else 'NOT met'} "
          f"(worst: {worst.name}, {worst.wall_s / clean.wall_s:.2f}x)")
