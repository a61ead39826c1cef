"""Replay a finished run against its own log: `pcm-hil replay RUN_DIR --out NEW_DIR` (docs/run-log.md, "Replaying a
run").

replay_run() trains again with RUN_DIR's config.toml, the driver swapped for a ReplayDriver that re-serves every
read RUN_DIR/run.h5 logged (probe reads of eps = "auto" included), in order, and checks every program against the
logged one (id, addresses, SET counts, RESETs, pulse shapes). NEW_DIR is a run directory like any other (its own
run.h5, config.toml with driver.kind = "replay", checkpoint, summary.json). At each epoch's end the metrics are
compared with the logged ones; at the end the two logs are compared whole (every read event's step, reason, size
and time, every program with its step, every metric but the link counters) and so are the summaries.

The first difference stops the replay with ReplayDiverged, which says where (the replay's step, the program id)
and what differs. What cannot be replayed is refused before NEW_DIR is made (ReplayRefused): no run directory, no
run log, no summary.json (a killed or running run), a run that was resumed, a chip that did the analog multiply.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig, load_config, validate_config
from .run import CONFIG_FILE, LOG_FILE, SUMMARY_FILE, start_run
from .trainer import Trainer

#: Config keys a replay sets itself (the driver is the log); --set may not touch them.
REPLAY_DRIVER_KEYS = ("driver.kind", "driver.resource", "driver.plugin", "driver.options")
#: Per-epoch metrics compared as each epoch ends (the trainer's own row).
EPOCH_KEYS = ("epoch", "test_accuracy", "train_accuracy", "bits_per_char", "train_bits_per_char", "frechet_distance",
              "train_d_loss", "class_entropy_bits", "refreshes", "set_pulses", "reset_pulses", "programs_applied")
#: The tasks' metrics among them (hil/tasks.py: classify, the LSTM's text), as the CLI names them.
METRIC_KEYS = {"test_accuracy": "test accuracy", "bits_per_char": "bits per character",
               "frechet_distance": "Frechet distance"}
#: summary.json entries that a faithful replay reproduces.
SUMMARY_KEYS = ("test_accuracy", "baseline_test_accuracy", "bits_per_char", "baseline_bits_per_char", "frechet_distance",
                "baseline_frechet_distance", "epochs", "steps",
                "samples_trained", "programs_applied",
                "set_pulses", "reset_pulses", "refreshes", "devices_read", "read_calls", "reads_logged",
                "finished", "response")


class ReplayError(RuntimeError):
    """A replay that was refused or did not reproduce the run."""


class ReplayRefused(ReplayError):
    """The run cannot be replayed (or NEW_DIR exists); checked before NEW_DIR is made, so nothing was written."""


class ReplayDiverged(ReplayError):
    """The replay asked for a read or program the log does not hold, or its metrics differ from the logged ones.

    step: the replay's step (0: the probe and the initial programming); program_id: the program asked for
    (None for a read or a metric); what: the difference; out_dir: the replay's run directory, kept for a look.
    """

    def __init__(self, step: int, program_id: int | None, what: str, out_dir: Path) -> None:
        where = f"step {step}" + (f", program {program_id}" if program_id is not None else "")
        kept = f" (the replay so far is in {out_dir})" if out_dir.exists() else ""
        super().__init__(f"replay diverged at {where}: {what}{kept}")
        self.step, self.program_id, self.what, self.out_dir = step, program_id, what, out_dir


@dataclass
class ReplayResult:
    """A replay that reproduced the run: what was compared, and the replay's own summary."""

    run_dir: Path
    out_dir: Path
    steps: int
    epochs: int
    programs: int          # programs compared (every one of the log's)
    read_events: int       # read calls compared
    device_reads: int      # device rows re-served
    metric_records: int    # log_metrics calls compared
    summary: dict[str, Any]
    epoch_rows: list[tuple[dict[str, float], dict[str, float]]] = field(default_factory=list)  # (logged, replayed)


def replay_config(run_dir: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """RUN_DIR's config with the driver swapped for a replay of RUN_DIR/run.h5 (and overrides applied)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / CONFIG_FILE)
    over = dict(overrides or {})
    bad = [k for k in over if k in REPLAY_DRIVER_KEYS]
    if bad:
        raise ReplayRefused(f"--set {bad[0]}: a replay's driver is the run's log; the driver keys "
                            f"{', '.join(REPLAY_DRIVER_KEYS)} cannot be set")
    over.update({"driver.kind": "replay", "driver.resource": str((run_dir / LOG_FILE).resolve()),
                 "driver.plugin": None, "driver.options": {}})
    return cfg.with_overrides(**over)


def _refuse_unreplayable(run_dir: Path, out_dir: Path) -> tuple[RunConfig, dict[str, Any]]:
    """(the run's config, its summary.json), or ReplayRefused saying why it cannot be replayed."""
    if out_dir.exists():
        raise ReplayRefused(f"{out_dir} already exists; a replay writes a new run directory, choose another --out")
    if not (run_dir / CONFIG_FILE).is_file():
        raise ReplayRefused(f"{run_dir} is not a pcm-hil run directory (no {CONFIG_FILE})")
    if not (run_dir / LOG_FILE).is_file():
        raise ReplayRefused(f"{run_dir} has no run log ({LOG_FILE}; logging.enabled = false?): nothing to replay")
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReplayRefused(f"{run_dir} has no {SUMMARY_FILE}: the run was killed or is still running; replay a "
                            "finished or stopped run (resume a killed one first)") from None
    except (OSError, ValueError) as e:
        raise ReplayRefused(f"{run_dir / SUMMARY_FILE} is unreadable: {e}") from None
    cfg = load_config(run_dir / CONFIG_FILE)
    if cfg.driver.analog_mvm:
        raise ReplayRefused(f"{run_dir} trained with the chip's analog multiply (driver.analog_mvm), which the run log "
                            "does not record: it cannot be replayed")
    if not cfg.logging.enabled:
        raise ReplayRefused(f"{run_dir}/config.toml has logging.enabled = false: a replay compares two run logs")
    return cfg, summary


def _check_log(run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """What the replay needs from the log before it starts: refuses a resumed run, a log of another config."""
    from drivers.runlog import RunLogReader, verify_log

    path = run_dir / LOG_FILE
    verify_log(path)  # RunLogError naming the rows that fail, before anything is made
    with RunLogReader(path) as r:
        attrs = r.attrs
        reasons = r.read_events()["reason"]
        metrics = r.metrics()
    if "config_toml" in attrs:
        logged = validate_config(tomllib.loads(str(attrs["config_toml"])), f"{path} (config_toml)")
        if logged.digest() != cfg.digest():
            raise ReplayRefused(f"{run_dir / CONFIG_FILE} differs from the config the run log was made with "
                                "(config_toml): a replay needs the run's own config")
    where = np.flatnonzero(reasons == "resume")
    if where.size or "unapplied_program_id" in metrics:
        raise ReplayRefused(
            f"{run_dir} was resumed (its log holds {where.size} 'resume' read(s)): the reads and programs of the "
            "steps between its last flush and the stop were never logged (or were logged again), so a replay "
            "cannot follow it across the resume; replaying resumed runs is not supported")
    return {"baseline": "baseline_epoch" in metrics}


def replay_run(run_dir: str | Path, out_dir: str | Path, *, overrides: dict[str, Any] | None = None,
               progress: Callable[[Trainer], None] | None = None, progress_every: int = 200,
               on_epoch: Callable[[dict[str, float], dict[str, float]], None] | None = None,
               notify: Callable[[str], None] | None = None, on_start: Callable[[RunConfig], None] | None = None,
               stop: Any = None) -> ReplayResult:
    """Train RUN_DIR's run again into out_dir against RUN_DIR/run.h5 and check it reproduces the run.

    overrides: dotted config keys changed for the replay (e.g. {"update.lr": 0.05}: the replay then shows where
    that change first moves a program). on_epoch(logged_row, replayed_row) is called as each epoch's metrics
    match; on_start(config) once every check passed, before out_dir is made. Returns a ReplayResult; raises
    ReplayRefused (nothing written), ReplayDiverged (out_dir kept, unless nothing reached the log's chip yet),
    ConfigError, RunLogError, DataError and the like as pcm-hil train would.
    """
    from drivers.replay import ReplayMismatch
    from drivers.runlog import RunLogReader

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg, summary = _refuse_unreplayable(run_dir, out_dir)
    info = _check_log(run_dir, cfg)
    rcfg = replay_config(run_dir, overrides)
    if not rcfg.logging.enabled:
        raise ReplayRefused("--set logging.enabled=false: a replay compares its run log with the run's")
    with RunLogReader(run_dir / LOG_FILE) as r:
        logged_epochs = _epoch_rows(r.metrics())
    stop_after = None if summary.get("finished", True) else int(summary.get("steps") or 0)

    seen: dict[str, Any] = {"trainer": None, "epochs": []}

    def watch(t: Trainer) -> None:
        seen["trainer"] = t
        n = len(seen["epochs"])
        if len(t.metrics) > n:
            row = {k: float(t.metrics[n][k]) for k in EPOCH_KEYS if k in t.metrics[n]}
            want = logged_epochs[n] if n < len(logged_epochs) else None
            if want is None:
                raise ReplayDiverged(t.at.step, None, f"epoch {n + 1} ended, but the log has {len(logged_epochs)} "
                                     "epochs", out_dir)
            diff = _row_difference(want, row)
            if diff:
                raise ReplayDiverged(t.at.step, None, f"epoch {n + 1}: {diff}", out_dir)
            seen["epochs"].append((want, row))
            if on_epoch is not None:
                on_epoch(want, row)
            if progress is not None:
                progress(t)
        elif progress is not None and t.at.step % progress_every == 0:
            progress(t)

    if on_start is not None:
        on_start(rcfg)
    try:
        new_summary = start_run(rcfg, out_dir, baseline=info["baseline"], progress=watch, progress_every=1,
                                stop_after_steps=stop_after, notify=notify, stop=stop)
    except ReplayMismatch as e:
        t = seen["trainer"]
        step = t.at.step if t is not None else _last_logged_step(out_dir, e)
        raise ReplayDiverged(step, e.program_id, str(e), out_dir) from None
    if stop is not None and getattr(stop, "signal", 0):
        return _result(run_dir, out_dir, new_summary, seen["epochs"], compared=None)
    compared = _compare_logs(run_dir / LOG_FILE, out_dir / LOG_FILE, out_dir)
    _compare_summaries(summary, json.loads((out_dir / SUMMARY_FILE).read_text(encoding="utf-8")), out_dir)
    return _result(run_dir, out_dir, new_summary, seen["epochs"], compared)


def _result(run_dir: Path, out_dir: Path, summary: dict[str, Any], epochs: list[Any],
            compared: dict[str, int] | None) -> ReplayResult:
    c = compared or {"programs": 0, "read_events": 0, "device_reads": 0, "metrics": 0}
    return ReplayResult(run_dir, out_dir, int(summary.get("steps") or 0), int(summary.get("epochs") or 0),
                        c["programs"], c["read_events"], c["device_reads"], c["metrics"], summary, epochs)


def _epoch_rows(m: dict[str, np.ndarray]) -> list[dict[str, float]]:
    """The chip's per-epoch metric rows of a log, in order."""
    if "epoch" not in m:
        return []
    rows = []
    for i in np.flatnonzero(~np.isnan(m["epoch"])):
        rows.append({k: float(m[k][i]) for k in EPOCH_KEYS if k in m and not math.isnan(m[k][i])})
    return rows


def _row_difference(want: dict[str, float], got: dict[str, float]) -> str:
    for k in sorted(set(want) | set(got), key=lambda k: (EPOCH_KEYS + (k,)).index(k)):
        a, b = want.get(k), got.get(k)
        if a is None or b is None or not _same(a, b):
            return f"{k} is {_fmt(b)}, logged {_fmt(a)}"
    return ""


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _fmt(v: Any) -> str:
    if v is None:
        return "absent"
    if isinstance(v, float):
        return f"{v:.10g}"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _last_logged_step(out_dir: Path, e: Any) -> int:
    """The replay's step where no trainer was seen yet (the probe, the initial programming, step 1): that of the
    last operation the replay's own log holds (a program is logged before it is sent), else the logged one's."""
    from drivers.runlog import RunLogError, RunLogReader

    try:
        with RunLogReader(out_dir / LOG_FILE) as r:
            steps = [int(x[-1]) for x in (r.read_events()["step"], r.program_events()["step"]) if len(x)]
            seqs = [int(x[-1]) for x in (r.read_events()["seq"], r.program_events()["seq"]) if len(x)]
        if steps:
            return steps[int(np.argmax(seqs))]
    except (RunLogError, OSError):
        pass
    return int(e.logged_step or 0)


def _compare_logs(logged: Path, replayed: Path, out_dir: Path) -> dict[str, int]:
    """The whole of both logs: read events, programs, metrics; ReplayDiverged at the first difference."""
    from drivers.runlog import RunLogReader

    with RunLogReader(logged) as a, RunLogReader(replayed) as b:
        ra, rb = a.read_events(), b.read_events()
        pa, pb = a.programs(), b.programs()
        ma, mb = _metric_records(a.metrics()), _metric_records(b.metrics())
        n_dev = int(ra["count"].sum()) if len(ra["count"]) else 0
    last_step = max([int(x) for x in rb["step"][-1:]] + [s for s, _, _ in pb[-1:]], default=0)
    for i in range(min(len(pa), len(pb))):
        (sa, ta, x), (sb, tb, y) = pa[i], pb[i]
        what = _program_change(x, y)
        if sa != sb:
            what = f"logged at step {sa}" + (f"; {what}" if what else "")
        elif not (_same(ta, tb)) and not what:
            what = f"its time is {tb!r} s, logged {ta!r} s"
        if what:
            raise ReplayDiverged(sb, y.program_id, f"program {i} of the log (id {x.program_id}): {what}", out_dir)
    if len(pa) != len(pb):
        step = pb[len(pa)][0] if len(pb) > len(pa) else last_step
        more = (f"the replay sent {len(pb) - len(pa)} program(s) the log does not hold"
                if len(pb) > len(pa) else
                f"the log holds {len(pa) - len(pb)} more program(s), next program {pa[len(pb)][2].program_id} "
                f"(step {pa[len(pb)][0]}), which the replay never sent")
        raise ReplayDiverged(step, None, more, out_dir)
    n = min(len(ra["seq"]), len(rb["seq"]))
    for key in ("step", "reason", "count", "t_s"):
        x, y = ra[key][:n], rb[key][:n]
        bad = np.flatnonzero(~((x == y) | (_isnan(x) & _isnan(y))))
        if bad.size:
            i = int(bad[0])
            raise ReplayDiverged(int(rb["step"][i]), None, f"read {i}: its {key} is {y[i]!r}, logged {x[i]!r}", out_dir)
    if len(ra["seq"]) != len(rb["seq"]):
        if len(ra["seq"]) > n:
            i = n
            more = (f"the log holds {len(ra['seq']) - n} more read(s), next at step {int(ra['step'][i])} (reason "
                    f"{str(ra['reason'][i])!r}), which the replay never made")
        else:
            more = f"a read that was never logged: the replay made {len(rb['seq']) - n} more read(s)"
        raise ReplayDiverged(last_step, None, more, out_dir)
    for i in range(min(len(ma), len(mb))):
        (sa, xa), (sb, xb) = ma[i], mb[i]
        diff = _metric_difference(sa, xa, sb, xb)
        if diff:
            raise ReplayDiverged(sb, None, f"metrics record {i}: {diff}", out_dir)
    if len(ma) != len(mb):
        k = min(len(ma), len(mb))
        extra = ma[k] if len(ma) > k else mb[k]
        who = "the log holds" if len(ma) > k else "the replay logged"
        raise ReplayDiverged(extra[0], None, f"{who} {abs(len(ma) - len(mb))} more metrics record(s), next at step "
                             f"{extra[0]}: {', '.join(sorted(extra[1]))}", out_dir)
    return {"programs": len(pa), "read_events": len(ra["seq"]), "device_reads": n_dev, "metrics": len(ma)}


def _isnan(x: np.ndarray) -> np.ndarray:
    return np.isnan(x) if np.issubdtype(x.dtype, np.floating) else np.zeros(x.shape, bool)


def _program_change(x: Any, y: Any) -> str:
    if x.program_id != y.program_id:
        return f"its id is {y.program_id}, logged {x.program_id}"
    if x.n_devices != y.n_devices or not np.array_equal(x.addresses, y.addresses):
        return f"addresses differ ({x.n_devices} logged, {y.n_devices} sent)"
    if not np.array_equal(x.set_counts, y.set_counts):
        k = int(np.flatnonzero(x.set_counts != y.set_counts)[0])
        return f"SET count of device {int(y.addresses[k])} is {int(y.set_counts[k])}, logged {int(x.set_counts[k])}"
    if not np.array_equal(x.reset, y.reset):
        k = int(np.flatnonzero(x.reset != y.reset)[0])
        return f"RESET of device {int(y.addresses[k])} is {bool(y.reset[k])}, logged {bool(x.reset[k])}"
    if x.shapes != y.shapes:
        return f"pulse shapes {y.shapes} differ from the logged {x.shapes}"
    return ""


def _metric_records(m: dict[str, np.ndarray]) -> list[tuple[int, dict[str, float]]]:
    """(step, {name: value}) per log_metrics call, the link counters left out (a replay has no link)."""
    names = [k for k in m if k not in ("step", "wall_s") and not k.startswith("link_")]
    out = []
    for i in range(len(m["step"])):
        row = {k: float(m[k][i]) for k in names if not math.isnan(m[k][i])}
        if row:
            out.append((int(m["step"][i]), row))
    return out


def _metric_difference(sa: int, a: dict[str, float], sb: int, b: dict[str, float]) -> str:
    if sa != sb:
        return f"logged at step {sa} ({', '.join(sorted(a))}), the replay's at step {sb} ({', '.join(sorted(b))})"
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b or not _same(a[k], b[k]):
            return f"{k} is {_fmt(b.get(k))}, logged {_fmt(a.get(k))}"
    return ""


def _compare_summaries(a: dict[str, Any], b: dict[str, Any], out_dir: Path) -> None:
    for k in SUMMARY_KEYS:
        if k in a and json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True):
            raise ReplayDiverged(int(b.get("steps") or 0), None, f"summary.json {k} is {_fmt(b.get(k))}, "
                                 f"logged {_fmt(a.get(k))}", out_dir)
