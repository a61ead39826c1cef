"""`pcm-hil sweep SWEEP.toml --out DIR`: many runs over config keys and seeds, on Ray (docs/sweep.md)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(soft_wrap=True, highlight=False)

#: With output redirected (no terminal), a plain status line at most this often, seconds.
PLAIN_STATUS_EVERY_S = 10.0


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"{typer.style('error:', fg='red')} {' '.join(str(message).split())}", err=True)
    return typer.Exit(code)


def _say(text: str) -> None:
    console.print(escape(text), soft_wrap=True, highlight=False)
    console.file.flush()


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def _counts(res: Any) -> dict[str, int]:
    c = {"done": 0, "running": 0, "failed": 0, "pending": 0}
    for r in res.results:
        key = "done" if r.ok else r.status if r.status in c else "pending"
        c[key] += 1
    return c


def _best_text(res: Any) -> str:
    b = res.best()
    return f"best {b.metric} {_fmt_value(b.value)} ({b.name})" if b is not None else "best: -"


def _status_line(res: Any) -> str:
    c = _counts(res)
    return (f"{c['done']}/{len(res.results)} done, {c['running']} running, {c['failed']} failed, "
            f"{c['pending']} to go; {_best_text(res)}")


class _View:
    """The progress view: a rich bar (points done of all, running, failed, best so far) with a line per event on
    a terminal; plain lines per event and a status line every PLAIN_STATUS_EVERY_S when redirected."""

    def __init__(self, total: int) -> None:
        self.live = console.is_terminal
        self.progress = Progress(TextColumn("points"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[state]}"), TimeElapsedColumn(), console=console)
        self.task = self.progress.add_task("points", total=total, state="")
        self.last = time.monotonic()
        if self.live:
            self.progress.start()

    def event(self, kind: str, r: Any, res: Any) -> None:
        pulses = f", {r.set_pulses:,} SET pulses" if r.set_pulses is not None else ""
        wall = f", {r.wall_s:.1f} s" if r.wall_s is not None else ""
        if kind == "start":
            text = f"start    {r.name}"
        elif kind == "skipped":
            text = f"skipped  {r.name}: finished earlier, {r.metric} {_fmt_value(r.value)}"
        elif kind == "finished":
            how = " (resumed from its checkpoint)" if r.resumed else ""
            text = f"done     {r.name}: {r.metric} {_fmt_value(r.value)}{pulses}{wall}{how}"
        else:
            text = f"failed   {r.name}: {r.error}"
        if self.live:
            self.progress.console.print(escape(text), soft_wrap=True, highlight=False)
        else:
            _say(text)
            self.last = time.monotonic()  # the status line comes only after a quiet while
        self.tick(res)

    def tick(self, res: Any) -> None:
        c = _counts(res)
        if self.live:
            self.progress.update(self.task, completed=c["done"] + c["failed"],
                                 state=f"{c['running']} running, {c['failed']} failed; {_best_text(res)}")
        elif c["running"] and time.monotonic() - self.last >= PLAIN_STATUS_EVERY_S:
            self.last = time.monotonic()
            _say(_status_line(res))

    def stop(self) -> None:
        if self.live:
            self.progress.stop()


def sweep_cmd(
    sweep_file: Annotated[Path, typer.Argument(help="The sweep (TOML): a base run config, grid and/or random "
                                                    "keys, seeds (docs/sweep.md).")],
    out: Annotated[Path, typer.Option(help="DIR: one RUN_DIR per point, sweep.csv and the plots; run the same "
                                           "command again to continue a sweep (finished points are skipped).")],
    address: Annotated[Optional[str], typer.Option(help="An existing Ray cluster (e.g. auto, or ray://HOST:10001); "
                                                        "default: a local Ray instance for this sweep.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Points run at once (local: the instance's CPUs, "
                                                               "default this machine's; with --address at most this "
                                                               "many).")] = None,
) -> None:
    """Train every point of a sweep (an ordinary RUN_DIR each) as Ray tasks; table and plots at the end."""
    from .sweep import SweepError, check_out_dir, load_sweep, run_sweep

    try:
        sweep = load_sweep(sweep_file)
        states = check_out_dir(sweep, out)
    except SweepError as e:
        raise _fail(str(e)) from None
    n = len(sweep.points)
    todo = sum(1 for s in states.values() if s != "finished")
    where = f"the Ray cluster at {address}" if address else "a local Ray instance"
    _say(f"pcm-hil sweep: {n} point{'s' if n != 1 else ''} ({len(sweep.keys)} swept key{'s' if len(sweep.keys) != 1 else ''} "
         f"{', '.join(sweep.keys) or '-'}; seeds {', '.join(map(str, sweep.seeds))}) in {out}; {n - todo} finished "
         f"earlier, {todo} to run" + (f" on {where}" if todo else ""))
    view = _View(n)
    try:
        with _interrupt_on_sigterm():
            res = run_sweep(sweep, out, address=address, workers=workers, on_event=view.event, tick=view.tick)
    except SweepError as e:
        view.stop()
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        view.stop()
        raise _fail("interrupted before the sweep started; nothing was run", 130) from None
    view.stop()
    _say(_status_line(res).replace(" 0 running,", "").replace(", 0 to go", ""))
    if res.workers:
        _say(f"wall {res.wall_s:.1f} s on {res.workers} worker{'s' if res.workers != 1 else ''} "
             f"(Ray start {res.ray_start_s:.1f} s)")
    _say(f"table: {out / res.csv.name if res.csv else '-'}")
    if res.plots:
        _say(f"plots: {', '.join(p.name for p in res.plots)} in {out}")
    if res.interrupted:
        _say(f"interrupted; the sweep is resumable: pcm-hil sweep {sweep_file} --out {out}")
        raise typer.Exit(130)
    if res.failed:
        for r in res.failed:
            _say(f"failed: {r.name}: {r.error}")
        raise typer.Exit(1)


@contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM stops the sweep as Ctrl-C does: Ray is shut down, running points stay resumable."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the pcm-hil app."""
    app.command("sweep")(sweep_cmd)
