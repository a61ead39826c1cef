"""scripts/bench sweep: a small sweep (2 eps x 2 seeds, digits) on a local Ray instance with 1 and with 2 workers.

Each round runs the same four points twice, into fresh folders: with 1 worker and with 2 (the order alternates
between rounds), each sweep starting and stopping its own local Ray instance as `pcm-hil sweep` does. Printed:
each point's own wall time (inside its Ray task: imports on a fresh worker, data, training, summary; the
imports apart in brackets), the time from the first task submitted to the last result (Ray's start and stop
apart), the speed-up of 2 workers over 1 and Ray's own overhead per point:
(workers x the sweep's time - the points' own time) / points, i.e. worker-seconds per point not spent in a
point (scheduling, result transfer, and with 2 workers the wait for the last point). Beside it, the machine's
own 2-process speed-up without Ray (a CPU loop in two processes at once against one alone), which says what
2 workers can gain on the machine as loaded now. Goal: at least 1.7x with 2 workers on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SPEC = """
seeds = [0, 1]
[base]
[base.data]
name = "digits"
[base.network]
hidden = [16]
[base.update]
epochs = {epochs}
[grid]
# the default eps (0.464 uS x beta per layer: [0.029, 0.058]) and twice it
"update.eps" = [[0.029, 0.058], [0.058, 0.116]]
"""
GOAL = 1.7


def _burn(_: int) -> float:
    """A fixed pure-Python CPU loop; its wall time, s."""
    t0 = time.perf_counter()
    x = 0
    for i in range(5_000_000):
        x += i * i
    return time.perf_counter() - t0


def machine_ratio() -> float:
    """The machine's own 2-process speed-up now (no Ray): 2 x the time of one CPU loop alone over that of two at
    once in two processes; 2.0 where two cores are free, 1.0 where the machine gives one core's worth."""
    import multiprocessing as mp

    # fork where there is one: spawn would import `python -m benchmarks`'s __main__ again, which runs the benchmark
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(2) as pool:
        pool.map(_burn, [0, 1])  # both processes started
        one = float(np.median([pool.map(_burn, [0])[0] for _ in range(3)]))
        two = float(np.median([max(pool.map(_burn, [0, 1])) for _ in range(3)]))
    return 2 * one / two


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1, help="Rounds of (1 worker, 2 workers); median and spread shown.")
    ap.add_argument("--epochs", type=int, default=10, help="Epochs per point (1,347 digits samples each).")
    args = ap.parse_args(argv)

    from hil.sweep import load_sweep, run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        spec = tmp / "sweep.toml"
        spec.write_text(SPEC.format(epochs=args.epochs))
        sweep = load_sweep(spec)
        n = len(sweep.points)
        print(f"scripts/bench sweep: {n} points (update.eps x seeds 0, 1; digits 64-16-10, {args.epochs} epochs, "
              f"mock chip), local Ray instance per sweep, {args.rounds} round(s)")
        runs: dict[int, list[dict]] = {1: [], 2: []}
        machine: list[float] = []
        for k in range(args.rounds):
            # What two processes can gain on this machine as loaded now (other work may leave one core's worth).
            machine.append(machine_ratio())
            print(f"  round {k + 1}, no Ray: a CPU loop in 2 processes at once against 1 alone: {machine[-1]:.2f}x")
            for w in ((1, 2) if k % 2 == 0 else (2, 1)):
                out = tmp / f"r{k}-w{w}"
                t0 = time.perf_counter()
                res = run_sweep(sweep, out, workers=w)
                wall = time.perf_counter() - t0
                if res.failed:
                    raise SystemExit(f"bench sweep: point {res.failed[0].name} failed: {res.failed[0].error}")
                own = {r.name: r.wall_s for r in res.results}
                imports = {r.name: r.import_s or 0.0 for r in res.results}
                phase = res.tasks_s
                runs[w].append({"wall": wall, "ray_start": res.ray_start_s, "ray_stop": res.ray_stop_s,
                                "phase": phase, "own": own, "imports": imports,
                                "overhead": (w * phase - sum(own.values())) / n})
                shutil.rmtree(out, ignore_errors=True)
                print(f"  round {k + 1}, {w} worker{'s' if w > 1 else ' '}: points' tasks {phase:6.1f} s, Ray start "
                      f"{res.ray_start_s:4.1f} s, stop {res.ray_stop_s:4.1f} s, whole sweep {wall:5.1f} s; points "
                      + ", ".join(f"{v:.1f}" for v in own.values()) + " s")
        print(f"  {'point (own time, median; of it imports)':<40} {'1 worker s':>16} {'2 workers s':>16}")
        for p in sweep.points:
            cells = []
            for w in (1, 2):
                own = np.median([r["own"][p.name] for r in runs[w]])
                imp = np.median([r["imports"][p.name] for r in runs[w]])
                cells.append(f"{own:7.2f} ({imp:5.2f})")
            print(f"  {p.name:<40} {cells[0]:>16} {cells[1]:>16}")
        ratios = [a["phase"] / b["phase"] for a, b in zip(runs[1], runs[2], strict=True)]
        with_start = [a["wall"] / b["wall"] for a, b in zip(runs[1], runs[2], strict=True)]

        def spread(v: list[float], unit: str = "", fmt: str = ".2f") -> str:
            med = f"{np.median(v):{fmt}}{unit}"
            return med if len(v) == 1 else f"{med} (per round {min(v):{fmt}}..{max(v):{fmt}}{unit})"

        for w in (1, 2):
            print(f"  {w} worker{'s' if w > 1 else ' '}: tasks {spread([r['phase'] for r in runs[w]], ' s', '.1f')}, "
                  f"Ray start {spread([r['ray_start'] for r in runs[w]], ' s', '.1f')}, Ray's overhead per point "
                  f"{spread([r['overhead'] for r in runs[w]], ' s')}")
        s = float(np.median(ratios))
        print(f"  speed-up, 2 workers over 1: {spread(ratios, 'x')}; with Ray's start: {spread(with_start, 'x')}")
        print(f"  the machine's own 2-process speed-up (a CPU loop, no Ray): {spread(machine, 'x')}")
        print(f"  goal at least {GOAL}x with 2 workers on 2 cores: {'met' if s >= GOAL else 'NOT met'} ({s:.2f}x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
