"""scripts/bench journal: what making every journal record durable (fsync before its program is sent) costs.

Measured side by side in one run, in a folder next to where runs go (--dir, default runs/):
- one journal record of the default MNIST MLP step (784-250-10, batch 1: the input's nonzero columns,
  both layers' error vectors, the step's program), appended with and without fsync (median, us);
- a digits training run on the in-process mock chip with checkpoint.journal_fsync = "always" against
  "never" (us per sample): the per-step cost a tester run pays by default.
A tester step costs one or two link round trips (hundreds of us to ms), so the goal is that fsync adds at
most one link round trip's worth: <= 2 ms per step.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from hil.config import RunConfig
from hil.journal import Journal
from hil.run import start_run


def _record(rng: np.random.Generator) -> tuple[dict, dict]:
    cols = np.sort(rng.choice(785, 150, replace=False)).astype(np.int64)
    n = 40
    meta = {"step": 1, "epoch": 0, "pos": 1, "kind": "update", "correct": 1, "n": 1, "program_id": 7}
    arrays = {"a0_cols": cols, "a0": rng.random((1, cols.size)), "d0": rng.random((1, 250)),
              "a1": rng.random((1, 251)), "d1": rng.random((1, 10)),
              "addresses": rng.choice(10**5, n, replace=False).astype(np.int64),
              "set_counts": rng.integers(1, 4, n).astype(np.int64), "reset": np.zeros(n, bool)}
    return meta, arrays


def append_us(folder: Path, fsync: bool, n: int) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile of one append, us."""
    meta, arrays = _record(np.random.default_rng(0))
    j = Journal(folder / f"bench-{int(fsync)}.bin", fsync=fsync)
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            j.append(meta, arrays)
            times.append(time.perf_counter() - t0)
    finally:
        j.close()
    q = np.percentile(np.array(times) * 1e6, [50, 10, 90])
    return float(q[0]), float(q[1]), float(q[2])


def train_us(folder: Path, mode: str, samples: int) -> float:
    cfg = RunConfig().with_overrides(**{"data.name": "digits", "network.hidden": [32], "data.train_limit": samples,
                                        "checkpoint.journal_fsync": mode})
    run = folder / f"run-{mode}"
    try:
        return start_run(cfg, run)["us_per_sample"]
    finally:
        shutil.rmtree(run, ignore_errors=True)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench journal")
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("runs"), help="File system to measure on (where runs go).")
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="pcm-hil-bench-journal-", dir=args.dir))
    try:
        best = {"plain": np.inf, "fsync": np.inf, "never": np.inf, "always": np.inf}
        spread = {"plain": None, "fsync": None}
        for _ in range(args.rounds):
            for key, fs in (("plain", False), ("fsync", True)):
                med, lo, hi = append_us(folder, fs, args.records)
                if med < best[key]:
                    best[key], spread[key] = med, (lo, hi)
            for mode in ("never", "always"):
                best[mode] = min(best[mode], train_us(folder, mode, args.samples))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"scripts/bench journal: on {args.dir.resolve()} (best of {args.rounds} rounds)")
    for key, label in (("plain", "append, no fsync"), ("fsync", "append + fsync")):
        lo, hi = spread[key]
        print(f"  {label:34s} {best[key]:9.1f} us median  (10-90%: {lo:.1f} .. {hi:.1f} us, {args.records} records)")
    print(f"  digits run, journal_fsync=never    {best['never']:9.1f} us/sample")
    print(f"  digits run, journal_fsync=always   {best['always']:9.1f} us/sample")
    added = best["always"] - best["never"]
    print(f"  fsync adds per step                {added:9.1f} us   goal <= 2000 us  {'met' if added <= 2000 else 'NOT MET'}")
