"""Sweeps: many training runs of one base config over a grid and/or random samples of config keys, times seeds,
each an ordinary RUN_DIR, run as Ray tasks (docs/sweep.md).

load_sweep() reads and checks SWEEP.toml and every point's config before anything starts; check_out_dir()
checks what DIR already holds (a re-run skips finished points and resumes interrupted ones); run_sweep()
runs the points on a local Ray instance (or an existing cluster) and writes DIR/sweep.csv and the plots.
Only simulated chips: a real tester is one chip, and a sweep would program it from several processes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, RunConfig, load_config, validate_config

CSV_FILE = "sweep.csv"
STATE_FILE = "sweep.json"
SPEC_FILE = "sweep.toml"
#: Per-point lock files (held by the task running the point) live here, out of the points' folders.
LOCK_DIR = ".sweep"
#: Top-level keys of SWEEP.toml.
TOP_KEYS = ("base", "seeds", "baseline", "grid", "random")
RANDOM_KEYS = ("samples", "seed", "keys")
DISTRIBUTIONS = ("uniform", "log_uniform", "integers", "choice")
#: Random floats are rounded to this many significant digits, so a point's folder name is its exact value.
RANDOM_DIGITS = 4
#: Folder names longer than this are cut and given a hash of the whole name.
MAX_NAME = 120
#: How long a point's task waits for the lock of a point another (dying) sweep process still holds, s.
LOCK_WAIT_S = 30.0


class SweepError(ValueError):
    """SWEEP.toml, a point's config or DIR cannot be used; the message is one line naming the key or point."""


# --------------------------------------------------------------------------------------------- the spec

@dataclass(frozen=True)
class Point:
    """One run of the sweep: its folder name, the swept keys' values (dotted keys), its seed and full config."""

    name: str
    values: dict[str, Any]
    seed: int
    cfg: RunConfig


@dataclass
class Sweep:
    """A loaded SWEEP.toml: the base config, the swept keys (in order) and every point."""

    path: Path
    base: RunConfig
    keys: list[str]
    points: list[Point]
    seeds: list[int]
    baseline: bool = False
    text: str = ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _did_you_mean(word: str, choices: tuple[str, ...]) -> str:
    import difflib

    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_sweep(path: str | Path) -> Sweep:
    """Read SWEEP.toml, expand its points and validate every point's config; SweepError (one line) otherwise.

    Nothing is created or started here.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        spec = tomllib.loads(text)
    except FileNotFoundError:
        raise SweepError(f"no sweep file at {p}") from None
    except IsADirectoryError:
        raise SweepError(f"{p} is a directory, not a sweep file") from None
    except OSError as e:
        raise SweepError(f"cannot read {p}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SweepError(f"{p} is not valid TOML: {_one_line(e)}") from None
    for k in spec:
        if k not in TOP_KEYS:
            raise SweepError(f"{p}: unknown key {k!r}{_did_you_mean(k, TOP_KEYS)}; a sweep file has "
                             f"{', '.join(TOP_KEYS)}")
    base = _base_config(spec.get("base"), p)
    grid = _grid(spec.get("grid", {}), p)
    rnd_keys, samples = _random(spec.get("random"), p)
    both = set(grid) & set(rnd_keys)
    if both:
        raise SweepError(f"{p}: {sorted(both)[0]!r} is in both [grid] and [random.keys]")
    seeds = spec.get("seeds", [base.seed])
    if not isinstance(seeds, list) or not seeds or \
            any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise SweepError(f"{p}: seeds must be a non-empty list of non-negative integers, e.g. seeds = [0, 1]")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{p}: seeds lists a seed twice: {seeds}")
    baseline = spec.get("baseline", False)
    if not isinstance(baseline, bool):
        raise SweepError(f"{p}: baseline must be true or false")
    keys = list(grid) + list(rnd_keys)
    short = short_names(keys)
    combos = [dict(zip(grid, vals, strict=True)) for vals in product(*grid.values())] if grid else [{}]
    points: list[Point] = []
    names: dict[str, str] = {}
    for sample in samples or [{}]:
        for combo in combos:
            values = {**combo, **sample}
            for seed in seeds:
                name = point_name(values, seed, short)
                cfg = _point_config(base, values, seed, name)
                lower = name.lower()  # folders differing only in case collide on some file systems
                if lower in names:
                    raise SweepError(f"points {names[lower]!r} and {name!r} would share a folder; change a value")
                names[lower] = name
                points.append(Point(name, values, seed, cfg))
    return Sweep(p, base, keys, points, list(seeds), baseline, text)


def _base_config(base: Any, where: Path) -> RunConfig:
    """[base] inline, or base = "run.toml" (relative to the sweep file); the default config when absent."""
    try:
        if base is None:
            cfg = RunConfig()
        elif isinstance(base, str):
            f = Path(base).expanduser()
            cfg = load_config(f if f.is_absolute() else where.parent / f)
        elif isinstance(base, dict):
            cfg = validate_config(base, f"{where} [base]")
        else:
            raise SweepError(f"{where}: base must be a run config table ([base]) or the path of a run TOML")
    except ConfigError as e:
        raise SweepError(_one_line(e)) from None
    _simulated_only(cfg, "the base config")
    return cfg


def _grid(grid: Any, where: Path) -> dict[str, list[Any]]:
    if not isinstance(grid, dict):
        raise SweepError(f"{where}: [grid] must be a table of dotted config keys, e.g. \"update.lr\" = [0.03, 0.1]")
    out: dict[str, list[Any]] = {}
    for key, vals in _dotted(grid, lambda v: isinstance(v, dict)).items():
        _check_key(key, where, "[grid]")
        if not isinstance(vals, list) or not vals:
            raise SweepError(f"{where}: [grid] {key!r} must be a non-empty list of values")
        out[key] = vals
    return out


def _dotted(table: dict[str, Any], is_table: Callable[[Any], bool], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as dotted keys: an unquoted update.lr = [...] is {"update": {"lr": [...]}} in TOML."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if is_table(v) and v:
            out.update(_dotted(v, is_table, key + "."))
        else:
            out[key] = v
    return out


def _check_key(key: str, where: Path, table: str) -> None:
    if isinstance(key, str) and key == "seed":
        raise SweepError(f"{where}: {table} 'seed': the run's seed is swept by the top-level seeds = [...]")
    if not isinstance(key, str) or not key or any(not part.isidentifier() for part in key.split(".")):
        raise SweepError(f"{where}: {table} {key!r} is not a dotted config key (e.g. update.lr)")


def _random(rnd: Any, where: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """[random]: samples (count), seed (of the draw) and keys (one distribution each); returns the drawn samples."""
    if rnd is None:
        return {}, []
    if not isinstance(rnd, dict):
        raise SweepError(f"{where}: [random] must be a table with samples, seed and [random.keys]")
    for k in rnd:
        if k not in RANDOM_KEYS:
            raise SweepError(f"{where}: [random] unknown key {k!r}{_did_you_mean(k, RANDOM_KEYS)}; "
                             f"it has {', '.join(RANDOM_KEYS)}")
    n, seed, keys = rnd.get("samples"), rnd.get("seed", 0), rnd.get("keys", {})
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 100_000:
        raise SweepError(f"{where}: [random] samples must be an integer from 1 to 100000 (points drawn)")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SweepError(f"{where}: [random] seed must be a non-negative integer")
    if not isinstance(keys, dict) or not keys:
        raise SweepError(f"{where}: [random.keys] must name at least one key, e.g. "
                         "\"update.lr\" = { log_uniform = [0.01, 0.3] }")
    keys = _dotted(keys, lambda v: isinstance(v, dict) and not (len(v) == 1 and next(iter(v)) in DISTRIBUTIONS))
    for key, dist in keys.items():
        _check_key(key, where, "[random.keys]")
        _check_distribution(key, dist, where)
    rng = np.random.default_rng([seed, 14])
    samples = [{key: _draw(rng, dist) for key, dist in keys.items()} for _ in range(n)]
    return keys, samples


def _check_distribution(key: str, dist: Any, where: Path) -> None:
    what = f"{where}: [random.keys] {key!r}"
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise SweepError(f"{what} must be one of {{ uniform = [lo, hi] }}, {{ log_uniform = [lo, hi] }}, "
                         "{ integers = [lo, hi] }, { choice = [a, b, ...] }")
    kind, arg = next(iter(dist.items()))
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise SweepError(f"{what}: choice needs a non-empty list of values")
        return
    nums = isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          for v in arg)
    if not nums or not arg[0] <= arg[1] or not all(math.isfinite(v) for v in arg):
        raise SweepError(f"{what}: {kind} needs [lo, hi] with lo <= hi")
    if kind == "integers" and not all(isinstance(v, int) for v in arg):
        raise SweepError(f"{what}: integers needs integer bounds [lo, hi] (both included)")
    if kind == "log_uniform" and arg[0] <= 0:
        raise SweepError(f"{what}: log_uniform needs 0 < lo <= hi")


def _draw(rng: np.random.Generator, dist: dict[str, Any]) -> Any:
    kind, arg = next(iter(dist.items()))
    if kind == "choice":
        return arg[int(rng.integers(len(arg)))]
    if kind == "integers":
        return int(rng.integers(arg[0], arg[1], endpoint=True))
    lo, hi = float(arg[0]), float(arg[1])
    v = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if kind == "log_uniform" else float(rng.uniform(lo, hi))
    return float(f"{v:.{RANDOM_DIGITS}g}")


def _point_config(base: RunConfig, values: dict[str, Any], seed: int, name: str) -> RunConfig:
    try:
        cfg = base.with_overrides(**values, seed=seed)
    except ConfigError as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:]) or _one_line(e)
        raise SweepError(f"point {name}: {detail}") from None
    _simulated_only(cfg, f"point {name}")
    return cfg


def _simulated_only(cfg: RunConfig, what: str) -> None:
    """A sweep trains on simulated chips only (the in-process mock): a tester is one chip, not one per point."""
    d = cfg.driver
    if d.kind in ("visa", "serial"):
        raise SweepError(f"{what}: driver.kind = {d.kind!r} ({d.resource}) is a real tester; a sweep runs on "
                         "simulated chips only (driver.kind = \"mock\"): a tester is one chip, not one per point")
    if d.kind != "mock":
        raise SweepError(f"{what}: driver.kind = {d.kind!r}; a sweep runs on simulated chips only "
                         "(driver.kind = \"mock\", one simulated chip per point)")


def short_names(keys: list[str]) -> dict[str, str]:
    """The name each swept key has in folder names: its last part ("lr"), or the whole key where two share one."""
    leaf = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if leaf.count(s) == 1 and s != "seed" else k) for k, s in zip(keys, leaf, strict=True)}


def format_value(v: Any) -> str:
    """A value as it appears in a folder name: 0.1, 1e-05, 16_32 for [16, 32], true / false."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "_".join(format_value(x) for x in v) if v else "empty"
    if isinstance(v, dict):
        return "_".join(f"{k}-{format_value(x)}" for k, x in v.items()) if v else "empty"
    return str(v)


def point_name(values: dict[str, Any], seed: int, short: dict[str, str]) -> str:
    """The point's folder name, e.g. 'lr=0.1,threshold_us=6.0,seed=1': filesystem-safe and deterministic."""
    parts = [f"{short[k]}={format_value(v)}" for k, v in values.items()] + [f"seed={seed}"]
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "-", ",".join(parts))
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME - 9] + "~" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


# --------------------------------------------------------------------------------------------- DIR

#: What a point's folder holds when the sweep looks at it.
NEW, FINISHED, RESUMABLE, RESTART = "new", "finished", "resumable", "restart"


def point_state(run_dir: Path, cfg: RunConfig) -> str:
    """new (no folder), finished (summary.json says so), resumable (a checkpoint), restart (a run killed before
    its first checkpoint: on the in-process mock its chip died with it, so the point starts again).

    SweepError when the folder is not a run of this config.
    """
    if not run_dir.exists():
        return NEW
    if not run_dir.is_dir():
        raise SweepError(f"{run_dir} exists and is not a folder")
    cfg_file = run_dir / "config.toml"
    if not cfg_file.is_file():
        if any(run_dir.iterdir()):
            raise SweepError(f"{run_dir} exists and is not a pcm-hil run (no config.toml); move it away")
        return RESTART
    try:
        there = load_config(cfg_file)
    except ConfigError as e:
        raise SweepError(f"{run_dir}: {_one_line(e)}") from None
    if there.digest() != cfg.digest():
        raise SweepError(f"{run_dir} holds a run of another config (an earlier sweep with other settings); "
                         "move it away or choose another --out")
    summary = _read_summary(run_dir)
    if summary is not None and summary.get("finished"):
        return FINISHED
    if (run_dir / "checkpoint.npz").is_file():
        return RESUMABLE
    return RESTART


def _read_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def check_out_dir(sweep: Sweep, out: Path) -> dict[str, str]:
    """Each point's state in DIR (see point_state); SweepError (one line) for a folder the sweep cannot use."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} exists and is not a folder")
    states = {}
    for pt in sweep.points:
        try:
            states[pt.name] = point_state(out / pt.name, pt.cfg)
        except SweepError as e:
            raise SweepError(f"point {pt.name}: {e}") from None
    return states


# --------------------------------------------------------------------------------------------- one point (a Ray task)

def run_point(task: dict[str, Any]) -> dict[str, Any]:
    """Run, resume or skip one point in this process (the body of its Ray task); never raises.

    task: name, config (TOML), run_dir, lock, baseline, cwd. Returns status (finished / skipped / failed),
    resumed, error (one line), wall_s (seconds in this call) and the point's summary.
    """
    t0 = time.perf_counter()
    out: dict[str, Any] = {"name": task["name"], "status": "failed", "resumed": False, "error": None,
                           "summary": None, "host": socket.gethostname(), "pid": os.getpid()}
    try:
        # Ray sets OMP_NUM_THREADS to the task's num_cpus; torch's own pool follows its setting, so set it too.
        import torch

        torch.set_num_threads(1)
        from . import run as _run  # noqa: F401 - imported here so its cost (a fresh worker's) is measured apart
        out["import_s"] = time.perf_counter() - t0
        cwd = task.get("cwd")
        if cwd and os.path.isdir(cwd) and os.getcwd() != cwd:
            os.chdir(cwd)  # relative paths of the config (data.path, driver.params_file) as pcm-hil train sees them
            if cwd not in sys.path:
                sys.path.insert(0, cwd)  # network.module = "mynets:build" next to the sweep, as for train
        from .run import RunFinished, resume_run, start_run

        cfg = validate_config(tomllib.loads(task["config"]), f"point {task['name']}")
        run_dir = Path(task["run_dir"])
        with _point_lock(Path(task["lock"])):
            state = point_state(run_dir, cfg)
            if state == FINISHED:
                out.update(status="skipped", summary=_read_summary(run_dir))
            elif state == RESUMABLE:
                out["resumed"] = True
                try:
                    out.update(status="finished", summary=resume_run(run_dir, config=cfg, baseline=task["baseline"]))
                except RunFinished:
                    raise SweepError(f"{run_dir} finished training but has no summary.json (killed as it ended)") \
                        from None
            else:
                if state == RESTART:
                    shutil.rmtree(run_dir)
                out.update(status="finished", summary=start_run(cfg, run_dir, baseline=task["baseline"]))
            summary = out["summary"] or {}
            if not summary.get("finished"):
                out.update(status="failed", error="the run stopped before its last epoch (stopped by a signal?)")
    except Exception as e:  # noqa: BLE001 - a point's failure is reported as one line, the others go on
        out["status"] = "failed"
        out["error"] = f"{type(e).__name__}: {_one_line(e)}"
    out["wall_s"] = time.perf_counter() - t0
    return out


@contextmanager
def _point_lock(path: Path) -> Iterator[None]:
    """Hold the point's lock for the run: a worker of a sweep that was killed may not have died yet.

    filelock takes the system's own lock (flock, LockFileEx), which the system drops when its holder dies.
    """
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=LOCK_WAIT_S)
    try:
        lock.acquire()
    except Timeout:
        raise SweepError(f"the point is being run by another process (lock {path} held for "
                         f"{LOCK_WAIT_S:.0f} s)") from None
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------- results

@dataclass
class PointResult:
    """What became of one point: status finished / skipped / failed / running / pending."""

    name: str
    values: dict[str, Any]
    seed: int
    status: str = "pending"
    resumed: bool = False
    error: str | None = None
    wall_s: float | None = None
    #: Of wall_s: importing torch and the trainer (a fresh Ray worker's first point pays it), s.
    import_s: float | None = None
    metric: str | None = None
    value: float | None = None
    higher_is_better: bool = True
    #: The float64 baseline's value of the metric (baseline = true in SWEEP.toml), else None.
    baseline: float | None = None
    set_pulses: int | None = None
    reset_pulses: int | None = None
    refreshes: int | None = None
    steps: int | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("finished", "skipped")

    def take(self, summary: dict[str, Any] | None) -> None:
        """The figures of the point's summary.json: its metric ("metric" where the task says, else test accuracy)."""
        s = summary or {}
        m = s.get("metric")
        if isinstance(m, dict) and m.get("name"):
            self.metric, self.value = str(m["name"]), m.get("value")
            self.higher_is_better = bool(m.get("higher_is_better", True))
        elif "test_accuracy" in s:
            self.metric, self.value, self.higher_is_better = "test_accuracy", s["test_accuracy"], True
        self.baseline = m.get("baseline") if isinstance(m, dict) else None
        if self.baseline is None and self.metric == "test_accuracy":
            self.baseline = s.get("baseline_test_accuracy")
        for k in ("set_pulses", "reset_pulses", "refreshes", "steps"):
            setattr(self, k, s.get(k))


@dataclass
class SweepResult:
    """The points' results, the wall times and where the table and plots went."""

    out: Path
    results: list[PointResult]
    wall_s: float = 0.0
    ray_start_s: float = 0.0
    #: From the first task submitted to the last result back, s (Ray's start and stop, the table and plots apart).
    tasks_s: float = 0.0
    ray_stop_s: float = 0.0
    workers: int = 0
    csv: Path | None = None
    plots: list[Path] = field(default_factory=list)
    interrupted: bool = False

    @property
    def failed(self) -> list[PointResult]:
        return [r for r in self.results if r.status == "failed"]

    def best(self) -> PointResult | None:
        return best_of(self.results)


def best_of(results: list[PointResult]) -> PointResult | None:
    """The best finished point by its metric (the first point's metric name and direction decide)."""
    done = [r for r in results if r.ok and isinstance(r.value, (int, float)) and math.isfinite(r.value)]
    if not done:
        return None
    name, hib = done[0].metric, done[0].higher_is_better
    same = [r for r in done if r.metric == name]
    return max(same, key=lambda r: r.value) if hib else min(same, key=lambda r: r.value)


EventFn = Callable[[str, PointResult, SweepResult], None]


# --------------------------------------------------------------------------------------------- running

def run_sweep(sweep: Sweep, out: str | Path, *, address: str | None = None, workers: int | None = None,
              on_event: EventFn | None = None, tick: Callable[[SweepResult], None] | None = None) -> SweepResult:
    """Run every point not finished yet as a Ray task (num_cpus=1) and write DIR/sweep.csv and the plots.

    A local Ray instance with `workers` CPUs (default: this machine's) is started and shut down here,
    unless `address` names a running cluster (then `workers` caps the points in flight) or Ray is
    already initialized in this process (it is used as it is). on_event(kind, result, sweep_result)
    is called with kind start / skipped / finished / failed; tick(sweep_result) about twice a second.
    Check the sweep with check_out_dir first: a folder the sweep cannot use fails its point here.
    """
    out = Path(out).resolve()
    made = not out.exists()
    t_start = time.perf_counter()
    res = SweepResult(out, [PointResult(p.name, p.values, p.seed) for p in sweep.points])
    by_name = {r.name: r for r in res.results}
    prior = _read_state(out)
    todo: list[Point] = []
    for pt in sweep.points:
        r = by_name[pt.name]
        try:
            state = point_state(out / pt.name, pt.cfg)
        except SweepError as e:
            r.status, r.error = "failed", _one_line(e)
            _emit(on_event, "failed", r, res)
            continue
        if state == FINISHED:
            r.status = "skipped"
            r.take(_read_summary(out / pt.name))
            r.wall_s = (prior.get(pt.name) or {}).get("wall_s")
            _emit(on_event, "skipped", r, res)
        else:
            todo.append(pt)
    out.mkdir(parents=True, exist_ok=True)
    ran_any = False
    try:
        _write_spec(sweep, out)
        if todo:
            with ray_session(address, workers) as (ray, capacity, start_s):
                res.ray_start_s, res.workers = start_s, capacity
                ran_any = True
                _run_tasks(ray, sweep, todo, out, capacity, res, by_name, prior, on_event, tick)
                t_stop = time.perf_counter()
            res.ray_stop_s = time.perf_counter() - t_stop
    except KeyboardInterrupt:
        if made and not ran_any:
            shutil.rmtree(out, ignore_errors=True)
            raise
        res.interrupted = True
        for r in res.results:
            if r.status == "running":
                r.status = "interrupted"
    except BaseException:
        if made and not ran_any:
            shutil.rmtree(out, ignore_errors=True)  # Ray did not start: leave nothing behind
        raise
    finally:
        if out.exists():
            _write_state(out, res)
    res.wall_s = time.perf_counter() - t_start
    res.csv = write_csv(sweep, res, out / CSV_FILE)
    res.plots = write_plots(sweep, res, out)
    return res


def _run_tasks(ray: Any, sweep: Sweep, todo: list[Point], out: Path, capacity: int, res: SweepResult,
               by_name: dict[str, PointResult], prior: dict[str, Any], on_event: EventFn | None,
               tick: Callable[[SweepResult], None] | None) -> None:
    remote = ray.remote(num_cpus=1, max_retries=1)(run_point)
    on_gpu = remote.options(num_gpus=1)  # driver.device = "cuda": Ray hides the GPUs from a task that asks for none
    gpus = float(ray.cluster_resources().get("GPU", 0))
    cwd = os.getcwd()
    queue = []
    for pt in todo:
        if _wants_gpu(pt.cfg) and gpus < 1:
            r = by_name[pt.name]
            r.status, r.error = "failed", "driver.device = \"cuda\" and the Ray cluster has no GPU"
            _emit(on_event, "failed", r, res)
        else:
            queue.append(pt)
    flight: dict[Any, Point] = {}
    started: dict[str, float] = {}
    t0 = time.perf_counter()
    while queue or flight:
        while queue and len(flight) < capacity:
            pt = queue.pop(0)
            task = {"name": pt.name, "config": pt.cfg.to_toml(), "run_dir": str(out / pt.name),
                    "lock": str(out / LOCK_DIR / f"{pt.name}.lock"), "baseline": sweep.baseline, "cwd": cwd}
            flight[(on_gpu if _wants_gpu(pt.cfg) else remote).remote(task)] = pt
            started[pt.name] = time.perf_counter()
            r = by_name[pt.name]
            r.status = "running"
            _emit(on_event, "start", r, res)
        done, _ = ray.wait(list(flight), num_returns=1, timeout=0.5)
        for ref in done:
            pt = flight.pop(ref)
            r = by_name[pt.name]
            try:
                got = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the worker died (or Ray lost it): this point failed
                got = {"status": "failed", "resumed": False, "summary": None,
                       "error": f"ray: {type(e).__name__}: {_one_line(str(e).splitlines()[0] if str(e) else e)}",
                       "wall_s": time.perf_counter() - started[pt.name]}
            r.status, r.resumed, r.error = got["status"], got["resumed"], got["error"]
            r.take(got["summary"])
            r.wall_s, r.import_s = got["wall_s"], got.get("import_s")
            if r.status == "skipped":  # finished by an earlier sweep between our look and the task's
                r.wall_s = (prior.get(pt.name) or {}).get("wall_s")
            _write_state(out, res)
            _emit(on_event, r.status, r, res)
        if tick is not None:
            tick(res)
        res.tasks_s = time.perf_counter() - t0


def _wants_gpu(cfg: RunConfig) -> bool:
    return getattr(cfg.driver, "device", None) == "cuda"


def _emit(on_event: EventFn | None, kind: str, r: PointResult, res: SweepResult) -> None:
    if on_event is not None:
        on_event(kind, r, res)


@contextmanager
def ray_session(address: str | None, workers: int | None) -> Iterator[tuple[Any, int, float]]:
    """Ray for the sweep: (module, points in flight at most, seconds ray.init took); shut down on leaving
    if started here."""
    import logging

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report, no prompt
    import ray

    if ray.is_initialized():
        cpus = int(ray.cluster_resources().get("CPU", 1))
        yield ray, max(1, min(workers or cpus, cpus)), 0.0
        return
    t0 = time.perf_counter()
    reaper = None
    tmp = None
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        try:
            if address:
                _check_reachable(address)
                ray.init(address=address, **quiet)
            else:
                n = workers or os.cpu_count() or 1
                # Ray's socket paths must stay short (108 bytes): /tmp, not a long $TMPDIR
                tmp = tempfile.mkdtemp(prefix="pcm-hil-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
                reaper = _start_reaper(tmp)
                ray.init(num_cpus=n, _temp_dir=tmp, object_store_memory=100 * 2**20, **quiet)
        except SweepError:
            raise
        except (ConnectionError, RuntimeError, ValueError, OSError) as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SweepError(f"cannot start or reach {where}: {_one_line(first)}") from None
        start_s = time.perf_counter() - t0
        cpus = int(ray.cluster_resources().get("CPU", 1))
        yield ray, max(1, min(workers or cpus, cpus) if address else cpus), start_s
    finally:
        try:
            ray.shutdown()
        finally:
            if reaper is not None:
                _stop_reaper(reaper)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def _check_reachable(address: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address must accept a connection: ray.init would retry it for minutes."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address.strip())
    if m is None:
        return  # "auto" and the like: Ray says at once when it finds no cluster
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=5).close()
    except OSError as e:
        raise SweepError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


# The reaper: a small process watching the sweep's process. Ray's processes fate-share with the driver, except
# its two agents, which outlive a kill -9 of the driver by a minute (a 60 s GCS timeout inside Ray). It notes
# every Ray process below the sweep's process while it lives; when the sweep's process dies (or closes the
# pipe after ray.shutdown()), it kills those still alive (the same pid and start time: never another process)
# and removes Ray's temporary folder.
_REAPER = r"""
import os, shutil, signal, sys, select
parent, me, tmp = int(sys.argv[1]), os.getpid(), sys.argv[2]
def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2:].split()
    return int(rest[1]), rest[19], b"ray" in cmd
def tree():
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = stat(int(d))
            if st:
                kids.setdefault(st[0], []).append((int(d), st[1], st[2]))
    found, todo = {}, [parent]
    while todo:
        for pid, start, is_ray in kids.get(todo.pop(), ()):
            if pid != me and pid not in found:
                found[pid] = (start, is_ray)
                todo.append(pid)
    return {p: s for p, (s, r) in found.items() if r and p not in before}
before = set()
before = set(tree())
seen = {}
while os.getppid() == parent:
    seen.update(tree())
    r, _, _ = select.select([sys.stdin], [], [], 0.5)
    if r and not os.read(sys.stdin.fileno(), 1):
        break
for pid, start in seen.items():
    st = stat(pid)
    if st and st[1] == start:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
if tmp:
    import time
    for _ in range(50):  # until the killed ones are gone (nothing writes there then), at most 5 s
        if not any((st := stat(pid)) and st[1] == start for pid, start in seen.items()):
            break
        time.sleep(0.1)
    shutil.rmtree(tmp, ignore_errors=True)  # Ray's session folder: the killed sweep cannot remove it
"""


def _start_reaper(tmp: str | None) -> subprocess.Popen | None:
    if not os.path.isdir("/proc/self"):
        return None  # not Linux: Ray's agents then outlive a killed sweep by about a minute
    return subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), tmp or ""], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_reaper(p: subprocess.Popen) -> None:
    try:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        p.kill()
        p.wait()


# --------------------------------------------------------------------------------------------- files

def _write_spec(sweep: Sweep, out: Path) -> None:
    from sim.files import write_atomic

    write_atomic(out / SPEC_FILE, sweep.text.encode())


def _read_state(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / STATE_FILE).read_text())
        return {p["name"]: p for p in data.get("points", [])}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def _write_state(out: Path, res: SweepResult) -> None:
    """DIR/sweep.json: each point's status, error, wall time and figures (a re-run reads the wall times back)."""
    from sim.files import write_atomic

    data = {"points": [asdict(r) for r in res.results]}
    write_atomic(out / STATE_FILE, (json.dumps(data, indent=1, default=str) + "\n").encode())


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
    import io

    from sim.files import write_atomic

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
