"""scripts/bench zoo [--full] [--only NAMES] [--out DIR]: every network on the simulated chip and as its float64
baseline in the same harness, one table (issue 12: the paper's study of MLP, CNN, LSTM and GAN).

Each network is one ordinary run, start_run(cfg, DIR/NAME, baseline=True): the PCM run on the in-process mock
chip (every read and program logged, journaled, resumable, replayable) and then its baseline, the same model,
initialization, data order and loop on float64 host weights. The table: network, data, metric, PCM, float, gap,
SET / RESET pulses, refreshes and us per training sample of the PCM run (training loop only).

Default (a few minutes on a 2-core machine): the MLP (64-250-10) on scikit-learn's 8x8 digits, 3 epochs; the
CNN of examples/cnn.toml on the first 5,000 MNIST training digits, 1 epoch; the LSTM of examples/lstm.toml on
its first 2,000 windows, 1 epoch; the GAN of examples/gan.toml made small (z 16 -> 64 -> 64, 64 -> 64 -> 1) on
the 8x8 digits, 20 epochs. --full: the MLP on MNIST (the project defaults, 10 epochs as scripts/bench accuracy), the CNN,
LSTM and GAN of their example configs as they are (MNIST / the whole corpus; hours on a small machine).

Goals: MLP and CNN within 0.5 points of float; LSTM bits per character within 5% of float; GAN Frechet
distance within 25% of float. A network whose config or code is not there prints "not available: why".
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hil.config import ConfigError, RunConfig, load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ("mlp", "cnn", "lstm", "gan")


@dataclass
class Entry:
    """One network of the study: how its config is made (default and --full), its data's label, its goal."""

    name: str
    label: str
    config: Callable[[bool], RunConfig]
    data: Callable[[RunConfig], str]
    goal: str


def _example(name: str) -> RunConfig:
    path = EXAMPLES / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path.relative_to(EXAMPLES.parent)} is not there yet")
    return load_config(path)


def mlp_config(full: bool) -> RunConfig:
    if full:
        from .accuracy import MLP_EPOCHS  # the paper's MLP as scripts/bench accuracy trains it: 10 epochs

        return RunConfig().with_overrides(**{"update.epochs": MLP_EPOCHS})
    return RunConfig().with_overrides(**{"data.name": "digits", "update.epochs": 3})


def cnn_config(full: bool) -> RunConfig:
    cfg = _example("cnn")
    return cfg if full else cfg.with_overrides(**{"data.train_limit": 5000, "update.epochs": 1})


def lstm_config(full: bool) -> RunConfig:
    cfg = _example("lstm")
    return cfg if full else cfg.with_overrides(**{"data.train_limit": 2000, "update.epochs": 1})


def gan_config(full: bool) -> RunConfig:
    cfg = _example("gan")
    if full:
        return cfg
    return cfg.with_overrides(**{"data.name": "digits", "network.gan.z_dim": 16, "network.gan.g_hidden": [64],
                                 "network.gan.d_hidden": [64], "network.gan.eval_samples": 450,
                                 "update.batch_size": 32, "update.lr_decay": 1.0, "update.epochs": 20,
                                 # 8x8 digits: the discriminator's first layer at 0.15 (0.1: FD 49.5, 0.15: 35.2)
                                 "mapping.w_max": [1.0, 1.0, 0.15, 0.6]})


def _data_label(cfg: RunConfig) -> str:
    d = cfg.data
    n = f", {d.train_limit:,} samples" if d.train_limit else ""
    if d.name == "text":
        return (Path(d.path).name if d.path else "pydoc topics") + (f", {d.train_limit:,} windows" if d.train_limit
                                                                      else "")
    return d.name + n


ENTRIES = [
    Entry("mlp", "MLP", mlp_config, _data_label, "within 0.5 points of float"),
    Entry("cnn", "CNN", cnn_config, _data_label, "within 0.5 points of float"),
    Entry("lstm", "LSTM", lstm_config, _data_label, "bits/char within 5% of float"),
    Entry("gan", "GAN", gan_config, _data_label, "Frechet distance within 25% of float"),
]


def gap_and_goal(metric: str, pcm: float, base: float) -> tuple[str, bool]:
    """The gap as the table prints it and whether the network's goal is met."""
    if metric == "test_accuracy":
        gap = 100 * (base - pcm)
        return f"{gap:.2f} pt", gap <= 0.5
    rel = (pcm - base) / base if base else float("inf")
    limit = 0.05 if metric == "bits_per_char" else 0.25
    return f"{100 * rel:+.1f}%", rel <= limit


def _value(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    if metric == "test_accuracy":
        return f"{100 * v:.2f}%"
    return f"{v:.3f}" if metric == "bits_per_char" else f"{v:.1f}"


METRIC_LABEL = {"test_accuracy": "test accuracy", "bits_per_char": "bits/char", "frechet_distance": "Frechet dist."}


def run_entry(e: Entry, full: bool, out: Path) -> dict[str, Any]:
    """Train one network (PCM + baseline) into out / name; the row of the table, or why it is not available."""
    from hil.run import start_run

    try:
        cfg = e.config(full)
    except (FileNotFoundError, ConfigError, ImportError) as err:
        return {"name": e.label, "unavailable": str(err).splitlines()[0] if str(err) else type(err).__name__}
    t0 = time.perf_counter()
    try:
        s = start_run(cfg, out / e.name, baseline=True)
    except (ConfigError, ImportError, NotImplementedError) as err:
        shutil.rmtree(out / e.name, ignore_errors=True)
        return {"name": e.label, "unavailable": str(err).splitlines()[0] if str(err) else type(err).__name__}
    m = s["metric"]
    gap, met = gap_and_goal(m["name"], m["value"], m["baseline"])
    return {"name": e.label, "data": e.data(cfg), "metric": m["name"], "pcm": m["value"], "float": m["baseline"],
            "gap": gap, "met": met, "goal": e.goal, "set": s["set_pulses"], "reset": s["reset_pulses"],
            "refreshes": s["refreshes"], "us": s["us_per_sample"], "wall": time.perf_counter() - t0,
            "run_dir": out / e.name}


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The study's table and its goal lines."""
    dw = max([len("data"), *(len(r["data"]) for r in rows if "data" in r)])
    head = (f"  {'network':<8} {'data':<{dw}} {'metric':<14} {'PCM':>9} {'float':>9} {'gap':>9} {'SET':>11} "
            f"{'RESET':>10} {'refreshes':>9} {'us/sample':>9}")
    lines = [head]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"  {r['name']:<8} not available: {r['unavailable']}")
            continue
        lines.append(f"  {r['name']:<8} {r['data']:<{dw}} {METRIC_LABEL.get(r['metric'], r['metric']):<14} "
                     f"{_value(r['metric'], r['pcm']):>9} {_value(r['metric'], r['float']):>9} {r['gap']:>9} "
                     f"{r['set']:>11,} {r['reset']:>10,} {r['refreshes']:>9,} {r['us']:>9,.0f}")
    for r in rows:
        if "unavailable" not in r:
            lines.append(f"  goal {r['name']} {r['goal']}: {'met' if r['met'] else 'NOT met'} ({r['gap']})")
    return lines


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench zoo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="MNIST for the MLP, the example configs as they are")
    ap.add_argument("--only", default=",".join(NAMES), help=f"comma-separated subset of {','.join(NAMES)}")
    ap.add_argument("--out", type=Path, help="folder for the runs (kept; each DIR/NAME a RUN_DIR); default: a "
                                             "temporary folder, removed at the end")
    args = ap.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in only if n not in NAMES]
    if bad or not only:
        sys.exit(f"scripts/bench zoo: --only takes {', '.join(NAMES)}; got {args.only!r}")
    if args.out is not None:
        taken = [n for n in only if (args.out / n).exists()]
        if taken:
            sys.exit(f"scripts/bench zoo: {args.out / taken[0]} already exists; choose another --out")
    out = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="pcm-hil-zoo-"))
    rows = []
    t0 = time.perf_counter()
    try:
        for e in ENTRIES:
            if e.name in only:
                rows.append(run_entry(e, args.full, out))
                r = rows[-1]
                print(f"  ({r['name']}: " + (f"{r['wall']:.0f} s, {r['run_dir']})" if "wall" in r
                                             else f"not available: {r['unavailable']})"), flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    setting = "--full" if args.full else "default (reduced) setting"
    print(f"scripts/bench zoo, {setting}: each network on the mock PCM chip and as its float64 baseline (same "
          "harness, init, data order)")
    for line in table(rows):
        print(line)
    where = f"runs in {out}" if args.out is not None else "runs were in a temporary folder (--out DIR keeps them)"
    print(f"  wall time {time.perf_counter() - t0:.0f} s (PCM runs and baselines, data loading included); {where}")
