"""Looking at runs after (or while) they happen: reports and comparisons, read from the run log.

This package sits above the drivers and beside the trainer: it reads a run folder (run.h5 through
drivers.runlog.RunLogReader, summary.json, config.toml) and never imports the trainer, so it works
on a finished run, on a killed one (whatever the log's flushed rows hold) and on one still being
written (SWMR). docs/report.md describes the figures.

- load_run(RUN_DIR) -> Run: what the log says, as arrays (epochs, programs, refreshes, full reads, ...)
- write_report(RUN_DIR, out) -> Report: PNG figures and one self-contained report.html
- compare_runs([RUN_A, RUN_B, ...]) -> Comparison: one row per run, curves, config differences
- export_run(RUN_DIR, what, fmt, out) -> Export: the trace as one flat table (csv, parquet, netCDF), streamed
"""

from __future__ import annotations

from .compare import Comparison, compare_runs, write_compare_figure
from .export import Export, export_run
from .report import Report, write_report
from .runs import AnalysisError, Run, find_log, load_run

__all__ = ["AnalysisError", "Comparison", "Export", "Report", "Run", "compare_runs", "export_run", "find_log",
           "load_run", "write_compare_figure", "write_report"]
