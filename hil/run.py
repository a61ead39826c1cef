"""A training run on disk: RUN_DIR with run.h5, config.toml, checkpoint + journal, summary.json.

start_run() makes a new run (refusing an existing RUN_DIR); resume_run() continues one after a
crash or a stop, settling the program that was in flight. Everything that can be checked is checked
before RUN_DIR is created, so a refused run leaves nothing behind and overwrites nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from drivers import MVM, ArrayDriver, MockDriver, SafetyLimits
from sim.files import write_atomic

from . import __version__
from .array import ArrayWeights
from .chip import (ChipModel, betas, check_shapes, chip_model, eps_per_layer, journal_fsync, layer_shapes,
                   limits_in_force, make_driver, n_weights, require_calibration, run_warnings)
from .config import RunConfig, load_config
from .data import Dataset, load_dataset
from .journal import read_journal
from .logs import run_log_file
from .mapping import Mapping
from .networks import build_network
from .reconcile import check_ledger, check_program_ids, expected_ledger, journaled_program_ids
from .sizing import check_run_fits
from .resume import load_checkpoint, restore, roll_forward
from .trainer import CheckpointError, Trainer

log = logging.getLogger(__name__)

#: The columns of the run log's mapping/table (its "columns" attribute; hil/mapping.py Mapping.table).
CONFIG_FILE = "config.toml"
LOG_FILE = "run.h5"
SUMMARY_FILE = "summary.json"


class RunDirError(RuntimeError):
    """RUN_DIR exists where a new run was asked for, or is not a run directory where a resume was."""


def probe_response(s: Session, cfg: RunConfig) -> None:
    """update.eps = "auto": RESET a few hundred mapped devices and give them SET pulses one at a time, reading
    each back (logged like every read, reason "probe"), before the initial programming; eps and the open-loop
    table then follow the measured response (hil/response.py)."""
    t = s.trainer
    aw = t.array
    assert aw is not None
    if cfg.update.eps != "auto" or getattr(cfg.driver, "dry_run", False):
        return
    r = cfg.response
    addr = aw.mapping.addresses
    pick = np.sort(np.random.default_rng([cfg.seed, 7]).choice(addr.size, min(r.probe_devices, addr.size),
                                                               replace=False))
    g = aw.probe(addr[pick], r.probe_pulses)
    aw.adopt_probe(g)
    if s.writer is not None:
        # eps_per_layer_json was the model's guess until the probe measured the chip.
        s.writer.set_attrs(response_probe_json=json.dumps(aw.auto_state()), eps_per_layer_json=json.dumps(aw.eps))


def git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, encoding="utf-8", timeout=5,
                           cwd=Path(__file__).resolve().parent)
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Session:
    """A trainer wired to its driver and (once attach_log ran) its log; close() releases them."""

    trainer: Trainer
    driver: ArrayDriver
    inner: ArrayDriver
    writer: Any  # RunLogWriter or None
    cfg: RunConfig
    log_attrs: dict[str, Any]

    def attach_log(self, run_dir: Path, *, append: bool) -> None:
        """Open RUN_DIR/run.h5 (new or appended) and route every read and program through it from here on."""
        if not self.cfg.logging.enabled:
            return
        from drivers.logged import LoggedDriver
        from drivers.runlog import RunLogWriter

        t = self.trainer
        aw = t.array
        assert aw is not None
        writer = RunLogWriter(run_dir / LOG_FILE, attrs={} if append else self.log_attrs,
                              flush_interval_s=self.cfg.logging.flush_interval_s, append=append)
        try:
            logged = LoggedDriver(self.inner, writer)
        except BaseException:
            writer.close()
            raise
        self.writer, self.driver = writer, logged
        aw.driver, aw._reading = logged, logged.reading  # noqa: SLF001 - the session wires its own parts
        t.logger = writer  # (mvm products stay on inner: LoggedDriver passes them through unlogged)
        if not append:
            mapping = aw.mapping
            writer.write_array("mapping/table", mapping.table(), columns=mapping.table_columns())
            for lm in mapping.layers:
                writer.write_array(f"mapping/layer{lm.index}_gplus", lm.plus)
                writer.write_array(f"mapping/layer{lm.index}_gminus", lm.minus)

    def close(self) -> None:
        self.trainer.close()
        if self.writer is not None:
            self.writer.close()
        self.driver.close()
        if self.inner is not self.driver:
            self.inner.close()


def build_session(cfg: RunConfig, data: Dataset, run_dir: Path | None, inner: ArrayDriver, *,
                  append_log: bool, model: ChipModel, log: bool = True, first_program_id: int = 1) -> Session:
    """Mapping and ArrayWeights around inner, and the trainer that uses them; with log (and a run_dir),
    the run log is attached at once, else later with Session.attach_log."""
    net = build_network(cfg, data, torch_model=True if MVM in inner.capabilities else None)
    beta = betas(cfg, len(net.shapes))
    mapping = Mapping.build_layers(net.shapes, beta, inner.geometry, cfg.mapping.row0, cfg.mapping.col0, net.names,
                                   cfg.mapping.copies(len(net.shapes)))
    eps = eps_per_layer(cfg, model, beta)
    attrs = {"config_toml": cfg.to_toml(), "safety_limits_json": inner.limits.model_dump_json(),
             "instrument_identity": inner.identity, "package_version": __version__, "git_commit": git_commit(),
             "eps_per_layer_json": json.dumps(eps), "beta_per_layer_json": json.dumps(beta),
             "refresh_threshold_us": cfg.refresh.threshold_us,
             "refresh_check_every_steps": cfg.refresh.check_every_steps, "refresh_mode": cfg.refresh.mode,
             "limits_widened_json": json.dumps(cfg.driver.limits.wider_than(SafetyLimits())
                                               if cfg.driver.allow_wider_limits else []),
             "warnings_json": json.dumps(run_warnings(cfg, model, beta, eps)),
             "network_kind": net.kind, "network_layers_json": json.dumps(
                 [{"name": n, "fan_in": i, "fan_out": o} for n, (i, o) in zip(net.names, net.shapes, strict=True)])}
    aw = ArrayWeights(inner, mapping, eps, cfg.update.lr, cfg.update.max_pulses_per_update, cfg.driver.shapes,
                      model.mean_response_us, cfg.read_policy, cfg.refresh, first_program_id=first_program_id,
                      response_law=model.law)
    trainer = Trainer(cfg, data, array=aw, journal_dir=run_dir, logger=None, network=net)
    attrs["task_metric_json"] = json.dumps(trainer.task.describe())  # what pcm-hil report / compare / watch show
    trainer.journal_fsync = journal_fsync(cfg)
    s = Session(trainer, inner, inner, None, cfg, attrs)
    if log and run_dir is not None:
        try:
            s.attach_log(run_dir, append=append_log)
        except BaseException:
            trainer.close()
            raise
    return s


def run_baseline(cfg: RunConfig, data: Dataset, progress: Callable[[Trainer], None] | None = None,
                 progress_every: int = 200, artifact_dir: Path | None = None) -> Trainer:
    """The float64 software network: same init, same data order, same loop. artifact_dir: where its task may
    write what an evaluation makes besides the metric (created by the task if it writes)."""
    t = Trainer(cfg, data)
    t.artifact_dir = artifact_dir
    t.run(progress, progress_every)
    return t


ProgressFn = Callable[[Trainer], None]
NotifyFn = Callable[[str], None]


class RunFinished(RuntimeError):
    """--resume of a run that has nothing left to do; nothing was changed."""


class StopFlag:
    """Set by a signal handler (the signal number); the trainer stops between two steps once it is set."""

    def __init__(self) -> None:
        self.signal = 0

    def __bool__(self) -> bool:
        return bool(self.signal)


def _load_data(cfg: RunConfig) -> Dataset:
    d = cfg.data
    return load_dataset(d.name, d.path, d.download, cfg.seed, d.train_limit, d.test_limit,
                        bptt=cfg.network.lstm_options.bptt)


def _tester_last_id(inner: ArrayDriver) -> int:
    """The chip's last applied program id (0 if none): a new run's ids continue above it."""
    return int(inner.last_program_id() or 0)


def start_run(cfg: RunConfig, run_dir: Path, *, baseline: bool = False, progress: ProgressFn | None = None,
              stop_after_steps: int | None = None, progress_every: int = 200, notify: NotifyFn | None = None,
              baseline_progress: ProgressFn | None = None,
              stop: StopFlag | None = None) -> dict[str, Any]:
    """A new run in run_dir (which must not exist); returns the summary (also written to summary.json).

    progress is called by the chip's trainer every progress_every steps and after each epoch;
    baseline_progress the same way by the baseline's (baseline=True), which trains after the chip.

    Everything that can be checked is checked before run_dir is made; a run refused before its first
    program is sent leaves no run_dir behind.
    """
    run_dir = Path(run_dir)
    if run_dir.exists():
        raise RunDirError(f"{run_dir} already exists; pass --resume {run_dir} to continue it, or choose another --out")
    require_calibration(cfg)
    data = _load_data(cfg)
    model = chip_model(cfg)
    shapes = layer_shapes(cfg, data)
    eps_per_layer(cfg, model, betas(cfg, len(shapes)))  # ConfigError before any chip is touched
    inner = make_driver(cfg, shapes, model)
    try:
        g = inner.geometry
        check_run_fits(g.n_devices, n_weights(shapes), simulated_chip=False, what=f"the {g.rows} x {g.cols} array")
        check_shapes(cfg, inner.limits)
        s = build_session(cfg, data, run_dir, inner, append_log=False, model=model, log=False,
                          first_program_id=_tester_last_id(inner) + 1)
    except BaseException:
        inner.close()
        raise
    made = False
    try:
        run_dir.mkdir(parents=True)
        made = True
        with _run_log(run_dir):
            for w in json.loads(s.log_attrs["warnings_json"]):
                _warn(notify, w)
            write_atomic(run_dir / CONFIG_FILE, cfg.to_toml().encode())
            s.attach_log(run_dir, append=False)
            t = s.trainer
            assert t.array is not None
            log.info("new run in %s on %s; limits in force %s; program ids from %d; journal fsync %s",
                     run_dir, inner.identity, inner.limits.model_dump_json(), t.array.next_program_id,
                     t.journal_fsync)
            t.start_journal()
            t.notify = notify
            probe_response(s, cfg)
            t.array.initialize(t.w0)
            t.checkpoint()
            return _train_and_finish(s, cfg, data, run_dir, baseline, progress, stop_after_steps,
                                     progress_every, stop, baseline_progress)
    except BaseException as e:
        if made and _nothing_reached_the_chip(s, e):
            s.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        s.close()


@contextmanager
def _run_log(run_dir: Path) -> Iterator[None]:
    """RUN_DIR/pcm-hil.log for the block; the error that ends the run goes there too (the CLI prints it)."""
    with run_log_file(run_dir):
        try:
            yield
        except BaseException as e:
            log.error("run stopped by %s: %s", type(e).__name__, e, extra={"file_only": True})
            raise


def _warn(notify: NotifyFn | None, text: str) -> None:
    log.warning("%s", text)
    if notify is not None:
        notify(f"warning: {text}")


def link_stats(driver: ArrayDriver) -> dict[str, int] | None:
    """The link counters of the tester behind driver (LoggedDriver unwrapped); None for an in-process chip."""
    inner = getattr(driver, "inner", driver)
    stats = getattr(inner, "stats", None)
    return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else None


def _nothing_reached_the_chip(s: Session, e: BaseException) -> bool:
    """True if the run failed before any pulse can have landed: its folder then holds nothing worth keeping."""
    from drivers import InstrumentError, SafetyViolation

    aw = s.trainer.array
    assert aw is not None
    if aw.counters.programs_applied:
        return False
    if aw.programs_sent == 0:
        return True
    # The one program sent was refused before anything ran: by the host's limits, or the tester's own.
    return aw.programs_sent == 1 and (isinstance(e, SafetyViolation) or
                                      (isinstance(e, InstrumentError) and e.code == 101))


def _train_and_finish(s: Session, cfg: RunConfig, data: Dataset, run_dir: Path, baseline: bool,
                      progress: ProgressFn | None, stop_after_steps: int | None,
                      progress_every: int = 200, stop: StopFlag | None = None,
                      baseline_progress: ProgressFn | None = None) -> dict[str, Any]:
    t = s.trainer
    t.stop_flag = stop
    t.run(progress, progress_every, stop_after_steps=stop_after_steps)
    t.checkpoint()
    summary = t.summary()
    task = t.task  # its metric: test_accuracy for a classifier, bits_per_char for the LSTM, ...
    summary[f"baseline_{task.metric}"] = summary["metric"]["baseline"] = None
    if baseline and t.at.epoch >= cfg.update.epochs:
        b = run_baseline(cfg, data, baseline_progress, progress_every, artifact_dir=run_dir / "baseline")
        summary[f"baseline_{task.metric}"] = summary["metric"]["baseline"] = b.summary()[task.metric]
        if s.writer is not None:
            # beside the chip's rows, under their own names (a reader selecting rows by "epoch" gets the chip's)
            for row in b.metrics:
                s.writer.log_metrics(t.at.step, baseline_epoch=row["epoch"],
                                     **{f"baseline_{task.metric}": row[task.metric],
                                        f"baseline_{task.train_metric}": row[task.train_metric]})
            # the baseline's final weights, shaped like the layer's mapping/layerN_gplus (pcm-hil report's weights)
            for i, w in enumerate(b.weights):
                s.writer.write_array(f"baseline/layer{i}_weights", w, units="weight units")
    summary["reads_logged"] = s.writer.counts["reads"] if s.writer is not None else 0
    summary["unapplied_program_ids"] = t.unapplied_program_ids
    summary["finished"] = t.at.epoch >= cfg.update.epochs
    summary["stopped_by_signal"] = t.stop_requested or None
    summary["link"] = link_stats(s.inner)
    if summary["link"] is not None:
        log.info("link: %s", summary["link"])
        if s.writer is not None:
            s.writer.log_metrics(t.at.step, **{f"link_{k}": float(v) for k, v in summary["link"].items()})
    if t.stop_requested:
        log.info("stopped by signal %d at step %d; resumable", t.stop_requested, t.at.step)
    write_atomic(run_dir / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def _summary_finished(run_dir: Path) -> bool:
    """summary.json is there and says the run finished (written last, atomically, once everything else is)."""
    try:
        return bool(json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8")).get("finished"))
    except (OSError, ValueError, AttributeError):
        return False


def resume_run(run_dir: Path, *, config: RunConfig | None = None, driver: str | None = None, baseline: bool = False,
               progress: ProgressFn | None = None, stop_after_steps: int | None = None,
               progress_every: int = 200, notify: NotifyFn | None = None, baseline_progress: ProgressFn | None = None,
               stop: StopFlag | None = None) -> dict[str, Any]:
    """Continue the run in run_dir from its checkpoint and journal; config, if given, must equal the run's.

    Every check comes before the first write: the config, the checkpoint, the journal, the run log's
    checksums, and (on a tester) that the chip's last program id and lifetime pulse counts agree with
    the run's records. A refused resume changes no file; so does the resume of a finished run.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"{run_dir} is not a pcm-hil run directory (no {CONFIG_FILE})")
    cfg = load_config(run_dir / CONFIG_FILE)
    if config is not None and config.digest() != cfg.digest():
        raise CheckpointError(f"the given config differs from {run_dir / CONFIG_FILE}; a run resumes with its own config")
    if cfg.driver.dry_run:
        raise CheckpointError(f"{run_dir} is a dry run: it sent no pulse, so there is nothing to resume; run it again")
    if driver is not None:
        cfg = _resume_driver(cfg, driver)
    meta, arrays = load_checkpoint(run_dir)  # before touching anything
    if meta["config_digest"] != cfg.digest():
        raise CheckpointError("the checkpoint was written with another config; resume with the run's own config.toml")
    records = read_journal(run_dir / meta["journal"])
    ids = journaled_program_ids(records)
    if meta["position"]["epoch"] >= cfg.update.epochs and not records and _summary_finished(run_dir):
        # (trained to the end but killed before summary.json was written, e.g. during the baseline: the resume
        # below finishes it, training nothing more)
        raise RunFinished(f"{run_dir} is finished ({cfg.update.epochs} epochs trained); nothing to resume, "
                          "nothing changed")
    if cfg.logging.enabled and (run_dir / LOG_FILE).exists():
        _verify_log(run_dir / LOG_FILE)
    data = _load_data(cfg)
    model = chip_model(cfg)
    shapes = layer_shapes(cfg, data)
    reapply = meta.get("chip") is not None
    if reapply:
        g = Mapping.geometry_for(shapes, cfg.mapping.row0, cfg.mapping.col0, cfg.mapping.copies(len(shapes)))
        d = cfg.driver
        inner: ArrayDriver = MockDriver.from_state(run_dir / meta["chip"], g.rows, g.cols, seed=d.seed,
                                                   limits=limits_in_force(cfg), analog_mvm=d.analog_mvm)
    else:
        inner = make_driver(cfg, shapes, model)
    try:
        if inner.identity != meta["identity"]:
            raise CheckpointError(f"the run was made on {meta['identity']!r}; this driver is {inner.identity!r}: "
                                  "refusing to resume on another chip")
        s = build_session(cfg, data, run_dir, inner, append_log=True, model=model, log=False)
    except BaseException:
        inner.close()
        raise
    try:
        t = s.trainer
        restore(t, meta, arrays)
        t.notify = notify
        last_applied = None
        if not reapply:
            last_applied = _tester_last_id(inner)
            resource = cfg.driver.resource or inner.identity
            check_program_ids(last_applied, meta.get("tester_last_program_id"), ids, resource)
        if reapply and "ledger" in arrays:
            # The restored chip's endurance ledger is the checkpoint's; the roll-forward adds the journaled programs.
            assert t.array is not None and isinstance(inner, MockDriver)
            inner.restore_lifetime_pulses(t.array.mapping.addresses, arrays["ledger"])
        rf = roll_forward(t, records, reapply=reapply, last_applied=last_applied)
        if not reapply and "ledger" in arrays:
            aw = t.array
            assert aw is not None
            want = expected_ledger(arrays["ledger"], aw.mapping.addresses, inner.geometry.n_devices,
                                   [p for _, p in rf.programs_applied])
            check_ledger(inner, aw.mapping.addresses, want, cfg.driver.resource or inner.identity)
        # Nothing was written so far; from here on the resume goes ahead.
        with _run_log(run_dir):
            log.info("resume of %s at step %d on %s: %d journal records rolled forward, %d programs settled "
                     "as applied, unapplied: %s; the chip %s", run_dir, t.at.step, inner.identity, rf.records,
                     len(rf.programs_applied), rf.unapplied_program_id,
                     "was restored from the checkpoint" if reapply else
                     f"agrees (PROG:LAST? {last_applied}, lifetime counts of the mapped devices)")
            s.attach_log(run_dir, append=True)
            _relog_missing(s, t, rf)
            assert t.array is not None
            t.set_log_step(t.at.step)  # the resume's read belongs to the step it resumes at
            t.array.read(None, "resume")
            t.checkpoint()
            return _train_and_finish(s, cfg, data, run_dir, baseline, progress, stop_after_steps,
                                     progress_every, stop, baseline_progress)
    finally:
        s.close()


def _resume_driver(cfg: RunConfig, driver: str) -> RunConfig:
    """The run's config with --driver applied: a tester may come back at another address; nothing else moves."""
    from drivers.plugins import is_plugin

    kind = cfg.driver.kind
    given = "mock" if driver == "mock" else "plugin" if is_plugin(driver) else "tester"
    made = "mock" if kind == "mock" else "plugin" if kind == "plugin" else "tester"
    what = {"mock": "the in-process mock chip", "plugin": f"the driver plugin {cfg.driver.plugin}",
            "tester": "a tester"}[made]
    if given != made or (made == "plugin" and driver != cfg.driver.plugin):
        raise CheckpointError(f"the run was made on {what}; --driver {driver} cannot continue it "
                              "(a run resumes on its own chip)")
    return cfg.with_overrides(**{"driver.resource": driver}) if made == "tester" else cfg


def _verify_log(path: Path) -> None:
    """The run log must be of the schema version this code appends to, and its checksummed rows must verify,
    before a resume appends to it (drivers.runlog)."""
    from drivers.runlog import verify_log

    verify_log(path, for_append=True)


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
