"""scripts/bench accuracy: full MNIST, the PCM run (mock chip, every read logged) and the float64
baseline side by side, several epochs, test accuracy after each epoch.

Goals (issue 4): PCM test accuracy >= 97.73% (the paper's chip) and within 0.6 points of the baseline.
Takes a while on a small machine (one PCM epoch is 60,000 programs); --train-limit shortens it.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from hil.config import RunConfig, load_config
from hil.run import run_baseline, start_run


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench accuracy")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--config", type=Path, help="run config (TOML); default: the project defaults")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="RUN_DIR of the PCM run (default: a temporary folder)")
    args = ap.parse_args(argv)

    cfg = load_config(args.config) if args.config else RunConfig()
    over: dict[str, object] = {"update.epochs": args.epochs, "data.name": "mnist"}
    if args.train_limit:
        over["data.train_limit"] = args.train_limit
    cfg = cfg.with_overrides(**over)
    tmp = None
    if args.out is None:
        tmp = Path(tempfile.mkdtemp(prefix="pcm-hil-accuracy-"))
        run_dir = tmp / "run"
    else:
        run_dir = args.out

    per_epoch: dict[str, list[float]] = {"pcm": [], "baseline": []}
    t0 = time.perf_counter()
    try:
        pcm = start_run(cfg, run_dir, progress=lambda t: _note(t, per_epoch["pcm"]), progress_every=10**12)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    t_pcm = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = run_baseline(cfg, _data(cfg), progress=lambda t: _note(t, per_epoch["baseline"]), progress_every=10**12)
    t_base = time.perf_counter() - t0

    print(f"scripts/bench accuracy: MNIST {cfg.network.hidden} sigmoid MLP, batch {cfg.update.batch_size}, "
          f"lr {cfg.update.lr}, {args.epochs} epochs, train samples {cfg.data.train_limit or 60000}, mock chip")
    print(f"  {'epoch':>5} {'PCM test acc':>13} {'baseline':>10} {'gap (pt)':>9}")
    for i, (a, b) in enumerate(zip(per_epoch["pcm"], per_epoch["baseline"], strict=True), start=1):
        print(f"  {i:>5} {100 * a:>12.2f}% {100 * b:>9.2f}% {100 * (b - a):>9.2f}")
    a, b = pcm["test_accuracy"], base.summary()["test_accuracy"]
    ok1, ok2 = a >= 0.9773, (b - a) <= 0.006
    print(f"  final PCM {100 * a:.2f}% (goal >= 97.73%: {'met' if ok1 else 'NOT MET'}), baseline {100 * b:.2f}%, "
          f"gap {100 * (b - a):.2f} pt (goal <= 0.6: {'met' if ok2 else 'NOT MET'})")
    print(f"  wall time: PCM run {t_pcm:.0f} s ({pcm['us_per_sample']:.0f} us/sample), baseline {t_base:.0f} s; "
          f"SET pulses {pcm['set_pulses']:,}, RESET pulses {pcm['reset_pulses']:,}, refreshes {pcm['refreshes']:,}")


def _data(cfg: RunConfig):
    from hil.data import load_dataset
    d = cfg.data
    return load_dataset(d.name, d.path, d.download, cfg.seed, d.train_limit, d.test_limit)


def _note(trainer, into: list[float]) -> None:
    """Called at each epoch's end (progress_every is huge): keep the epoch's test accuracy."""
    if len(trainer.metrics) > len(into):
        into.append(trainer.metrics[-1]["test_accuracy"])
