"""Sweeps: many training runs of one base config over a grid and/or random samples of config keys, times seeds,
each an ordinary RUN_DIR, run as Ray tasks (docs/sweep.md).

load_sweep() reads and checks SWEEP.toml and every point's config before anything starts; check_out_dir()
checks what DIR already holds (a re-run skips finished points and resumes interrupted ones); run_sweep()
runs the points on a local Ray instance (or an existing cluster) and writes DIR/sweep.csv and the plots.
Only simulated chips: a real tester is one chip, and a sweep would program it from several processes.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any


from .config import ConfigError, RunConfig, load_config, validate_config
from .sweep_output import write_csv, write_plots
from .sweep_spec import Point, Sweep, SweepError, _one_line, load_sweep  # noqa: F401 - load_sweep: hil.sweep's API

CSV_FILE = "sweep.csv"
STATE_FILE = "sweep.json"
SPEC_FILE = "sweep.toml"
#: Per-point lock files (held by the task running the point) live here, out of the points' folders.
LOCK_DIR = ".sweep"
#: How long a point's task waits for the lock of a point another (dying) sweep process still holds, s.
LOCK_WAIT_S = 30.0


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
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
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
