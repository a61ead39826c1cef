"""scripts/bench train --network cnn: the CNN (network.kind = "cnn", examples/cnn.toml's shape unless --config)
on MNIST, batch 1, measured side by side in one run:

- PCM run: the mixed-precision loop on the in-process mock chip, every read and program logged to HDF5
  and journaled, through `start_run` as `pcm-hil train` runs it;
- the float64 baseline in the same harness (same Trainer loop, model, data order and initialization).

Each figure is the best of --rounds interleaved rounds (us per training sample, training loop only). Then one
more PCM run under cProfile says where a step's time goes (per component, us/step; profiling inflates the
total, the shares are what to read). Goal: PCM <= 3x baseline.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import tempfile
from pathlib import Path

import numpy as np

from hil.config import RunConfig, load_config
from hil.run import _load_data, run_baseline, start_run

#: Where a PCM step's time goes: (label, module file suffix, function name), by cumulative time.
COMPONENTS = [
    ("forward + backward (torch, analog layers)", "hil/trainer.py", "module_step"),
    ("  of it: analog products on the host copy", "hil/analog.py", "product"),
    ("chi += -lr A^T D (every analog weight)", "hil/array.py", "accumulate"),
    ("plan the step's program", "hil/array.py", "plan_update"),
    ("journal record", "hil/trainer.py", "_journal_program"),
    ("send: apply + read back (mock chip, logged)", "hil/array.py", "send"),
    ("  of it: HDF5 run log", "drivers/logged.py", "apply_and_read"),
    ("refresh checks and refreshes", "hil/array.py", "refresh"),
]


def _pcm(cfg: RunConfig, samples: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="pcm-hil-bench-"))
    try:
        return start_run(cfg, tmp / "run", stop_after_steps=samples)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _profile(cfg: RunConfig, samples: int) -> tuple[list[tuple[str, float]], float]:
    prof = cProfile.Profile()
    prof.enable()
    s = _pcm(cfg, samples)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    steps = max(int(s["steps"]), 1)
    out = []
    for label, path, fn in COMPONENTS:
        cum = sum(v[3] for (f, _, name), v in stats.items() if name == fn and f.replace("\\", "/").endswith(path))
        out.append((label, cum / steps * 1e6))
    return out, s["train_seconds"] / steps * 1e6


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="scripts/bench train --network cnn")
    ap.add_argument("--samples", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "examples" / "cnn.toml",
                    help="run config of the CNN (default examples/cnn.toml; the built-in [network.cnn] if absent)")
    args = ap.parse_args(argv)
    n = args.samples
    base = load_config(args.config) if args.config.is_file() else RunConfig().with_overrides(**{"network.kind": "cnn"})
    cfg = base.with_overrides(**{"data.name": "mnist", "data.train_limit": n, "data.test_limit": 500,
                                 "update.epochs": 1, "driver.kind": "mock", "logging.enabled": True})
    data = _load_data(cfg)
    best = {"pcm": np.inf, "baseline": np.inf}
    last: dict = {}
    for _ in range(args.rounds):
        b = run_baseline(cfg, data)
        best["baseline"] = min(best["baseline"], b.at.train_seconds / b.at.samples_trained * 1e6)
        last = _pcm(cfg, n)
        best["pcm"] = min(best["pcm"], last["us_per_sample"])
    parts, total = _profile(cfg, min(n, 500))
    c = cfg.network.cnn
    root = Path(__file__).resolve().parent.parent
    shown = args.config.resolve()
    shown_name = shown.relative_to(root) if shown.is_relative_to(root) else shown
    print(f"scripts/bench train --network cnn: MNIST CNN (conv {c.channels}, kernel {c.kernel}, fc {c.fc}, "
          f"{c.activation}), batch {cfg.update.batch_size}, {n} samples, mock chip (best of {args.rounds} "
          f"interleaved rounds; config {shown_name if args.config.is_file() else 'built-in'})")
    print(f"  PCM run, every read logged   {best['pcm']:8.1f} us/sample  ({last['programs_applied']:,} programs, "
          f"{last['reads_logged']:,} reads logged, {last['set_pulses']:,} SET pulses, "
          f"{last['refreshes']:,} refreshes)")
    print(f"  float64 baseline (harness)   {best['baseline']:8.1f} us/sample")
    print(f"  where a PCM step goes (cProfile, {min(n, 500)} steps, {total:.0f} us/step under the profiler):")
    for label, us in parts:
        print(f"    {label:44s} {us:8.0f} us/step  {100 * us / total:5.1f}%")
    r = best["pcm"] / best["baseline"]
    print(f"  {'PCM / baseline':28s} {r:9.2f}x   goal <= 3x    {'met' if r <= 3.0 else 'NOT MET'}")
