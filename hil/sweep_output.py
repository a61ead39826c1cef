"""A sweep's table and plots: DIR/sweep.csv (one row per point) and DIR/sweep-KEY.png (the metric against each
swept key, mean and min..max over seeds); hil/sweep.py writes them at the end of run_sweep."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sim.files import write_atomic

from .sweep_spec import Sweep, format_value

if TYPE_CHECKING:
    from .sweep import PointResult, SweepResult


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, dict, bool)):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v)
    return str(v)


CSV_COLUMNS = ("metric", "value", "baseline", "set_pulses", "reset_pulses", "refreshes", "wall_s", "status", "resumed", "error")


def write_csv(sweep: Sweep, res: SweepResult, path: Path) -> Path:
    """One row per point: point, the swept keys, seed, metric, value, pulses, refreshes, wall s, status, error."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["point", *sweep.keys, "seed", *CSV_COLUMNS])
    for r in res.results:
        w.writerow([r.name, *(_cell(r.values.get(k)) for k in sweep.keys), r.seed, r.metric or "", _cell(r.value), _cell(r.baseline),
                    _cell(r.set_pulses), _cell(r.reset_pulses), _cell(r.refreshes),
                    f"{r.wall_s:.2f}" if r.wall_s is not None else "", r.status, "true" if r.resumed else "false",
                    r.error or ""])
    write_atomic(path, buf.getvalue().encode())
    return path


def plot_file(key: str) -> str:
    return "sweep-" + re.sub(r"[^A-Za-z0-9._-]", "-", key) + ".png"


def write_plots(sweep: Sweep, res: SweepResult, out: Path) -> list[Path]:
    """DIR/sweep-KEY.png per swept key: the metric against the key's values, mean and spread (min..max) over
    seeds, one line per combination of the other swept keys (or all of them pooled, past 6 combinations)."""
    ok = [r for r in res.results if r.ok and isinstance(r.value, (int, float)) and math.isfinite(r.value)]
    if not ok or not sweep.keys:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = ok[0].metric or "metric"
    ok = [r for r in ok if r.metric == metric]
    files = []
    for key in sweep.keys:
        others = [k for k in sweep.keys if k != key]
        xs_all = _distinct([r.values[key] for r in res.results])
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs_all)
        groups: dict[str, list[PointResult]] = {}
        combos = _distinct([tuple(format_value(r.values[k]) for k in others) for r in ok])
        pooled = len(combos) > 6
        for r in ok:
            label = "all" if pooled or not others else ", ".join(
                f"{k.rsplit('.', 1)[-1]}={format_value(r.values[k])}" for k in others)
            groups.setdefault(label, []).append(r)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, (label, rs) in enumerate(groups.items()):
            xv = _distinct([r.values[key] for r in rs])
            if numeric:
                xv = sorted(xv)
            pos = [float(x) if numeric else xs_all.index(x) for x in xv]
            vals = [[r.value for r in rs if r.values[key] == x] for x in xv]
            mean = np.array([np.mean(v) for v in vals])
            lo = mean - np.array([np.min(v) for v in vals])
            hi = np.array([np.max(v) for v in vals]) - mean
            ax.errorbar(pos, mean, yerr=[lo, hi], fmt="o-", capsize=4, color=f"C{i % 10}",
                        label=label if label != "all" or pooled else None)
            for p, v in zip(pos, vals, strict=True):
                ax.plot([p] * len(v), v, ".", color=f"C{i % 10}", alpha=0.35)
        if not numeric:
            ax.set_xticks(range(len(xs_all)), [format_value(x) for x in xs_all])
        elif len(xs_all) > 2 and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 100:
            ax.set_xscale("log")
        n_seeds = len(sweep.seeds)
        ax.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key}: mean, min..max over {n_seeds} seed"
                                                f"{'s' if n_seeds != 1 else ''}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and (len(groups) > 1 or pooled):
            ax.legend(fontsize=7, title="pooled over the other keys" if pooled else None)
        fig.tight_layout()
        path = out / plot_file(key)
        try:
            fig.savefig(path, dpi=90)
        finally:
            plt.close(fig)
        files.append(path)
    return files


def _distinct(values: list[Any]) -> list[Any]:
    """The values in first-seen order, each once (lists compare by value)."""
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen
