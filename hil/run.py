"""A training run on disk: RUN_DIR with run.h5, config.toml, checkpoint + journal, summary.json.

start_run() makes a new run (refusing an existing RUN_DIR); resume_run() continues one after a
crash or a stop, settling the program that was in flight. Everything that can be checked is checked
before RUN_DIR is created, so a refused run leaves nothing behind and overwrites nothing.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from drivers import ArrayDriver, MockDriver
from sim import PCMParams
from sim.files import write_atomic
from sim.response import granularity_us, pulse_response

from . import __version__
from .array import ArrayWeights
from .config import ConfigError, RunConfig, load_config
from .data import Dataset, load_dataset
from .mapping import Mapping
from .trainer import CheckpointError, Trainer, load_checkpoint, restore, roll_forward

CONFIG_FILE = "config.toml"
LOG_FILE = "run.h5"
SUMMARY_FILE = "summary.json"


class RunDirError(RuntimeError):
    """RUN_DIR exists where a new run was asked for, or is not a run directory where a resume was."""


@dataclass
class ChipModel:
    """What the host assumes about the chip: model parameters, mean pulse response, and eps per layer."""

    params: PCMParams
    granularity_us: float
    calibrated_eps_us: float | None
    mean_response_us: np.ndarray


def chip_model(cfg: RunConfig) -> ChipModel:
    """Model parameters from driver.params_file (or the published fit); [calibration].eps_us if present."""
    path = cfg.driver.params_file
    eps_us = None
    if path:
        try:
            params = PCMParams.from_toml(path)
            with open(path, "rb") as f:
                cal = tomllib.load(f).get("calibration", {})
        except FileNotFoundError:
            raise ConfigError(f"driver.params_file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, ValueError) as e:
            raise ConfigError(f"driver.params_file {path} is not a valid PCM parameter file: {e}") from None
        if "eps_us" in cal:
            eps_us = float(cal["eps_us"])
            if not eps_us > 0:
                raise ConfigError(f"{path}: [calibration].eps_us must be positive, got {eps_us}")
    else:
        params = PCMParams()
    cap = cfg.driver.limits.max_set_pulses_per_device
    resp = pulse_response(params, n_devices=2000, n_pulses=cap, seed=0)
    return ChipModel(params, granularity_us(params), eps_us, resp.mean_us)


def layer_sizes(cfg: RunConfig, data: Dataset) -> list[int]:
    return [data.n_features, *cfg.network.hidden, data.n_classes]


def betas(cfg: RunConfig, n_layers: int) -> list[float]:
    """Weight units per uS per layer: mapping.beta, else w_max / g_range_us (the last w_max repeats)."""
    m = cfg.mapping
    if m.beta is not None:
        if len(m.beta) != n_layers:
            raise ConfigError(f"mapping.beta has {len(m.beta)} values, the network has {n_layers} layers")
        return list(m.beta)
    w = [m.w_max[min(i, len(m.w_max) - 1)] for i in range(n_layers)]
    return [x / m.g_range_us for x in w]


def eps_per_layer(cfg: RunConfig, model: ChipModel, beta: list[float]) -> list[float]:
    """update.eps, else (calibrated eps_us, else the model's granularity) times beta, per layer."""
    if cfg.update.eps is not None:
        if len(cfg.update.eps) != len(beta):
            raise ConfigError(f"update.eps has {len(cfg.update.eps)} values, the network has {len(beta)} layers")
        return list(cfg.update.eps)
    g = model.calibrated_eps_us if model.calibrated_eps_us is not None else model.granularity_us
    return [g * b for b in beta]


def make_driver(cfg: RunConfig, sizes: list[int], model: ChipModel) -> ArrayDriver:
    """The array the config names: an in-process mock sized to the network, or a tester over VISA / serial."""
    d = cfg.driver
    if d.kind == "mock":
        g = Mapping.required_geometry(sizes, cfg.mapping.row0, cfg.mapping.col0)
        return MockDriver(g.rows, g.cols, params=model.params, seed=d.seed, limits=d.limits, analog_mvm=d.analog_mvm)
    from drivers.tester import TesterDriver

    assert d.resource is not None
    return TesterDriver.open(d.resource, timeout_s=d.timeout_s, limits=d.limits)


def git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).resolve().parent)
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Session:
    """A trainer wired to its driver and log; close() releases them."""

    trainer: Trainer
    driver: ArrayDriver
    inner: ArrayDriver
    writer: Any  # RunLogWriter or None

    def close(self) -> None:
        self.trainer.close()
        if self.writer is not None:
            self.writer.close()
        self.driver.close()
        if self.inner is not self.driver:
            self.inner.close()


def build_session(cfg: RunConfig, data: Dataset, run_dir: Path | None, inner: ArrayDriver, *,
                  append_log: bool, model: ChipModel) -> Session:
    """Mapping, logging and ArrayWeights around inner; the trainer that uses them."""
    sizes = layer_sizes(cfg, data)
    beta = betas(cfg, len(sizes) - 1)
    mapping = Mapping.build(sizes, beta, inner.geometry, cfg.mapping.row0, cfg.mapping.col0)
    eps = eps_per_layer(cfg, model, beta)
    writer = None
    driver: ArrayDriver = inner
    reading = None
    if cfg.logging.enabled and run_dir is not None:
        from drivers.logged import LoggedDriver
        from drivers.runlog import RunLogWriter

        attrs = {"config_toml": cfg.to_toml(), "safety_limits_json": inner.limits.model_dump_json(),
                 "instrument_identity": inner.identity, "package_version": __version__, "git_commit": git_commit(),
                 "eps_per_layer_json": json.dumps(eps), "beta_per_layer_json": json.dumps(beta),
                 "refresh_threshold_us": cfg.refresh.threshold_us,
                 "refresh_check_every_steps": cfg.refresh.check_every_steps, "refresh_mode": cfg.refresh.mode}
        writer = RunLogWriter(run_dir / LOG_FILE, attrs={} if append_log else attrs,
                              flush_interval_s=cfg.logging.flush_interval_s, append=append_log)
        logged = LoggedDriver(inner, writer)
        driver = logged
        reading = logged.reading
    aw = ArrayWeights(driver, mapping, eps, cfg.update.lr, cfg.update.max_pulses_per_update, cfg.driver.shapes,
                      model.mean_response_us, cfg.read_policy, cfg.refresh, reading=reading)
    trainer = Trainer(cfg, data, array=aw, journal_dir=run_dir, logger=writer)
    if writer is not None and not append_log:
        writer.write_array("mapping/table", mapping.table())
        for lm in mapping.layers:
            writer.write_array(f"mapping/layer{lm.index}_gplus", lm.plus)
            writer.write_array(f"mapping/layer{lm.index}_gminus", lm.minus)
    return Session(trainer, driver, inner, writer)


def run_baseline(cfg: RunConfig, data: Dataset, progress: Callable[[Trainer], None] | None = None,
                 progress_every: int = 200) -> Trainer:
    """The float64 software network: same init, same data order, same loop."""
    t = Trainer(cfg, data)
    t.run(progress, progress_every)
    return t


ProgressFn = Callable[[Trainer], None]


def _load_data(cfg: RunConfig) -> Dataset:
    d = cfg.data
    return load_dataset(d.name, d.path, d.download, cfg.seed, d.train_limit, d.test_limit)


def start_run(cfg: RunConfig, run_dir: Path, *, baseline: bool = False, progress: ProgressFn | None = None,
              stop_after_steps: int | None = None, progress_every: int = 200) -> dict[str, Any]:
    """A new run in run_dir (which must not exist); returns the summary (also written to summary.json)."""
    run_dir = Path(run_dir)
    if run_dir.exists():
        raise RunDirError(f"{run_dir} already exists; pass --resume {run_dir} to continue it, or choose another --out")
    data = _load_data(cfg)
    model = chip_model(cfg)
    inner = make_driver(cfg, layer_sizes(cfg, data), model)
    try:
        # Checked before RUN_DIR exists: the network must fit the chip.
        sizes = layer_sizes(cfg, data)
        Mapping.build(sizes, betas(cfg, len(sizes) - 1), inner.geometry, cfg.mapping.row0, cfg.mapping.col0)
        run_dir.mkdir(parents=True)
    except BaseException:
        inner.close()
        raise
    write_atomic(run_dir / CONFIG_FILE, cfg.to_toml().encode())
    s = build_session(cfg, data, run_dir, inner, append_log=False, model=model)
    try:
        t = s.trainer
        t.start_journal()
        assert t.array is not None
        t.array.initialize(t.w0)
        t.checkpoint()
        return _train_and_finish(s, cfg, data, run_dir, baseline, progress, stop_after_steps, progress_every)
    finally:
        s.close()


def _train_and_finish(s: Session, cfg: RunConfig, data: Dataset, run_dir: Path, baseline: bool,
                      progress: ProgressFn | None, stop_after_steps: int | None,
                      progress_every: int = 200) -> dict[str, Any]:
    t = s.trainer
    t.run(progress, progress_every, stop_after_steps=stop_after_steps)
    t.checkpoint()
    summary = t.summary()
    summary["baseline_test_accuracy"] = None
    if baseline and t.at.epoch >= cfg.update.epochs:
        summary["baseline_test_accuracy"] = run_baseline(cfg, data).summary()["test_accuracy"]
    summary["reads_logged"] = s.writer.counts["reads"] if s.writer is not None else 0
    summary["unapplied_program_ids"] = t.unapplied_program_ids
    summary["finished"] = t.at.epoch >= cfg.update.epochs
    write_atomic(run_dir / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def resume_run(run_dir: Path, *, config: RunConfig | None = None, driver: str | None = None, baseline: bool = False,
               progress: ProgressFn | None = None, stop_after_steps: int | None = None,
               progress_every: int = 200) -> dict[str, Any]:
    """Continue the run in run_dir from its checkpoint and journal; config, if given, must equal the run's."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"{run_dir} is not a pcm-hil run directory (no {CONFIG_FILE})")
    cfg = load_config(run_dir / CONFIG_FILE)
    if config is not None and config.digest() != cfg.digest():
        raise CheckpointError(f"the given config differs from {run_dir / CONFIG_FILE}; a run resumes with its own config")
    if driver is not None:
        if (driver == "mock") != (cfg.driver.kind == "mock"):
            raise CheckpointError(f"the run was made on {'the in-process mock chip' if cfg.driver.kind == 'mock' else 'a tester'}; "
                                  f"--driver {driver} cannot continue it (a run resumes on its own chip)")
        if driver != "mock":
            cfg = cfg.with_overrides(**{"driver.resource": driver})
    meta, arrays = load_checkpoint(run_dir)  # before touching anything
    data = _load_data(cfg)
    model = chip_model(cfg)
    sizes = layer_sizes(cfg, data)
    reapply = meta.get("chip") is not None
    if reapply:
        g = Mapping.required_geometry(sizes, cfg.mapping.row0, cfg.mapping.col0)
        d = cfg.driver
        inner: ArrayDriver = MockDriver.from_state(run_dir / meta["chip"], g.rows, g.cols, seed=d.seed, limits=d.limits,
                                                   analog_mvm=d.analog_mvm)
    else:
        inner = make_driver(cfg, sizes, model)
    if inner.identity != meta["identity"]:
        ident = inner.identity
        inner.close()
        raise CheckpointError(f"the run was made on {meta['identity']!r}; this driver is {ident!r}: "
                              "refusing to resume on another chip")
    s = build_session(cfg, data, run_dir, inner, append_log=True, model=model)
    try:
        t = s.trainer
        restore(t, meta, arrays)
        rf = roll_forward(t, run_dir / meta["journal"], reapply=reapply)
        _relog_missing(s, t, rf)
        assert t.array is not None
        t.array.read(None, "resume")
        t.checkpoint()
        return _train_and_finish(s, cfg, data, run_dir, baseline, progress, stop_after_steps, progress_every)
    finally:
        s.close()


def _relog_missing(s: Session, t: Trainer, rf: Any) -> None:
    """Programs the journal holds as applied but the log lost (rows not flushed before the kill) are
    logged now; a logged program that was never applied is named in the metrics (unapplied_program_id)."""
    if s.writer is None:
        if rf.unapplied_program_id is not None:
            t.unapplied_program_ids.append(rf.unapplied_program_id)
        return
    from drivers.runlog import RunLogReader

    s.writer.flush()
    with RunLogReader(s.writer.path) as r:
        logged = set(r.program_events()["program_id"].tolist())
    for step, p in rf.programs_applied:
        if p.program_id not in logged:
            s.writer.log_program(step, p)
    if rf.unapplied_program_id is not None:
        t.unapplied_program_ids.append(rf.unapplied_program_id)
        if rf.unapplied_program_id in logged:
            s.writer.log_metrics(t.at.step, unapplied_program_id=float(rf.unapplied_program_id))
    s.writer.flush()
