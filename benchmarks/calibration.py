"""scripts/bench calibration: a full characterization of 10,000 devices x 20 SET pulses.

Runs the same experiments (pulse response, read noise, drift reads; logged to HDF5 like any run)
side by side on (a) the in-process MockDriver and (b) the emulated tester (`pcm-hil emulator` as a
subprocess) over pyvisa-py and a TCP socket, and prints both times and their ratio: the cost of the
real transport. Waiting for drift is simulated time on both (the emulated chip's clock is simulated),
so the figures are the software's cost. The fit of the mock run's log is timed separately.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from calibration.data import CharacterizationPlan
from calibration.experiments import cost, run_characterization
from calibration.fit import CalibrationWarning
from calibration.run import fit_log
from drivers.mock import MockDriver
from drivers.runlog import RunLogWriter


def _run(driver, addr: np.ndarray, plan: CharacterizationPlan, log: Path, wait, check_clock: bool = True) -> float:
    t = time.perf_counter()
    with RunLogWriter(log) as w:
        run_characterization(driver, addr, plan, writer=w, wait=wait, check_clock=check_clock)
    return time.perf_counter() - t


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench calibration")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--pulses", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=40)
    args = ap.parse_args(argv)
    n = args.devices
    cols = min(n, 1000)
    rows = math.ceil(n / cols)
    plan = CharacterizationPlan(n_pulses=args.pulses)
    c = cost(plan, n)
    addr = np.arange(n)
    print(f"scripts/bench calibration: {n:,} devices x {args.pulses} pulses; {c.describe()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mock = MockDriver(rows, cols, seed=args.seed)
        mock_s = _run(mock, addr, plan, tmp / "mock.h5", mock.advance)

        from drivers.tester import TesterDriver
        from hil.cli_emulator import EmulatorProcess

        with EmulatorProcess(["--rows", str(rows), "--cols", str(cols), "--seed", str(args.seed)]) as emu:
            with TesterDriver.open(emu.resource, timeout_s=60.0) as tester:
                # The emulated chip's clock is simulated and advances only with operations: waiting
                # on the host would add wall time without moving it, so drift waits are skipped here.
                emu_s = _run(tester, addr, plan, tmp / "emulator.h5", lambda s: None, check_clock=False)

        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            fit_log(tmp / "mock.h5", tmp / "fit", bootstrap=args.bootstrap, seed=args.seed)
        fit_s = time.perf_counter() - t
    reads = c.device_reads
    print(f"  {'experiments on the mock driver':44s} {mock_s:8.2f} s  ({reads / mock_s / 1e6:.2f} M device reads/s)")
    print(f"  {'experiments over the emulated tester':44s} {emu_s:8.2f} s  ({reads / emu_s / 1e6:.2f} M device reads/s)")
    print(f"  {'ratio emulated tester / mock':44s} {emu_s / mock_s:8.1f} x")
    print(f"  {'fit of the log (bootstrap ' + str(args.bootstrap) + '), plots, TOML':44s} {fit_s:8.2f} s")
