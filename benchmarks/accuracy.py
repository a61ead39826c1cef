"""scripts/bench accuracy [--network mlp|cnn]: full MNIST, the PCM run (mock chip, every read logged) and the
float64 baseline side by side, several epochs, test accuracy after each epoch.

Goals: mlp (issue 4): PCM test accuracy >= 97.73% (the paper's chip) and within 0.6 points of the baseline.
cnn (issue 10): the LeNet-style CNN of examples/cnn.toml (default config of --network cnn) within 0.5 points
of its float64 baseline (same config, init, data order and harness).
Takes a while on a small machine (one PCM epoch is 60,000 programs); --train-limit shortens it. For the CNN
the baseline runs in a second process beside the PCM run (--sequential: one after the other).
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from hil.config import RunConfig, load_config, validate_config
from hil.run import run_baseline, start_run

#: The run config of --network cnn when --config is not given.
CNN_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "cnn.toml"
#: Default epochs of --network mlp (--network cnn: the config's update.epochs, 4 in examples/cnn.toml).
MLP_EPOCHS = 10


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench accuracy")
    ap.add_argument("--network", choices=("mlp", "cnn"), default="mlp",
                    help="mlp: the project defaults; cnn: examples/cnn.toml (unless --config)")
    ap.add_argument("--epochs", type=int, default=None, help="default: 10 (mlp), the config's update.epochs (cnn)")
    ap.add_argument("--config", type=Path, help="run config (TOML); default: the network's (see --network)")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="RUN_DIR of the PCM run (default: a temporary folder)")
    ap.add_argument("--sequential", action="store_true", help="cnn: run the baseline after the PCM run, not beside it")
    args = ap.parse_args(argv)

    if args.config:
        cfg = load_config(args.config)
    elif args.network == "cnn":
        cfg = load_config(CNN_CONFIG)
    else:
        cfg = RunConfig()
    if (cfg.network.kind == "cnn") != (args.network == "cnn"):
        raise SystemExit(f"--network {args.network} but the config's network.kind is {cfg.network.kind!r}")
    if args.epochs is not None:
        epochs = args.epochs
    else:
        epochs = cfg.update.epochs if args.network == "cnn" else MLP_EPOCHS
    over: dict[str, object] = {"update.epochs": epochs, "data.name": "mnist", "data.train_limit": args.train_limit,
                               "data.test_limit": args.test_limit}
    cfg = cfg.with_overrides(**{k: v for k, v in over.items() if v is not None})
    tmp = None
    if args.out is None:
        tmp = Path(tempfile.mkdtemp(prefix="pcm-hil-accuracy-"))
        run_dir = tmp / "run"
    else:
        run_dir = args.out
    beside = args.network == "cnn" and not args.sequential

    per_epoch: dict[str, list[float]] = {"pcm": [], "baseline": []}
    pool = None
    try:
        if beside:
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            fut = pool.submit(_baseline_epochs, cfg.model_dump(mode="json", exclude_none=True))
        t0 = time.perf_counter()
        pcm = start_run(cfg, run_dir, progress=lambda t: _note(t, per_epoch["pcm"]), progress_every=10**12)
        t_pcm = time.perf_counter() - t0
        if beside:
            per_epoch["baseline"], b, t_base = fut.result()
        else:
            per_epoch["baseline"], b, t_base = _baseline_epochs(cfg.model_dump(mode="json", exclude_none=True))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    a = pcm["test_accuracy"]
    u = cfg.update
    if args.network == "cnn":
        c = cfg.network.cnn
        what = (f"MNIST LeNet-style CNN (conv {c.channels} k{c.kernel} pool {c.pool}, fc {c.fc}, {c.activation}), "
                f"w_max {cfg.mapping.w_max}")
    else:
        what = f"MNIST {cfg.network.hidden} sigmoid MLP"
    print(f"scripts/bench accuracy: {what}, batch {u.batch_size}, lr {u.lr} (decay {u.lr_decay}/epoch), {epochs} "
          f"epochs, train samples {cfg.data.train_limit or 60000}, test samples {cfg.data.test_limit or 10000}, "
          f"mock chip, refresh {cfg.refresh.mode}" + (", baseline in a second process beside the PCM run" if beside else ""))
    print(f"  {'epoch':>5} {'PCM test acc':>13} {'baseline':>10} {'gap (pt)':>9}")
    for i, (x, y) in enumerate(zip(per_epoch["pcm"], per_epoch["baseline"], strict=True), start=1):
        print(f"  {i:>5} {100 * x:>12.2f}% {100 * y:>9.2f}% {100 * (y - x):>9.2f}")
    gap = b - a
    if args.network == "cnn":
        print(f"  final PCM {100 * a:.2f}%, baseline {100 * b:.2f}%, gap {100 * gap:.2f} pt")
        print(f"  goal: within 0.5 points of the float baseline: {'met' if gap <= 0.005 else 'NOT met'}")
    else:
        ok1, ok2 = a >= 0.9773, gap <= 0.006
        print(f"  final PCM {100 * a:.2f}% (goal >= 97.73%: {'met' if ok1 else 'NOT MET'}), baseline {100 * b:.2f}%, "
              f"gap {100 * gap:.2f} pt (goal <= 0.6: {'met' if ok2 else 'NOT MET'})")
    print(f"  wall time: PCM run {t_pcm:.0f} s ({pcm['us_per_sample']:.0f} us/sample), baseline {t_base:.0f} s; "
          f"SET pulses {pcm['set_pulses']:,}, RESET pulses {pcm['reset_pulses']:,}, refreshes {pcm['refreshes']:,}")


def _baseline_epochs(cfg_data: dict[str, Any]) -> tuple[list[float], float, float]:
    """The float64 baseline of a config (as model_dump gives it): per-epoch test accuracy, the final one, seconds.
    A plain function of plain data, so it runs in a spawned process too."""
    cfg = validate_config(cfg_data, "bench accuracy")
    into: list[float] = []
    t0 = time.perf_counter()
    base = run_baseline(cfg, _data(cfg), progress=lambda t: _note(t, into), progress_every=10**12)
    return into, base.summary()["test_accuracy"], time.perf_counter() - t0


def _data(cfg: RunConfig):
    from hil.data import load_dataset
    d = cfg.data
    return load_dataset(d.name, d.path, d.download, cfg.seed, d.train_limit, d.test_limit)


def _note(trainer, into: list[float]) -> None:
    """Called at each epoch's end (progress_every is huge): keep the epoch's test accuracy."""
    if len(trainer.metrics) > len(into):
        into.append(trainer.metrics[-1]["test_accuracy"])
