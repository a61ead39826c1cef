"""A run folder read into arrays: what the run log, summary.json and config.toml say about one run.

Everything comes from the log's flushed rows through RunLogReader (SWMR), so a run still being written
and a run killed mid-write both load: they simply hold fewer rows. summary.json (written when a run
ends or stops) and config.toml are read when present, never required.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from drivers.runlog import RunLogError, RunLogReader

from .taskmetric import CLASSIFY, task_metric

#: The files of a run folder (hil/run.py and calibration/run.py write them).
TRAIN_LOG = "run.h5"
CALIBRATION_LOG = "calibration.h5"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.toml"
CHECKPOINT_FILE = "checkpoint.npz"

#: Read reasons that read every mapped device (docs/run-log.md); the others read a few devices.
FULL_READ_REASONS = ("initial", "periodic", "evaluation", "resume")
#: Full reads loaded for the histograms: all initial / evaluation / resume reads up to this many, periodic
#: ones evenly spaced to fill it (a long run may hold hundreds; each is a whole array's conductances).
MAX_FULL_READS = 12
#: Device rows read at a time when replaying every read for the last-known conductances.
READ_CHUNK = 1 << 22


class AnalysisError(Exception):
    """A run folder that cannot be analysed; the message is one line naming the path and the problem.

    exit_code: what the command line exits with: 2 for a bad argument (no such run folder), 1 otherwise.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def find_log(path: str | Path) -> tuple[Path, Path]:
    """(run folder, its log) for a run folder or a log file; AnalysisError saying what is wrong otherwise."""
    p = Path(path)
    if not p.exists():
        raise AnalysisError(f"{p} does not exist", 2)
    if p.is_file():
        if p.suffix != ".h5":
            raise AnalysisError(f"{p} is not a run folder or a run log (.h5)", 2)
        return p.parent, p
    if not p.is_dir():
        raise AnalysisError(f"{p} is not a run folder", 2)
    for name in (TRAIN_LOG, CALIBRATION_LOG):
        if (p / name).is_file():
            return p, p / name
    raise AnalysisError(f"{p} is not a run folder: it has no {TRAIN_LOG} (pcm-hil train) or "
                        f"{CALIBRATION_LOG} (pcm-hil characterize)", 2)


def writer_alive(log: Path) -> bool:
    """Whether a RunLogWriter holds the log's writer lock now (the run is still being written).

    The lock is a file beside the log (drivers/runlog/lock.py: flock, LockFileEx or a marker file, as
    the system has); asking takes it for an instant without waiting, so it changes nothing.
    """
    from drivers.runlog.lock import writer_alive as _alive

    return _alive(log)


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested TOML table as dotted keys: {"update": {"lr": 0.1}} -> {"update.lr": 0.1}."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _json_attr(attrs: dict[str, Any], name: str) -> Any:
    if name not in attrs:
        return None
    try:
        return json.loads(_text(attrs[name]))
    except ValueError:
        return None


@dataclass
class FullRead:
    """One read of every mapped device: why, when, and what it read."""

    reason: str
    step: int
    t_s: float
    addresses: npt.NDArray[np.int64]
    g_us: npt.NDArray[np.float32]


@dataclass
class Layer:
    """A layer's place on the array: weight (i, j) is beta * (G[plus[i, j]] - G[minus[i, j]]); with several
    devices per polarity plus and minus are (copies, rows, cols) and the copies' conductances add up."""

    index: int
    name: str
    beta: float
    plus: npt.NDArray[np.int64]
    minus: npt.NDArray[np.int64]

    def weights(self, g_us: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """The layer's weights (fan_in + 1, fan_out) from conductances g_us (uS) of every device."""
        gp, gm = g_us[self.plus].astype(np.float64), g_us[self.minus].astype(np.float64)
        if self.plus.ndim == 3:
            gp, gm = gp.sum(axis=0), gm.sum(axis=0)
        return self.beta * (gp - gm)


@dataclass
class Run:
    """What one run folder holds, as arrays. Steps are the trainer's step counter (one per minibatch)."""

    path: Path
    log: Path
    kind: str  # "train" or "calibration"
    attrs: dict[str, Any]
    config: dict[str, Any]  # config.toml (or the log's config_toml), nested; {} for a calibration log
    summary: dict[str, Any] | None
    live: bool
    counts: dict[str, int]
    torn_tail: dict[str, int]
    n_devices: int
    geometry: tuple[int, int] | None  # (rows, cols) of the array
    epochs: dict[str, npt.NDArray[np.float64]]  # "epoch", "step", "test_accuracy", ... one entry per epoch
    baseline_epochs: dict[str, npt.NDArray[np.float64]] | None  # "epoch", "test_accuracy" where the log has them
    refresh_step: npt.NDArray[np.int64]
    refresh_pairs: npt.NDArray[np.float64]
    prog_step: npt.NDArray[np.int64]  # per applied program, in logged order
    prog_id: npt.NDArray[np.int64]
    prog_set: npt.NDArray[np.int64]
    prog_reset: npt.NDArray[np.int64]
    unapplied: list[int]
    pulses_per_device: npt.NDArray[np.int64]
    full_reads: list[FullRead]
    full_reads_total: int  # full reads in the log (full_reads holds at most MAX_FULL_READS of them)
    final_g: npt.NDArray[np.float64]  # last read conductance per device address (NaN: never read)
    last_read_step: int
    layers: list[Layer]
    last_step: int
    notes: list[str] = field(default_factory=list)
    calibration: Any = None  # calibration.data.CalibrationData for a calibration log that loads
    metric: dict[str, Any] = field(default_factory=lambda: dict(CLASSIFY))  # its task's metric (taskmetric.py)

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)

    @property
    def finished(self) -> bool:
        return bool(self.summary and self.summary.get("finished")) and not self.live

    @property
    def state(self) -> str:
        """One phrase: finished, being written, stopped (resumable) or killed."""
        if self.live:
            return f"being written (live; the log's flushed rows reach step {self.last_step})"
        if self.kind == "calibration":
            return "calibration log" + ("" if self.calibration is not None else " (incomplete: its reads fall short "
                                                                                 "of its plan)")
        s = self.summary
        resumable = (self.path / CHECKPOINT_FILE).exists()
        if s and s.get("finished"):
            return "finished"
        if s and int(s.get("steps", -1)) >= self.last_step:
            how = " by a signal" if s.get("stopped_by_signal") else ""
            return f"stopped{how} at step {s.get('steps')}" + ("; resumable" if resumable else "")
        return (f"stopped without finishing (killed or crashed; the log's flushed rows reach step {self.last_step})"
                + ("; resumable" if resumable else ""))

    @property
    def epochs_done(self) -> int:
        e = self.epochs.get("epoch")
        return int(e.max()) if e is not None and e.size else 0

    @property
    def epochs_planned(self) -> int | None:
        v = self.config.get("update", {}).get("epochs")
        return int(v) if isinstance(v, int) else None

    @property
    def test_accuracy(self) -> float | None:
        """The chip's test accuracy at the last finished epoch."""
        acc = self.epochs.get("test_accuracy")
        if acc is not None and acc.size and np.isfinite(acc[-1]):
            return float(acc[-1])
        v = (self.summary or {}).get("test_accuracy")
        return float(v) if isinstance(v, (int, float)) and not self.live else None

    @property
    def baseline_accuracy(self) -> float | None:
        """The software baseline's final test accuracy: summary.json's, else the log's last baseline epoch."""
        v = (self.summary or {}).get("baseline_test_accuracy")
        if isinstance(v, (int, float)):
            return float(v)
        b = self.baseline_epochs
        if b is not None and b["test_accuracy"].size:
            return float(b["test_accuracy"][-1])
        return None

    @property
    def final_metric(self) -> float | None:
        """The chip's value of the task's metric (test accuracy, bits per character...) at the last epoch."""
        name = self.metric["name"]
        if name == "test_accuracy":
            return self.test_accuracy
        v = self.epochs.get(name)
        if v is not None and v.size and np.isfinite(v[-1]):
            return float(v[-1])
        s = (self.summary or {}).get(name)
        return float(s) if isinstance(s, (int, float)) and not self.live else None

    @property
    def baseline_metric(self) -> float | None:
        """The software baseline's final value of the task's metric."""
        name = self.metric["name"]
        if name == "test_accuracy":
            return self.baseline_accuracy
        v = (self.summary or {}).get(f"baseline_{name}")
        if isinstance(v, (int, float)):
            return float(v)
        b = self.baseline_epochs
        return float(b[name][-1]) if b is not None and name in b and b[name].size else None

    @property
    def set_pulses(self) -> int:
        return int(self.prog_set.sum())

    @property
    def reset_pulses(self) -> int:
        return int(self.prog_reset.sum())

    @property
    def refreshes(self) -> int:
        """Device pairs refreshed, summed over the log's refreshed_pairs metrics."""
        return int(self.refresh_pairs.sum())

    @property
    def us_per_sample(self) -> float | None:
        v = (self.summary or {}).get("us_per_sample")
        return float(v) if isinstance(v, (int, float)) and not self.live else None

    def flat_config(self) -> dict[str, Any]:
        return flatten(self.config)


def _config(run_dir: Path, attrs: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    text = None
    if (run_dir / CONFIG_FILE).is_file():
        try:
            text = (run_dir / CONFIG_FILE).read_text(encoding="utf-8")
        except OSError as e:
            notes.append(f"{CONFIG_FILE} is unreadable ({e.strerror}); the log's copy is used")
    if text is None and "config_toml" in attrs:
        text = _text(attrs["config_toml"])
    if text is None:
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        notes.append(f"the run's config is not valid TOML ({e}); config differences are not shown")
        return {}


def _summary(run_dir: Path, notes: list[str]) -> dict[str, Any] | None:
    p = run_dir / SUMMARY_FILE
    if not p.is_file():
        return None
    try:
        s = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        notes.append(f"{SUMMARY_FILE} is unreadable ({e}); the log alone is used")
        return None
    return s if isinstance(s, dict) else None


def _epochs(m: dict[str, np.ndarray], metric: dict[str, Any] = CLASSIFY) -> dict[str, np.ndarray]:
    """One entry per epoch (the last logged, should an epoch be logged twice) with its metrics."""
    if "epoch" not in m:
        return {"epoch": np.zeros(0), "step": np.zeros(0)}
    sel = np.flatnonzero(np.isfinite(m["epoch"]))
    ep = m["epoch"][sel]
    # the last row of each epoch, in epoch order
    _, last = np.unique(ep[::-1], return_index=True)
    rows = sel[::-1][last]
    out = {"epoch": m["epoch"][rows], "step": m["step"][rows].astype(np.float64)}
    for name in (metric["name"], metric["train"], "refreshes", "set_pulses", "reset_pulses", "programs_applied"):
        if name in m:
            out[name] = m[name][rows]
    return out


def baseline_metric_names(names: list[str], metric: str = "test_accuracy") -> list[str]:
    """Metric names that hold the software baseline's per-epoch metric (e.g. baseline_test_accuracy)."""
    return [n for n in names if "baseline" in n and metric in n]


def _baseline_epochs(m: dict[str, np.ndarray], metric: str = "test_accuracy") -> dict[str, np.ndarray] | None:
    names = baseline_metric_names(list(m), metric)
    if not names:
        return None
    acc = m[names[0]]
    sel = np.flatnonzero(np.isfinite(acc))
    if not sel.size:
        return None
    ep_name = next((n for n in m if "baseline" in n and n.endswith("epoch")), "epoch")
    ep = m[ep_name][sel] if ep_name in m else np.full(sel.size, np.nan)
    if not np.isfinite(ep).all():
        ep = np.arange(1, sel.size + 1, dtype=np.float64)
    _, last = np.unique(ep[::-1], return_index=True)
    rows = sel[::-1][last]
    ep = ep[::-1][last]
    return {"epoch": ep, metric: acc[rows], "name": np.array([names[0]])}


def _n_devices(attrs: dict[str, Any], arrays: list[np.ndarray]) -> tuple[int, tuple[int, int] | None]:
    try:
        rows, cols = int(_text(attrs["driver_rows"])), int(_text(attrs["driver_cols"]))
        return rows * cols, (rows, cols)
    except (KeyError, ValueError):
        top = max((int(a.max()) + 1 for a in arrays if a.size), default=0)
        return top, None


def _layers(r: RunLogReader, attrs: dict[str, Any], notes: list[str]) -> list[Layer]:
    names = set(r.array_names())
    betas = _json_attr(attrs, "beta_per_layer_json") or []
    info = _json_attr(attrs, "network_layers_json") or []
    layers = []
    i = 0
    while f"mapping/layer{i}_gplus" in names and f"mapping/layer{i}_gminus" in names:
        if i >= len(betas):
            notes.append(f"no beta for layer {i} in beta_per_layer_json: its weights are not shown")
            break
        name = str(info[i].get("name", i)) if i < len(info) and isinstance(info[i], dict) else str(i)
        layers.append(Layer(i, name, float(betas[i]), r.array(f"mapping/layer{i}_gplus").astype(np.int64),
                            r.array(f"mapping/layer{i}_gminus").astype(np.int64)))
        i += 1
    return layers


def _pick_full_reads(ev: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    full = np.flatnonzero(np.isin(ev["reason"], FULL_READ_REASONS))
    if full.size <= MAX_FULL_READS:
        return full, int(full.size)
    periodic = full[ev["reason"][full] == "periodic"]
    other = full[ev["reason"][full] != "periodic"]
    if other.size >= MAX_FULL_READS:
        keep = other[np.unique(np.linspace(0, other.size - 1, MAX_FULL_READS).round().astype(int))]
    else:
        k = MAX_FULL_READS - other.size
        keep = np.r_[other, periodic[np.unique(np.linspace(0, periodic.size - 1, k).round().astype(int))]]
    return np.sort(keep), int(full.size)


def _last_known(r: RunLogReader, end: int, n: int) -> np.ndarray:
    """Every logged read in order: the last conductance each device address was read at."""
    g = np.full(n, np.nan)
    for start in range(0, end, READ_CHUNK):
        a, v = r.read_devices(start, min(start + READ_CHUNK, end))
        ok = (a >= 0) & (a < n)
        a, v = a[ok][::-1], v[ok][::-1]
        u, first = np.unique(a, return_index=True)
        g[u] = v[first]
    return g


def open_log(log: Path) -> RunLogReader:
    """A reader of the run log (SWMR); AnalysisError with one line if it cannot be opened."""
    try:
        return RunLogReader(log)
    except RunLogError as e:
        raise AnalysisError(str(e)) from None
    except OSError as e:
        raise AnalysisError(f"cannot read {log}: {e.strerror or e}") from None


def load_run(path: str | Path) -> Run:
    """Read a run folder (or a run log file) into a Run; AnalysisError with one line if it cannot be read."""
    run_dir, log = find_log(path)
    live = writer_alive(log)
    notes: list[str] = []
    reader = open_log(log)
    try:
        with reader as r:
            return _load(r, run_dir, log, live, notes)
    except RunLogError as e:
        raise AnalysisError(str(e)) from None
    except OSError as e:
        raise AnalysisError(f"cannot read {log}: {e.strerror or e}") from None


def _load(r: RunLogReader, run_dir: Path, log: Path, live: bool, notes: list[str]) -> Run:
    attrs = dict(r.attrs)
    kind = "calibration" if ("calibration_plan" in attrs or _text(attrs.get("run_kind", "")) == "calibration") \
        else "train"
    summary = _summary(run_dir, notes) if kind == "train" else None
    config = _config(run_dir, attrs, notes) if kind == "train" else {}
    m = r.metrics()
    metric = task_metric(attrs)
    ev = r.read_events()
    pev = r.program_events()
    unapplied = {int(x) for x in (summary or {}).get("unapplied_program_ids") or []}
    if "unapplied_program_id" in m:
        unapplied |= {int(x) for x in m["unapplied_program_id"][np.isfinite(m["unapplied_program_id"])]}

    progs = r.programs()
    prog_id = np.array([p.program_id for _, _, p in progs], np.int64)
    applied = ~np.isin(prog_id, list(unapplied)) if unapplied else np.ones(prog_id.size, bool)
    prog_step = np.array([s for s, _, _ in progs], np.int64)[applied]
    prog_set = np.array([int(p.set_counts.sum()) for _, _, p in progs], np.int64)[applied]
    prog_reset = np.array([int(p.reset.sum()) for _, _, p in progs], np.int64)[applied]
    kept = [p for (_, _, p), ok in zip(progs, applied, strict=True) if ok]
    addr_all = np.concatenate([p.addresses for p in kept]) if kept else np.zeros(0, np.int64)
    pulses_all = (np.concatenate([p.set_counts + p.reset for p in kept]) if kept else np.zeros(0, np.int64))

    layers = _layers(r, attrs, notes) if kind == "train" else []
    mapped = [lm.plus for lm in layers] + [lm.minus for lm in layers] + [addr_all]
    end = int(ev["start"][-1] + ev["count"][-1]) if ev["start"].size else 0
    if not attrs.get("driver_rows") and end:
        mapped.append(r.read_devices(max(0, end - READ_CHUNK), end)[0])
    n, geometry = _n_devices(attrs, mapped)
    if addr_all.size and int(addr_all.max()) >= n:
        n = int(addr_all.max()) + 1
    pulses = np.bincount(addr_all, weights=pulses_all, minlength=n).astype(np.int64) if n else np.zeros(0, np.int64)

    full_reads: list[FullRead] = []
    picked, n_full = _pick_full_reads(ev) if kind == "train" else (np.zeros(0, int), 0)
    for i in picked:
        s, c = int(ev["start"][i]), int(ev["count"][i])
        a, g = r.read_devices(s, s + c)
        full_reads.append(FullRead(str(ev["reason"][i]), int(ev["step"][i]), float(ev["t_s"][i]), a, g))
    final_g = _last_known(r, end, n) if kind == "train" and n else np.full(n, np.nan)

    steps = [int(x.max()) for x in (m["step"], ev["step"], pev["step"]) if x.size]
    last_step = max(steps, default=0)
    if summary and not live and summary.get("finished"):
        last_step = max(last_step, int(summary.get("steps", 0)))
    if r.torn_tail:
        notes.append("the log has a torn tail (rows a killed writer wrote without their checksums): "
                     + ", ".join(f"{k} {v}" for k, v in sorted(r.torn_tail.items())) + " rows, not shown")
    if live and summary is not None:
        notes.append(f"{SUMMARY_FILE} is from an earlier part of the run (the run is being written); "
                     "the figures use the log")

    run = Run(path=run_dir, log=log, kind=kind, attrs=attrs, config=config, summary=summary, live=live,
              counts=r.counts, torn_tail=r.torn_tail, n_devices=n, geometry=geometry, epochs=_epochs(m, metric),
              baseline_epochs=_baseline_epochs(m, metric["name"]), metric=metric,
              refresh_step=(m["step"][np.isfinite(m["refreshed_pairs"])].astype(np.int64)
                            if "refreshed_pairs" in m else np.zeros(0, np.int64)),
              refresh_pairs=(m["refreshed_pairs"][np.isfinite(m["refreshed_pairs"])]
                             if "refreshed_pairs" in m else np.zeros(0)),
              prog_step=prog_step, prog_id=prog_id[applied], prog_set=prog_set, prog_reset=prog_reset,
              unapplied=sorted(unapplied), pulses_per_device=pulses, full_reads=full_reads, full_reads_total=n_full,
              final_g=final_g, last_read_step=int(ev["step"][-1]) if ev["step"].size else 0, layers=layers,
              last_step=last_step, notes=notes)
    if kind == "calibration":
        run.calibration = _calibration_data(log, notes)
    return run


def _calibration_data(log: Path, notes: list[str]) -> Any:
    from calibration.errors import NotACalibrationLog

    try:
        from calibration.data import load_calibration_log

        return load_calibration_log(log)
    except NotACalibrationLog as e:
        notes.append(f"the calibration measurements cannot be rebuilt: {e}")
        return None
