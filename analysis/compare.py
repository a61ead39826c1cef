"""`pcm-hil compare`: several training runs side by side (docs/report.md).

One row per run (final test accuracy, baseline, epochs, steps, pulses, refreshes, us/sample), one
figure of overlaid curves (test accuracy per epoch, cumulative pulses, cumulative refreshes), and
the config keys whose values differ between the runs (config.toml flattened to dotted keys).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .runs import AnalysisError, Run, load_run

#: The table's columns: (heading, how a run gives it).
COLUMNS = ("run", "state", "test acc", "baseline", "epochs", "steps", "SET pulses", "RESET pulses", "refreshes",
           "us/sample")
MISSING = "-"


@dataclass
class Comparison:
    """What compare_runs found: the runs, their table rows, and the config keys that differ."""

    runs: list[Run]
    labels: list[str]
    rows: list[list[str]]
    #: (dotted key, one value per run as TOML would write it, MISSING where a run's config lacks the key)
    differences: list[tuple[str, list[str]]]
    #: the table's headings: COLUMNS, the third the runs' metric ("test acc", "bits/char"; "metric" where they differ)
    columns: tuple[str, ...] = COLUMNS

    @staticmethod
    def columns_for(runs: list[Run]) -> tuple[str, ...]:
        """COLUMNS with the metric's heading of these runs' task."""
        names = {r.metric["name"] for r in runs}
        if names == {"test_accuracy"}:
            return COLUMNS
        heading = runs[0].metric["short"] if len(names) == 1 else "metric"
        return (*COLUMNS[:2], heading, *COLUMNS[3:])


def labels_for(runs: list[Run]) -> list[str]:
    """A short name per run: its folder name, or more of its path where folder names repeat."""
    names = [r.path.name or str(r.path) for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(r.path) for r in runs]


def _value(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(", ", ": "))
    return str(v)


def config_differences(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """Every dotted config key whose value is not the same in all runs (absent counts as a value)."""
    flat = [r.flat_config() for r in runs]
    keys = sorted(set().union(*flat))
    out = []
    for k in keys:
        vals = [_value(f[k]) if k in f else MISSING for f in flat]
        if len(set(vals)) > 1:
            out.append((k, vals))
    return out


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return MISSING
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{int(v):,}"


def _row(run: Run, label: str) -> list[str]:
    planned = run.epochs_planned
    short_state = ("finished" if run.finished else "live" if run.live else
                   "stopped" if run.summary else "killed")
    return [label, short_state, _num(run.final_metric), _num(run.baseline_metric),
            f"{run.epochs_done}/{planned}" if planned else str(run.epochs_done), _num(run.last_step),
            _num(run.set_pulses), _num(run.reset_pulses), _num(run.refreshes),
            f"{run.us_per_sample:,.1f}" if run.us_per_sample is not None else MISSING]


def compare_runs(paths: list[str | Path]) -> Comparison:
    """Load each run (a training run folder) and line them up; AnalysisError for fewer than two or a bad one."""
    if len(paths) < 2:
        raise AnalysisError("compare takes two or more runs", 2)
    runs = []
    for p in paths:
        run = load_run(p)
        if run.kind != "train":
            raise AnalysisError(f"{run.path} is a calibration log; compare takes training runs (pcm-hil train)", 2)
        runs.append(run)
    labels = labels_for(runs)
    return Comparison(runs, labels, [_row(r, lab) for r, lab in zip(runs, labels, strict=True)],
                      config_differences(runs), Comparison.columns_for(runs))


def write_compare_figure(c: Comparison, path: str | Path) -> Path:
    """Overlaid curves of the runs: test accuracy per epoch, cumulative pulses, cumulative refreshes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for k, (run, label) in enumerate(zip(c.runs, c.labels, strict=True)):
        color = f"C{k % 10}"
        e = run.epochs
        name = run.metric["name"]
        if name in e and e["epoch"].size:
            ax[0].plot(e["epoch"], e[name], "o-", color=color, label=f"{label}: chip")
        b = run.baseline_epochs
        if b is not None and name in b:
            ax[0].plot(b["epoch"], b[name], "^:", color=color, alpha=0.7, label=f"{label}: baseline")
        elif run.baseline_metric is not None:
            ax[0].axhline(run.baseline_metric, color=color, ls=":", alpha=0.7, label=f"{label}: baseline (final)")
        order = np.argsort(run.prog_step, kind="stable")
        steps = run.prog_step[order]
        ax[1].plot(steps, np.cumsum((run.prog_set + run.prog_reset)[order]), color=color,
                   label=f"{label}: {run.set_pulses + run.reset_pulses:,}")
        o = np.argsort(run.refresh_step, kind="stable")
        ax[2].plot(np.r_[0, run.refresh_step[o]], np.r_[0, np.cumsum(run.refresh_pairs[o])], color=color,
                   drawstyle="steps-post", label=f"{label}: {run.refreshes:,}")
    what = {r.metric["label"] for r in c.runs}  # one metric, unless runs of different tasks are compared
    shown = what.pop() if len(what) == 1 else "metric (each run's task's)"
    ax[0].set(xlabel="epoch", ylabel=shown, title=f"{shown[0].upper()}{shown[1:]} per epoch")
    ax[0].xaxis.get_major_locator().set_params(integer=True)
    ax[1].set(xlabel="step", ylabel="SET + RESET pulses so far", title="Cumulative pulses")
    ax[2].set(xlabel="step", ylabel="pairs refreshed so far", title="Cumulative refreshes")
    for a in ax:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    except OSError as e:
        raise AnalysisError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path
