"""scripts/bench link: what the wire costs a training run, against the in-process mock in the same run.

The same digits training (`pcm-hil train --data digits`, 64-HIDDEN-10, EPOCHS epochs) three ways, in
interleaved rounds so that all see the same machine load:

  mock       the simulated chip in-process (MockDriver)
  visa       over pyvisa-py on loopback to a fresh `pcm-hil emulator` (TCPIP::127.0.0.1::PORT::SOCKET)
  visa+state the same with `pcm-hil emulator --state FILE` (each program on disk before it is acknowledged)

All three journal every step the same way (checkpoint.journal_fsync, default "always", the setting a run on a
tester gets), so the ratios are the link's and the state file's cost, not the journal's; one more mock run
with the mock's own default ("auto": no fsync) is shown for reference. Figures: us per trained sample
(summary.json us_per_sample, training only) and round trips per training step (summary.json link). Goals
(issue 9): at most 1.2 round trips per step; visa at most 2x the mock; visa+state at most 1.3x visa.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ("mock", "mock-default", "visa", "visa+state")


def _train(cfg: Path, out: Path, extra: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "hil.cli", "train", "--config", str(cfg), "--out", str(out), *extra],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"scripts/bench link: train failed (rc {r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def run_case(case: str, a: argparse.Namespace, folder: Path) -> dict:
    """One training run of case; its summary.json."""
    from hil.cli_emulator import EmulatorProcess

    folder.mkdir()
    fsync = "auto" if case == "mock-default" else a.journal_fsync
    cfg = folder / "run.toml"
    cfg.write_text(f'seed = {a.seed}\n[data]\nname = "digits"\n[network]\nhidden = [{a.hidden}]\n'
                   f'[update]\nepochs = {a.epochs}\n[checkpoint]\njournal_fsync = "{fsync}"\n')
    if case.startswith("mock"):
        return _train(cfg, folder / "run", [])
    emu_args = ["--rows", str(a.rows), "--cols", str(a.cols), "--seed", str(a.seed)]
    if case == "visa+state":
        emu_args += ["--state", str(folder / "tester.npz")]
    with EmulatorProcess(emu_args) as emu:
        # the emulated chip is the default model: its response is known without characterizing it
        return _train(cfg, folder / "run", ["--driver", emu.resource, "--set", "driver.uncalibrated_ok=true"])


def fdatasync_us(folder: Path, n: int = 100) -> float:
    """Median time of a 128-byte pwrite + fdatasync in folder, us: what --state and the journal pay per step."""
    path = folder / "fsync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, bytes(128 * n), 0)
        os.fsync(fd)
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            os.pwrite(fd, b"x" * 128, 128 * i)
            getattr(os, "fdatasync", os.fsync)(fd)
            times.append((time.perf_counter() - t0) * 1e6)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return statistics.median(times)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench link")
    ap.add_argument("--hidden", type=int, default=32, help="hidden layer width")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians and spread over them")
    ap.add_argument("--rows", type=int, default=128, help="emulated array rows")
    ap.add_argument("--cols", type=int, default=128, help="emulated array columns")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--journal-fsync", choices=("always", "never", "auto"), default="always",
                    help="checkpoint.journal_fsync of every case but mock-default")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")

    tmp = Path(tempfile.mkdtemp(prefix="pcm-hil-bench-link-"))
    runs: dict[str, list[dict]] = {c: [] for c in CASES}
    sync_us: list[float] = []
    try:
        for i in range(a.rounds):
            sync_us.append(fdatasync_us(tmp))
            for case in CASES:
                runs[case].append(run_case(case, a, tmp / f"{case}-{i}"))
                s = runs[case][-1]
                print(f"  ... round {i + 1} {case}: {s['us_per_sample']:.0f} us/sample", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def us(case: str) -> list[float]:
        return [s["us_per_sample"] for s in runs[case]]

    def med(case: str) -> float:
        return statistics.median(us(case))

    print(f"scripts/bench link: digits 64-{a.hidden}-10, {a.epochs} epoch(s), {runs['mock'][0]['samples_trained']:,} "
          f"samples; emulator {a.rows}x{a.cols} over pyvisa-py on loopback; journal fsync {a.journal_fsync!r}; "
          f"medians of {a.rounds} interleaved rounds (min..max)")
    print(f"  disk: pwrite + fdatasync of 128 bytes {statistics.median(sync_us):.0f} us (median; per round "
          f"{min(sync_us):.0f}..{max(sync_us):.0f}): every journaled step and every --state program pays one")
    print(f"  {'case':13s} {'us/sample':>10s} {'spread':>15s} {'round trips/step':>17s}")
    for case in CASES:
        v = us(case)
        link = [s.get("link") for s in runs[case]]
        rt = (f"{statistics.median(x['round_trips'] / s['steps'] for x, s in zip(link, runs[case])):17.3f}"
              if link[0] else f"{'-':>17s}")
        label = "mock (auto)" if case == "mock-default" else case
        print(f"  {label:13s} {med(case):10.0f} {min(v):7.0f}..{max(v):<7.0f}{rt}")
    rts = [s["link"]["round_trips"] / s["steps"] for c in ("visa", "visa+state") for s in runs[c]]
    ratio_visa = med("visa") / med("mock")
    ratio_state = med("visa+state") / med("visa")
    per_round_visa = [v / m for v, m in zip(us("visa"), us("mock"))]
    per_round_state = [s / v for s, v in zip(us("visa+state"), us("visa"))]

    def spread(x: list[float]) -> str:
        return f"per round {min(x):.2f}..{max(x):.2f}"

    print(f"  goal at most 1.2 round trips per step: {'met' if max(rts) <= 1.2 else 'NOT met'} (worst {max(rts):.3f})")
    print(f"  goal visa at most 2x the mock: {'met' if ratio_visa <= 2 else 'NOT met'} ({ratio_visa:.2f}x; "
          f"{spread(per_round_visa)})")
    print(f"  goal --state at most 1.3x without: {'met' if ratio_state <= 1.3 else 'NOT met'} ({ratio_state:.2f}x; "
          f"{spread(per_round_state)})")
