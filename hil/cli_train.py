"""`pcm-hil train`: mixed-precision training on the array (docs/training.md)."""

from __future__ import annotations

import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()


def driver_overrides(driver: str) -> dict[str, Any]:
    """--driver VALUE as config keys: 'mock', 'replay:PATH/run.h5' (a run log re-served), a plugin
    ('package.module:Class' or a registered name), a serial URL / device path, or a VISA resource."""
    from drivers.plugins import is_plugin
    from drivers.transport import is_serial_url

    if driver == "mock":
        return {"driver.kind": "mock"}
    if driver.startswith("replay:"):
        return {"driver.kind": "replay", "driver.resource": driver.removeprefix("replay:"), "driver.plugin": None,
                "driver.options": {}}
    if is_plugin(driver):
        return {"driver.kind": "plugin", "driver.plugin": driver}
    return {"driver.kind": "serial" if is_serial_url(driver) else "visa", "driver.resource": driver}


#: With output redirected (no terminal), a plain progress line at most this often, seconds.
PLAIN_PROGRESS_EVERY_S = 10.0


class _Bar:
    """Progress fed by the trainer (the chip's, then the baseline's): samples/s and the running accuracy of
    the epoch, and each epoch's metrics as a line of their own when they are computed (the baseline's beside
    the chip's). On a terminal a rich bar; redirected, plain lines at most every PLAIN_PROGRESS_EVERY_S."""

    def __init__(self, progress: Progress, total: int | None) -> None:
        self.progress = progress
        self.live = progress.console.is_terminal
        self.task = progress.add_task("training", total=total, rate="", acc="")
        self.t0 = time.perf_counter()
        self.first: int | None = None
        self.last_line = -float("inf")
        self.chip_metrics: list[dict[str, float]] = []
        self.epochs_said = 0
        self.baseline = False

    def __call__(self, trainer: Any) -> None:
        if trainer.array is None and not self.baseline:
            self._start_baseline(trainer)
        if self.first is None and self.live:
            self.progress.start()  # shown once training runs, not over a refusal that comes first
        at = trainer.at
        n = len(trainer.data.y_train)
        done = at.epoch * n + at.pos
        if self.first is None:
            self.first = at.samples_trained
            self.t0 = time.perf_counter()
        dt = time.perf_counter() - self.t0
        rate = (at.samples_trained - self.first) / dt if dt > 0 else 0.0
        from .run import link_stats

        task = trainer.task
        link = link_stats(trainer.array.driver) if trainer.array is not None else None
        trouble = {k: v for k, v in (link or {}).items() if k != "round_trips" and v}
        extra = ("  link: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in trouble.items())) if trouble else ""
        who = "baseline " if self.baseline else ""
        description = f"{who}epoch {min(at.epoch + 1, trainer.cfg.update.epochs)}"
        running = (f"{task.running_label} {trainer.running_value():.3f}" if at.seen else "") + extra
        self._say_epochs(trainer)
        if self.live:
            self.progress.update(self.task, completed=done, rate=f"{rate:,.0f} samples/s", acc=running,
                                 description=description)
        elif at.pos and at.samples_trained > self.first and \
                time.perf_counter() - self.last_line >= PLAIN_PROGRESS_EVERY_S:
            self.last_line = time.perf_counter()
            total = self.progress.tasks[0].total
            of = f"/{total:,.0f}" if total else ""
            self._line(f"{description}: {done:,}{of} samples, {rate:,.0f} samples/s, {running}".rstrip(", "))

    def _start_baseline(self, trainer: Any) -> None:
        self.baseline = True
        self.epochs_said = 0
        self.first = None
        self.last_line = -float("inf")
        self._line(f"baseline: training the float64 network ({trainer.cfg.update.epochs} epochs, same "
                   "initialization and data order)")
        self.progress.reset(self.task, total=self.progress.tasks[0].total)

    def _say_epochs(self, trainer: Any) -> None:
        task = trainer.task
        for row in trainer.metrics[self.epochs_said:]:
            e = int(row["epoch"])
            text = (f"epoch {e}: {task.label} {row[task.metric]:.4f} (train, running "
                    f"{row[task.train_metric]:.4f})")
            if self.baseline:
                chip = next((m for m in self.chip_metrics if int(m["epoch"]) == e), None)
                text = f"baseline {text}" + (f"; chip {chip[task.metric]:.4f}" if chip else "")
            else:
                self.chip_metrics.append(row)
                text += f"; {row['set_pulses']:,.0f} SET pulses, {row['refreshes']:,.0f} refreshes so far"
            self._line(text)
        self.epochs_said = len(trainer.metrics)

    def _line(self, text: str) -> None:
        self.progress.console.print(escape(text), soft_wrap=True, highlight=False)
        self.progress.console.file.flush()


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    table = Table(title=f"pcm-hil train: {run_dir}")
    table.add_column("quantity")
    table.add_column("value", justify="right")

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if v < 1000 else f"{v:,.0f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    metric = (summary.get("metric") or {}).get("name", "test_accuracy")
    for k in (metric, f"baseline_{metric}", "epochs", "samples_trained", "train_seconds",
              "us_per_sample", "reads_logged", "programs_applied", "set_pulses", "reset_pulses", "refreshes"):
        table.add_row(k, fmt(summary.get(k)))
    for i, layer in enumerate((summary.get("response") or {}).get("layers", [])):
        table.add_row(f"layer {i}: uS per SET pulse", f"{fmt(layer['mean_us'])} measured / {fmt(layer['expected_us'])} "
                      f"expected ({fmt(layer['ratio'])}x), eps {layer['eps']:.4g}")
    for k, v in (summary.get("link") or {}).items():
        table.add_row(f"link {k.replace('_', ' ')}", fmt(v))
    console.print(table)
    console.print(f"run log: {run_dir / 'run.h5'}   summary: {run_dir / 'summary.json'}")


def train_cmd(
    config: Annotated[Optional[Path], typer.Option(help="Run config (TOML); defaults: the paper's MLP on MNIST, mock chip.")] = None,
    driver: Annotated[Optional[str], typer.Option(help="'mock', a VISA resource (TCPIP::host::port::SOCKET, GPIB0::5::INSTR), a serial URL, or a driver plugin ('package.module:Class' or a registered name; options in [driver.options]).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and log every program against the limits in force; send no pulse.")] = False,
    uncalibrated: Annotated[bool, typer.Option("--uncalibrated", help="Train on a tester with neither driver.params_file nor update.eps = \"auto\" (the host assumes the default model).")] = False,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs (overrides the config).")] = None,
    baseline: Annotated[bool, typer.Option("--baseline", help="Also train the float64 software network (same init and data order).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="RUN_DIR to create (must not exist); default runs/train-<UTC time>.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this RUN_DIR from its checkpoint.")] = None,
    data: Annotated[Optional[str], typer.Option(help="Data set: mnist, digits or cifar10 (overrides the config).")] = None,
    train_limit: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N training samples.")] = None,
    test_limit: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N test samples.")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, help="Seed of initialization and data order (overrides the config).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE",
                                                      help="Set any config key, e.g. --set update.lr=0.05 --set "
                                                           "network.hidden=[100,50] (value in TOML syntax; repeatable).")] = None,
) -> None:
    """Train the network on the array with the mixed-precision scheme; every read and program is logged."""
    from drivers import DriverError
    from drivers.runlog import RunLogError

    from .config import ConfigError, RunConfig, load_config
    from .data import DataError
    from .journal import JournalError
    from .mapping import MappingError
    from .reconcile import ReconcileError
    from .run import RunDirError, RunFinished, StopFlag, resume_run, start_run
    from .trainer import CheckpointError

    stop = StopFlag()

    def say(text: str) -> None:
        console.print(f"[yellow]{escape(text)}[/yellow]" if text.startswith("warning:") else escape(text),
                      soft_wrap=True, highlight=False)

    try:
        if resume is not None:
            if out is not None and out != resume:
                raise RunDirError("--out and --resume name different directories; a resume continues RUN_DIR in place")
            given = None
            if config is not None:
                given = load_config(config)
            if epochs is not None or data is not None or train_limit or test_limit or seed is not None or set_ or dry_run:
                raise ConfigError("a resume uses the run's own config.toml; --epochs/--data/--*-limit/--seed/--set "
                                  "/--dry-run are refused")
            run_dir = resume
            cfg_total = load_config(resume / "config.toml")
            if cfg_total.driver.kind == "replay":
                raise ConfigError(f"{resume} is a replay of {cfg_total.driver.resource}; a replay is not resumed: "
                                  "replay the run again into a new directory")
            runner = lambda bar: resume_run(resume, config=given, driver=driver, baseline=baseline,  # noqa: E731
                                            progress=bar, notify=say, stop=stop, baseline_progress=bar)
        else:
            cfg = load_config(config) if config is not None else RunConfig()
            over: dict[str, Any] = {}
            if driver is not None:
                over.update(driver_overrides(driver))
            if epochs is not None:
                over["update.epochs"] = epochs
            if data is not None:
                over["data.name"] = data
            if train_limit is not None:
                over["data.train_limit"] = train_limit
            if test_limit is not None:
                over["data.test_limit"] = test_limit
            if seed is not None:
                over["seed"] = seed
            if dry_run:
                over["driver.dry_run"] = True
            if uncalibrated:
                over["driver.uncalibrated_ok"] = True
            over.update(parse_sets(set_ or []))
            if over:
                cfg = cfg.with_overrides(**over)
            cfg_total = cfg
            run_dir = out or Path("runs") / f"train-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
            runner = lambda bar: start_run(cfg, run_dir, baseline=baseline, progress=bar, notify=say,  # noqa: E731
                                           stop=stop, baseline_progress=bar)

        p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                     TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[acc]}"), TimeElapsedColumn(),
                     console=console, transient=False)
        bar = _Bar(p, _total_samples(cfg_total))
        try:
            with _stop_on_signals(stop):
                summary = runner(bar)
        finally:
            p.stop()
    except RunFinished as e:
        say(str(e))
        return
    except (ConfigError, RunDirError, CheckpointError, DataError, MappingError, DriverError, RunLogError,
            JournalError, ReconcileError) as e:
        # no resume hint where resuming is what cannot be done (e.g. a run log of an older schema)
        _fail(str(e), locals().get("run_dir") if getattr(e, "resumable", True) else None, driver)
    except MemoryError:
        _fail("out of memory (the network or the array is too large for this machine)", locals().get("run_dir"), driver)
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        _fail(f"{e.strerror or e}{where}", locals().get("run_dir"), driver)
    _print_summary(summary, run_dir)
    if stop.signal:
        say(f"stopped by {signal.Signals(stop.signal).name} at step {summary.get('steps', '?')}; the run is resumable:")
        say(f"  {_resume_command(run_dir, driver)}")
        raise typer.Exit(128 + stop.signal)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE options as dotted config keys; VALUE is read as TOML (bare words stay strings)."""
    import tomllib

    from .config import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted config key, e.g. update.lr=0.05")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out[key] = value
    return out


def _resume_command(run_dir: Path, driver: str | None) -> str:
    extra = f" --driver {driver}" if driver is not None and driver != "mock" else ""
    return f"pcm-hil train --resume {_shell_quote(str(run_dir))}{extra}"


def _shell_quote(arg: str) -> str:
    """arg as the user's shell takes it: POSIX sh quoting, or on Windows (cmd, PowerShell) double quotes."""
    if sys.platform == "win32":
        import subprocess

        return subprocess.list2cmdline([arg])
    return shlex.quote(arg)


def _fail(message: str, run_dir: Path | None, driver: str | None) -> None:
    """One error line (and, where the run left a checkpoint, how to resume it); exit 2."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    if run_dir is not None and (Path(run_dir) / "checkpoint.npz").exists() and not _replayed(run_dir, driver):
        console.print(f"the run is resumable: {escape(_resume_command(run_dir, driver))}", soft_wrap=True,
                      highlight=False)
    raise typer.Exit(2)


def _replayed(run_dir: Path, driver: str | None) -> bool:
    """A run trained on a replay of a log (--driver replay:PATH): not resumable (a replay starts at the log's start)."""
    from .config import ConfigError, load_config

    if driver is not None and driver.startswith("replay:"):
        return True
    try:
        return load_config(Path(run_dir) / "config.toml").driver.kind == "replay"
    except ConfigError:
        return False


@contextmanager
def _stop_on_signals(stop: Any) -> Iterator[None]:
    """SIGTERM and Ctrl-C set stop.signal: the trainer stops between two steps and checkpoints.

    A second Ctrl-C while stopping interrupts at once (KeyboardInterrupt); the run is still resumable.
    """
    def handler(signum: int, frame: object) -> None:
        if stop.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signal = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _total_samples(cfg: Any) -> int | None:
    """Samples of the whole run, for the progress bar (None where the data set is not loaded yet)."""
    from .data import load_digits

    n = {"digits": lambda: len(load_digits(cfg.seed).y_train), "mnist": lambda: 60_000,
         "cifar10": lambda: 50_000}.get(cfg.data.name, lambda: None)()
    if n is None:
        return None  # text: its windows are known once it is read
    if cfg.data.train_limit:
        n = min(n, cfg.data.train_limit)
    return n * cfg.update.epochs


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the pcm-hil app."""
    app.command("train")(train_cmd)
