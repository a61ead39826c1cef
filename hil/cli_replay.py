"""`pcm-hil replay`: train a finished run again against its own log and check it reproduces it (hil/replay.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console(soft_wrap=True, highlight=False)

#: Seconds between two progress lines (plain lines: they read the same on a terminal and redirected).
PROGRESS_EVERY_S = 5.0


def _fail(message: str, code: int) -> typer.Exit:
    """One error line on stderr (a multi-line message, e.g. a config's, joined into one); return the exit to raise."""
    typer.echo(f"{typer.style('error:', fg='red')} {' '.join(str(message).split())}", err=True)
    return typer.Exit(code)


def _say(text: str) -> None:
    console.print(text, markup=False)


def replay_cmd(
    run_dir: Annotated[Path, typer.Argument(help="The finished (or stopped) run to replay: pcm-hil train's RUN_DIR.")],
    out: Annotated[Path, typer.Option(help="NEW_DIR: the replay's own run directory (must not exist).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE",
                                                      help="Change a config key for the replay, e.g. --set "
                                                           "update.lr=0.05 (TOML value; repeatable): the replay then "
                                                           "stops where the change first shows.")] = None,
) -> None:
    """Re-run RUN_DIR's training against its run log (every read re-served) and check that every program and
    metric is reproduced; at the first difference, say where (step, program id) and what differs, exit 1.
    A run that cannot be replayed is refused before NEW_DIR is made (exit 2)."""
    from drivers import DriverError
    from drivers.runlog import RunLogError

    from .cli_train import parse_sets
    from .config import ConfigError
    from .data import DataError
    from .journal import JournalError
    from .mapping import MappingError
    from .reconcile import ReconcileError
    from .replay import ReplayDiverged, ReplayError, replay_run
    from .run import RunDirError, StopFlag
    from .trainer import CheckpointError

    stop = StopFlag()
    clock: dict[str, float] = {}

    def progress(t: Any) -> None:
        now = time.perf_counter()
        if not clock:
            clock.update(t0=now, step0=t.at.step, last=now)
        if now - clock["last"] >= PROGRESS_EVERY_S:
            clock["last"] = now
            rate = (t.at.step - clock["step0"]) / (now - clock["t0"])
            _say(f"step {t.at.step:,} (epoch {min(t.at.epoch + 1, t.cfg.update.epochs)}), {rate:,.0f} steps/s, "
                 "every program so far as logged")

    def on_epoch(logged: dict[str, float], got: dict[str, float]) -> None:
        from .replay import METRIC_KEYS

        key = next((k for k in METRIC_KEYS if k in got), "epoch")  # the run's task's metric
        _say(f"epoch {int(got['epoch'])}: {METRIC_KEYS.get(key, key)} {got[key]:.4f} (logged "
             f"{logged.get(key, float('nan')):.4f}), {int(got.get('programs_applied', 0)):,} programs, "
             f"{int(got.get('set_pulses', 0)):,} SET / {int(got.get('reset_pulses', 0)):,} RESET pulses, "
             f"{int(got.get('refreshes', 0)):,} refreshes: as logged")

    def notify(text: str) -> None:
        _say(text)

    from .cli_train import _stop_on_signals

    try:
        overrides = parse_sets(set_ or [])
        start = lambda cfg: _say(f"replaying {run_dir} ({cfg.update.epochs} epochs of {cfg.data.name}, "  # noqa: E731
                                 f"{cfg.network.kind}) into {out}" + (f" with {', '.join(set_ or [])}" if set_ else ""))
        with _stop_on_signals(stop):
            r = replay_run(run_dir, out, overrides=overrides, progress=progress, on_epoch=on_epoch, notify=notify,
                           on_start=start, stop=stop)
    except ReplayDiverged as e:
        raise _fail(str(e), 1) from None
    except (ReplayError, ConfigError, RunDirError, CheckpointError, DataError, MappingError, DriverError,
            RunLogError, JournalError, ReconcileError) as e:
        raise _fail(str(e), 2) from None
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise _fail(f"{e.strerror or e}{where}", 2) from None
    if stop.signal:
        _say(f"stopped at step {r.steps}; the replay so far is in {out} (not compared to the end)")
        raise typer.Exit(128 + stop.signal)
    s = r.summary
    table = Table(title=f"pcm-hil replay: {run_dir} -> {out}")
    table.add_column("compared")
    table.add_column("as logged", justify="right")
    for k, v in (("steps", r.steps), ("epochs", r.epochs), ("programs (ids, addresses, SET counts, RESETs)", r.programs),
                 ("read calls (step, reason, size, time)", r.read_events), ("device reads re-served", r.device_reads),
                 ("metrics records", r.metric_records)):
        table.add_row(k, f"{v:,}")
    if s.get("test_accuracy") is not None:
        table.add_row("test accuracy", f"{s['test_accuracy']:.4f}")
    if s.get("baseline_test_accuracy") is not None:
        table.add_row("baseline test accuracy", f"{s['baseline_test_accuracy']:.4f}")
    console.print(table)
    _say(f"reproduced: every program and metric of {run_dir} as logged; the replay's run log: {out / 'run.h5'}")


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the pcm-hil app."""
    app.command("replay")(replay_cmd)
