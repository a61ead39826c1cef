"""`pcm-hil watch RUN_DIR`: follow a run through its log (SWMR) and keep a dashboard current.

A Watcher opens the run log as a reader (SWMR: it never locks or waits on the writer; each refresh
reopens the file, a few milliseconds) and makes a Snapshot per tick: the step, samples/s and pulses/s
since the previous tick, the running accuracy (logged every hil.trainer.RUNNING_METRICS_EVERY steps),
each finished epoch's accuracies (the baseline's when logged), SET / RESET pulses, refreshed pairs and
the link counters. What the log has not flushed yet (logging.flush_interval_s) shows a tick later.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .runs import SUMMARY_FILE, find_log, open_log, writer_alive
from .taskmetric import CLASSIFY, task_metric


@dataclass
class Snapshot:
    """What a run looks like at one tick. Rates are over the time since the previous snapshot (NaN: first)."""

    state: str                      # "being written", "finished", "stopped" (no writer, not finished)
    step: int
    samples_trained: int | None
    running_epoch: int | None
    running_accuracy: float | None
    epochs: list[tuple[int, float, float, float | None]] = field(default_factory=list)  # epoch, test, train, baseline
    set_pulses: int = 0
    reset_pulses: int = 0
    programs: int = 0
    refreshed_pairs: int = 0
    link: dict[str, int] = field(default_factory=dict)
    metric: dict[str, Any] = field(default_factory=lambda: dict(CLASSIFY))  # the task's (analysis/taskmetric.py)
    samples_per_s: float = math.nan
    pulses_per_s: float = math.nan
    wall_s: float = 0.0


def _last(m: dict[str, np.ndarray], name: str) -> float | None:
    col = m.get(name)
    if col is None:
        return None
    ok = np.flatnonzero(np.isfinite(col))
    return float(col[ok[-1]]) if ok.size else None


class Watcher:
    """Snapshots of one run folder's log, one per tick(); close() when done."""

    def __init__(self, path: str | Path) -> None:
        self.run_dir, self.log = find_log(path)
        self.reader = open_log(self.log)
        self.metric = task_metric(dict(self.reader.attrs))  # the log's attributes are written when it is made
        self._prev: Snapshot | None = None
        self._set = self._reset = self._devices_seen = 0

    def close(self) -> None:
        self.reader.close()

    def tick(self) -> Snapshot:
        """Refresh the reader and summarize the run as it is now."""
        r = self.reader
        r.refresh()
        now = time.monotonic()
        ev = r.program_events()
        end = int(ev["start"][-1] + ev["count"][-1]) if len(ev["start"]) else 0
        if end > self._devices_seen:
            # only the device rows flushed since the last tick are read
            d = r.program_devices(self._devices_seen, end)
            self._set += int(d["set_count"].sum())
            self._reset += int(np.count_nonzero(d["reset"]))
            self._devices_seen = end
        m = r.metrics()
        rev = r.read_events()
        steps = [int(ev["step"][-1])] if len(ev["step"]) else []
        steps += [int(rev["step"][-1])] if len(rev["step"]) else []
        epochs = []
        metric = self.metric
        if "epoch" in m:
            base = {}
            if "baseline_epoch" in m:
                for e, a in zip(m["baseline_epoch"], m.get(f"baseline_{metric['name']}", []), strict=False):
                    if np.isfinite(e):
                        base[int(e)] = float(a)
            for i in np.flatnonzero(np.isfinite(m["epoch"])):
                e = int(m["epoch"][i])
                epochs.append((e, float(m[metric["name"]][i]), float(m[metric["train"]][i]), base.get(e)))
        summary_done = (self.run_dir / SUMMARY_FILE).is_file()
        state = "being written" if writer_alive(self.log) else ("finished" if summary_done else "stopped")
        refreshed = m.get("refreshed_pairs")
        snap = Snapshot(
            state=state, step=max(steps, default=0),
            samples_trained=None if _last(m, "samples_trained") is None else int(_last(m, "samples_trained") or 0),
            running_epoch=None if _last(m, "running_epoch") is None else int(_last(m, "running_epoch") or 0),
            running_accuracy=_last(m, metric["running"]), epochs=epochs, set_pulses=self._set, metric=metric,
            reset_pulses=self._reset, programs=len(ev["start"]),
            refreshed_pairs=int(np.nansum(refreshed)) if refreshed is not None else 0,
            link={k[5:]: int(v) for k in m if k.startswith("link_") and (v := _last(m, k)) is not None},
            wall_s=now)
        p = self._prev
        if p is not None and now > p.wall_s:
            dt = now - p.wall_s
            batch = 1 if snap.samples_trained is None or not snap.step else max(snap.samples_trained // max(snap.step, 1), 1)
            snap.samples_per_s = (snap.step - p.step) * batch / dt
            snap.pulses_per_s = (snap.set_pulses + snap.reset_pulses - p.set_pulses - p.reset_pulses) / dt
        self._prev = snap
        return snap


def rows(s: Snapshot) -> list[tuple[str, str]]:
    """The dashboard's lines: (quantity, value)."""
    def rate(x: float) -> str:
        return "-" if not math.isfinite(x) else f"{x:,.0f}"

    out = [("state", s.state), ("step", f"{s.step:,}"), ("samples/s", rate(s.samples_per_s)),
           (s.metric["running_title"], "-" if s.running_accuracy is None else
            f"{s.running_accuracy:.4f} (epoch {s.running_epoch})")]
    for e, test, train, base in s.epochs:
        b = "" if base is None else f", baseline {base:.4f}"
        out.append((f"epoch {e}", f"{s.metric['short']} {test:.4f}, train {train:.4f}{b}"))
    out += [("programs", f"{s.programs:,}"), ("SET pulses", f"{s.set_pulses:,}"),
            ("RESET pulses", f"{s.reset_pulses:,}"), ("pulses/s", rate(s.pulses_per_s)),
            ("refreshed pairs", f"{s.refreshed_pairs:,}")]
    if s.link:
        out.append(("link", ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in sorted(s.link.items()))))
    return out
