"""`pcm-hil report`, `pcm-hil compare`, `pcm-hil export` and `pcm-hil watch`: look at runs (analysis/ does the work; docs/report.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .consoles import print_unwrapped

# soft_wrap: a path is never broken across lines; highlight off: numbers and paths print as they are.
console = Console(soft_wrap=True, highlight=False)


def _fail(message: str, code: int = 1) -> typer.Exit:
    """One error line on stderr, as is; return the exit to raise."""
    typer.echo(f"{typer.style('error:', fg='red')} {' '.join(str(message).split())}", err=True)
    return typer.Exit(code)


def _print(renderable: object) -> None:
    print_unwrapped(console, renderable)


def _say(text: str) -> None:
    console.print(text, markup=False)


def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (pcm-hil train's RUN_DIR, or a pcm-hil characterize "
                                                 "folder); finished, stopped, killed or still running.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for the PNGs and report.html (default RUN_DIR/report; "
                                                     "files of the same names are replaced).")] = None,
) -> None:
    """PNG figures and one self-contained report.html of a run, and a short summary here."""
    from analysis import AnalysisError, write_report

    try:
        rep = write_report(run_dir, out)
    except AnalysisError as e:
        raise _fail(str(e), e.exit_code) from None
    table = Table(title=f"pcm-hil report: {escape(rep.run.name)}")
    table.add_column("quantity")
    table.add_column("value")
    for k, v in rep.summary:
        if k != "run":
            table.add_row(escape(k), escape(v))
    _print(table)
    for n in rep.notes:
        _say(f"note: {n}")
    _say(f"figures: {', '.join(f.file for f in rep.figures)} in {rep.out}")
    _say(f"report: {rep.html}")


def compare_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Two or more run folders (pcm-hil train's RUN_DIRs).")],
    out: Annotated[Path, typer.Option(help="PNG of the overlaid curves (replaced if it exists).")] = Path("compare.png"),
) -> None:
    """One table and overlaid curves for runs that differ in config, chip or seed, with their config differences."""
    from analysis import AnalysisError, compare_runs, write_compare_figure

    try:
        c = compare_runs(list(runs))
        png = write_compare_figure(c, out)
    except AnalysisError as e:
        raise _fail(str(e), e.exit_code) from None
    table = Table(title=f"pcm-hil compare: {len(c.runs)} runs")
    for i, col in enumerate(c.columns):
        table.add_column(col, justify="left" if i < 2 else "right")
    for row in c.rows:
        table.add_row(*(escape(x) for x in row))
    _print(table)
    if c.differences:
        diff = Table(title="config differences")
        diff.add_column("key")
        for label in c.labels:
            diff.add_column(escape(label))
        for key, vals in c.differences:
            diff.add_row(escape(key), *(escape(v) for v in vals))
        _print(diff)
    else:
        _say("config: the same in every run")
    for run, label in zip(c.runs, c.labels, strict=True):
        if label != str(run.path):
            _say(f"{label}: {run.path}")
    _say(f"curves: {png}")


def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (or its run log); finished, stopped, killed or still "
                                                 "running (the rows flushed so far).")],
    what: Annotated[str, typer.Option(help="Table: reads (one row per device read), pulses (one row per device a "
                                           "program addressed), programs (one row per program), metrics.")] = "reads",
    fmt: Annotated[str, typer.Option("--format", help="csv, parquet or netcdf (netCDF-4).")] = "csv",
    out: Annotated[Optional[Path], typer.Option(help="File to write (default RUN_DIR/export/WHAT.csv, .parquet "
                                                     "or .nc).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the file if it exists.")] = False,
    chunk_rows: Annotated[str, typer.Option(help="Rows read from the log and written at a time (memory use "
                                                 "grows with it).")] = "1048576",
) -> None:
    """The run's trace as one flat table (csv, parquet, netCDF) for pandas, xarray and other tools; streams."""
    from analysis import AnalysisError, export_run

    try:
        rows = int(chunk_rows.replace("_", "").replace(",", ""))
    except ValueError:
        rows = 0
    if rows < 1:
        raise _fail(f"--chunk-rows must be a positive integer, got {chunk_rows!r}", 2)
    try:
        e = export_run(run_dir, what.strip().lower(), fmt.strip().lower(), out, force=force, chunk_rows=rows)
    except AnalysisError as err:
        raise _fail(str(err), err.exit_code) from None
    _say(f"pcm-hil export: {e.what} of {e.run_dir.name or e.run_dir} ({e.log})")
    _say(f"rows: {e.describe()}")
    names = [f"{c.name} ({c.units})" if c.units else c.name for c in e.columns]
    more = f", and {len(names) - 16} more" if len(names) > 16 else ""
    _say("columns: " + ", ".join(names[:16]) + more)
    for n in e.notes:
        _say(f"note: {n}")
    _say(f"file: {e.path} ({e.format}, {e.path.stat().st_size:,} bytes)")


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the pcm-hil app."""
    app.command("report")(report_cmd)
    app.command("compare")(compare_cmd)
    app.command("export")(export_cmd)
    app.command("watch")(watch_cmd)


def watch_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run folder of a run being written (or finished: shown once).")],
    every: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit.")] = False,
    html: Annotated[bool, typer.Option("--html", help="Rewrite RUN_DIR/report/report.html every --every "
                                                      "seconds (at least 5) instead of the terminal dashboard.")] = False,
) -> None:
    """Follow a run through its log (SWMR; never blocks or slows the writer) until it ends or Ctrl-C."""
    import time

    from rich.live import Live

    from analysis import AnalysisError
    from analysis.watch import Watcher, rows

    try:
        w = Watcher(run_dir)
    except AnalysisError as e:
        raise _fail(str(e), e.exit_code) from None

    def table(snap: object) -> Table:
        t = Table(title=f"pcm-hil watch: {escape(str(w.run_dir))}", title_justify="left")
        t.add_column("quantity")
        t.add_column("value")
        for k, v in rows(snap):  # type: ignore[arg-type]
            t.add_row(escape(k), escape(v))
        return t

    try:
        if html:
            from analysis import write_report

            while True:
                snap = w.tick()
                rep = write_report(w.run_dir)
                _say(f"{time.strftime('%H:%M:%S')} step {snap.step:,} ({snap.state}): {rep.html}")
                if once or snap.state != "being written":
                    return
                time.sleep(max(every, 5.0))
        snap = w.tick()
        if once or snap.state != "being written" or not console.is_terminal:
            # not a terminal: one table per refresh, as plain lines (a log file or a pipe)
            while True:
                _print(table(snap))
                if once or snap.state != "being written":
                    return
                time.sleep(every)
                snap = w.tick()
        with Live(table(snap), console=console, refresh_per_second=4) as live:
            while snap.state == "being written":
                time.sleep(every)
                snap = w.tick()
                live.update(table(snap))
    except KeyboardInterrupt:
        return
    except AnalysisError as e:
        raise _fail(str(e), e.exit_code) from None
    finally:
        w.close()
