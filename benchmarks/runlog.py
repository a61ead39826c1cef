"""scripts/bench runlog: what logging costs per call, and through LoggedDriver beside an unlogged MockDriver.

(a) RunLogWriter.log_reads / log_program of N-device calls (default 100 devices, 200,000 calls
    each, periodic flushes every 2 s included) -> us per call, file bytes per device row;
(b) MockDriver.read vs LoggedDriver(MockDriver).read of the same addresses, interleaved in rounds
    so both see the same machine load -> us per call and the ratio; a full-array read likewise.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np

from drivers import LoggedDriver, MockDriver, PulseProgram, RunLogWriter


def _us_per_call(fn: Callable[[int], object], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n * 1e6


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench runlog")
    ap.add_argument("--devices", type=int, default=100, help="devices per read / program")
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--rows", type=int, default=200, help="array rows (cols 2000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    n_dev = args.rows * 2000
    a = rng.choice(n_dev, args.devices, replace=False).astype(np.int64)
    g = rng.random(args.devices).astype(np.float32)
    prog = PulseProgram(1, a, rng.integers(0, 5, args.devices), np.zeros(args.devices, bool))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.h5")
        with RunLogWriter(path) as w:
            us_r = _us_per_call(lambda i: w.log_reads(i, 0.1, a, g, "periodic"), args.calls)
            us_p = _us_per_call(lambda i: w.log_program(i, prog, 0.1), args.calls)
        size = os.path.getsize(path)
        print(f"log_reads({args.devices} devices):   {us_r:7.2f} us/call   ({args.calls} calls, flushes included)")
        print(f"log_program({args.devices} devices): {us_p:7.2f} us/call")
        print(f"file: {size / 1e6:.1f} MB, {size / (2 * args.calls * args.devices):.2f} bytes per device row "
              f"(reads and programs, events included)")

        m = MockDriver(args.rows, 2000, seed=args.seed)
        with RunLogWriter(os.path.join(d, "b.h5")) as w:
            ld = LoggedDriver(m, w)
            plain = logged = 0.0
            rounds, per = 5, max(args.calls // 20, 1)
            for _ in range(rounds):   # interleaved rounds: both see the same load
                plain += _us_per_call(lambda i: m.read(a), per) / rounds
                logged += _us_per_call(lambda i: ld.read(a), per) / rounds
            full_plain = full_logged = 0.0
            for _ in range(rounds):
                full_plain += _us_per_call(lambda i: m.read(), 4) / rounds
                full_logged += _us_per_call(lambda i: ld.read(), 4) / rounds
        print(f"read of {args.devices} devices: MockDriver {plain:7.2f} us, LoggedDriver {logged:7.2f} us, "
              f"ratio {logged / plain:.2f}")
        print(f"read of all {n_dev} devices: MockDriver {full_plain / 1e3:.2f} ms, LoggedDriver "
              f"{full_logged / 1e3:.2f} ms, ratio {full_logged / full_plain:.2f}")
