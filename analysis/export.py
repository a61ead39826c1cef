"""A run's trace as one flat table (csv, parquet or netCDF) that pandas, xarray and other tools read directly.

`export_run(RUN_DIR, what, fmt, out)` writes one of four tables (docs/report.md, "Export", lists the columns):

- reads:    one row per device read (step, times, address, array row/col, layer, weight, G+/G- role, uS, reason)
- pulses:   one row per device a program addressed (its SET count and RESET, whether the chip applied it)
- programs: one row per program (its devices, SET and RESET totals, pulse shapes)
- metrics:  one row per log_metrics call, one column per metric name

It streams: the run log is read through RunLogReader's chunked accessors, chunk_rows device rows at a time,
and each chunk is appended to the output (csv: incremental writes; parquet: one row group per chunk through
pyarrow.parquet.ParquetWriter; netCDF-4: variables along an unlimited dimension grown per chunk, through
h5netcdf), so memory stays bounded by the chunk size whatever the log's size. The file is written under a
temporary name beside the output and renamed when complete: a failed or interrupted export leaves no
half-written file under the output's name.

Like the rest of analysis/, this reads a finished, a killed or a live run (the rows flushed so far).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from drivers.runlog import RunLogError, RunLogReader

from .runs import SUMMARY_FILE, TRAIN_LOG, AnalysisError, _summary, find_log, open_log, writer_alive

WHATS = ("reads", "programs", "pulses", "metrics")
FORMATS = {"csv": ".csv", "parquet": ".parquet", "netcdf": ".nc"}
#: Device rows read from the log (and written to the output) at a time.
DEFAULT_CHUNK_ROWS = 1 << 20
#: Rows per HDF5 chunk of a netCDF variable, and the fewest rows appended to the netCDF variables at a time.
NC_CHUNK = 1 << 13
NC_APPEND_ROWS = 1 << 10
#: Default output folder inside the run folder.
EXPORT_DIR = "export"
#: role column: the device's place in its weight's pair.
ROLES = ("none", "G+", "G-")
#: The netCDF dimension of each table.
DIMENSION = {"reads": "read", "pulses": "pulse", "programs": "program", "metrics": "record"}


@dataclass(frozen=True)
class Column:
    """One column of an exported table: its name, numpy kind (int64, float64, float32, bool, str), unit, meaning."""

    name: str
    kind: str
    units: str | None
    description: str


def _cols(*spec: tuple[str, str, str | None, str]) -> tuple[Column, ...]:
    return tuple(Column(*s) for s in spec)


_TIMES = (("step", "int64", None, "training (or experiment) step the operation was made at"),
          ("t_s", "float64", "s", "driver clock, s (simulated time on a mock chip; NaN for a program: not recorded)"),
          ("wall_s", "float64", "s", "host wall-clock time, Unix seconds (s since 1970-01-01 UTC)"))
_DEVICE = (("address", "int64", None, "flat device address, array_row * cols + array_col"),
           ("array_row", "int64", None, "row of the device on the array (-1: geometry not in the log)"),
           ("array_col", "int64", None, "column of the device on the array (-1: geometry not in the log)"),
           ("layer", "int64", None, "network layer the device holds a weight of (-1: not a mapped device)"),
           ("weight_row", "int64", None, "row i of the weight W[i, j] in its layer (input; the bias row last; -1)"),
           ("weight_col", "int64", None, "column j of the weight W[i, j] in its layer (output; -1)"),
           ("role", "str", None, "G+ or G- (W = beta (G+ - G-)); none: not a mapped device"))

COLUMNS: dict[str, tuple[Column, ...]] = {
    "reads": _cols(("seq", "int64", None, "position of the read call in the run's sequence of reads, programs, metrics"),
                   *_TIMES, *_DEVICE,
                   ("conductance_us", "float32", "uS", "conductance read, microsiemens"),
                   ("reason", "str", None, "why it was read: initial, after-program, periodic, evaluation, "
                                           "refresh-verify, resume, probe, calibration-*")),
    "pulses": _cols(("seq", "int64", None, "position of the program in the run's sequence"),
                    ("program_id", "int64", None, "the program's id (unique within a run)"),
                    *_TIMES, *_DEVICE,
                    ("set_count", "int64", "pulses", "SET pulses the device gets"),
                    ("reset", "bool", None, "whether the device gets a RESET pulse (before its SET pulses)"),
                    ("applied", "bool", None, "false: a program a resume found the chip never applied")),
    "programs": _cols(("seq", "int64", None, "position of the program in the run's sequence"),
                      ("program_id", "int64", None, "the program's id (unique within a run)"),
                      *_TIMES,
                      ("devices", "int64", None, "devices the program addresses"),
                      ("set_pulses", "int64", "pulses", "SET pulses, summed over its devices"),
                      ("reset_pulses", "int64", "pulses", "RESET pulses (devices reset)"),
                      ("set_amplitude_ua", "float64", "uA", "SET pulse amplitude, microamps"),
                      ("set_width_ns", "float64", "ns", "SET pulse width, nanoseconds"),
                      ("reset_amplitude_ua", "float64", "uA", "RESET pulse amplitude, microamps"),
                      ("reset_width_ns", "float64", "ns", "RESET pulse width, nanoseconds"),
                      ("applied", "bool", None, "false: a program a resume found the chip never applied")),
    "metrics": _cols(("step", "int64", None, "step of the log_metrics call"),
                     ("wall_s", "float64", "s", "host wall-clock time, Unix seconds")),
}


@dataclass
class Export:
    """What export_run wrote: the file, its table, its rows, and the totals a reader may check it by."""

    path: Path
    run_dir: Path
    log: Path
    what: str
    format: str
    columns: list[Column]
    rows: int = 0
    totals: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


    def describe(self) -> str:
        """One line: what the file holds, with the totals (e.g. "5,471 device reads of 172 read calls")."""
        t = self.totals
        if self.what == "reads":
            return f"{self.rows:,} device reads of {t.get('read_calls', 0):,} read calls"
        if self.what == "pulses":
            return (f"{self.rows:,} device rows of {t.get('programs_applied', 0):,} applied programs: "
                    f"{t.get('set_pulses', 0):,} SET pulses, {t.get('reset_pulses', 0):,} RESET pulses"
                    + (f" (and {t['set_pulses_unapplied']:,} SET, {t['reset_pulses_unapplied']:,} RESET in "
                       "programs never applied, applied = false)"
                       if t.get("set_pulses_unapplied") or t.get("reset_pulses_unapplied") else ""))
        if self.what == "programs":
            return (f"{self.rows:,} programs ({t.get('programs_applied', 0):,} applied: {t.get('set_pulses', 0):,} "
                    f"SET pulses, {t.get('reset_pulses', 0):,} RESET pulses)")
        return f"{self.rows:,} metric records, {len(self.columns) - 2} metrics"


# ------------------------------------------------------------------------------------------ the device lookup
@dataclass
class _Devices:
    """Per device address: array row/col, layer, weight (i, j) and role, from the geometry and the mapping."""

    cols: int | None
    layer: npt.NDArray[np.int64]
    wrow: npt.NDArray[np.int64]
    wcol: npt.NDArray[np.int64]
    role: npt.NDArray[np.int8]

    def columns(self, address: npt.NDArray[np.int64]) -> dict[str, np.ndarray]:
        n = self.layer.size
        ok = (address >= 0) & (address < n)
        a = np.where(ok, address, 0)

        def pick(table: np.ndarray, missing: int) -> np.ndarray:
            return np.where(ok, table[a], missing) if n else np.full(address.size, missing, table.dtype)

        if self.cols:
            arow, acol = address // self.cols, address % self.cols
        else:
            arow = acol = np.full(address.size, -1, np.int64)
        return {"address": address, "array_row": arow, "array_col": acol, "layer": pick(self.layer, -1),
                "weight_row": pick(self.wrow, -1), "weight_col": pick(self.wcol, -1),
                "role": np.array(ROLES, dtype=str)[pick(self.role, 0)]}


def _int_attr(attrs: dict[str, Any], name: str) -> int | None:
    try:
        return int(attrs[name])
    except (KeyError, TypeError, ValueError):
        return None


def _devices(r: RunLogReader, notes: list[str]) -> _Devices:
    rows, cols = _int_attr(r.attrs, "driver_rows"), _int_attr(r.attrs, "driver_cols")
    if not (rows and cols):
        notes.append("the log has no geometry (driver_rows / driver_cols): array_row and array_col are -1")
        rows = cols = None
    names = set(r.array_names())
    pairs: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # layer, i, j, G+, G-
    if "mapping/table" in names:
        t = r.array("mapping/table").astype(np.int64)
        if t.ndim == 2 and t.shape[1] >= 5 and (t.shape[1] - 3) % 2 == 0:
            k = (t.shape[1] - 3) // 2  # devices per polarity: G+ copies, then G- copies
            for layer in np.unique(t[:, 0]):
                s = t[t[:, 0] == layer]
                for c in range(k):
                    have = s[:, 3 + c] >= 0  # (-1: a layer with fewer copies than the most)
                    pairs.append((int(layer), s[have, 1], s[have, 2], s[have, 3 + c], s[have, 3 + k + c]))
    if not pairs:
        i = 0
        while f"mapping/layer{i}_gplus" in names and f"mapping/layer{i}_gminus" in names:
            gp = r.array(f"mapping/layer{i}_gplus").astype(np.int64)
            gm = r.array(f"mapping/layer{i}_gminus").astype(np.int64)
            for cp, cm in zip(gp.reshape(-1, *gp.shape[-2:]), gm.reshape(-1, *gm.shape[-2:]), strict=True):
                wi, wj = np.indices(cp.shape)  # (a layer with several devices per polarity: one copy at a time)
                pairs.append((i, wi.ravel(), wj.ravel(), cp.ravel(), cm.ravel()))
            i += 1
    if not pairs:
        notes.append("the log has no weight mapping (mapping/table): layer, weight_row and weight_col are -1, "
                     "role is none")
    top = max((int(max(p[3].max(initial=-1), p[4].max(initial=-1))) + 1 for p in pairs), default=0)
    n = max(rows * cols if rows and cols else 0, top)
    layer = np.full(n, -1, np.int64)
    wrow = np.full(n, -1, np.int64)
    wcol = np.full(n, -1, np.int64)
    role = np.zeros(n, np.int8)
    for li, wi, wj, gp, gm in pairs:
        for addr, code in ((gp, 1), (gm, 2)):
            layer[addr], wrow[addr], wcol[addr], role[addr] = li, wi, wj, code
    return _Devices(cols, layer, wrow, wcol, role)


def _unapplied(run_dir: Path, r: RunLogReader, notes: list[str]) -> npt.NDArray[np.int64]:
    """Program ids a resume found the chip never applied: summary.json's and the log's unapplied_program_id."""
    ids = {int(x) for x in ((_summary(run_dir, notes) or {}).get("unapplied_program_ids") or [])}
    m = r.metrics()
    if "unapplied_program_id" in m:
        v = m["unapplied_program_id"]
        ids |= {int(x) for x in v[np.isfinite(v)]}
    return np.array(sorted(ids), np.int64)


# ------------------------------------------------------------------------------------------ the tables
def _reads(r: RunLogReader, dev: _Devices, chunk: int, totals: dict[str, int], **_: Any) -> Iterator[dict]:
    totals.update(read_calls=0, reads=0)
    for c in r.iter_reads(chunk):
        totals["reads"] += c["address"].size
        yield {"seq": c["seq"].astype(np.int64), "step": c["step"], "t_s": c["t_s"], "wall_s": c["wall_s"],
               **dev.columns(c["address"]), "conductance_us": c["conductance_us"], "reason": c["reason"]}
    # (read calls that read no device have no rows: count them from the events)
    totals["read_calls"] = sum(int(e["seq"].size) for e in r.iter_read_events(chunk))


def _pulses(r: RunLogReader, dev: _Devices, chunk: int, totals: dict[str, int], unapplied: np.ndarray,
            **_: Any) -> Iterator[dict]:
    totals.update(set_pulses=0, reset_pulses=0, programs_applied=0, set_pulses_unapplied=0,
                  reset_pulses_unapplied=0, device_rows=0)
    for c in r.iter_program_devices(chunk):
        applied = ~np.isin(c["program_id"], unapplied)
        totals["device_rows"] += c["address"].size
        totals["set_pulses"] += int(c["set_count"][applied].sum())
        totals["reset_pulses"] += int(c["reset"][applied].sum())
        totals["set_pulses_unapplied"] += int(c["set_count"][~applied].sum())
        totals["reset_pulses_unapplied"] += int(c["reset"][~applied].sum())
        yield {"seq": c["seq"].astype(np.int64), "program_id": c["program_id"], "step": c["step"], "t_s": c["t_s"],
               "wall_s": c["wall_s"], **dev.columns(c["address"]), "set_count": c["set_count"], "reset": c["reset"],
               "applied": applied}
    totals["programs_applied"] = sum(int((~np.isin(e["program_id"], unapplied)).sum())
                                     for e in r.iter_program_events(chunk))


def _programs(r: RunLogReader, dev: _Devices, chunk: int, totals: dict[str, int], unapplied: np.ndarray,
              **_: Any) -> Iterator[dict]:
    totals.update(programs=0, programs_applied=0, set_pulses=0, reset_pulses=0)
    shapes = np.array([[s.set.amplitude_ua, s.set.width_ns, s.reset.amplitude_ua, s.reset.width_ns]
                       for s in (r.shapes(i) for i in range(r.shape_rows))], np.float64).reshape(-1, 4)
    for e in r.iter_program_events(chunk):
        applied = ~np.isin(e["program_id"], unapplied)
        totals["programs"] += applied.size
        totals["programs_applied"] += int(applied.sum())
        totals["set_pulses"] += int(e["set_pulses"][applied].sum())
        totals["reset_pulses"] += int(e["reset_pulses"][applied].sum())
        sh = shapes[e["shapes"].astype(np.int64)]
        yield {"seq": e["seq"].astype(np.int64), "program_id": e["program_id"], "step": e["step"], "t_s": e["t_s"],
               "wall_s": e["wall_s"], "devices": e["count"].astype(np.int64), "set_pulses": e["set_pulses"],
               "reset_pulses": e["reset_pulses"], "set_amplitude_ua": sh[:, 0], "set_width_ns": sh[:, 1],
               "reset_amplitude_ua": sh[:, 2], "reset_width_ns": sh[:, 3], "applied": applied}


def _metric_columns(r: RunLogReader) -> tuple[dict[str, np.ndarray], list[Column]]:
    m = r.metrics()
    names = [k for k in m if k not in ("step", "wall_s")]
    cols = list(COLUMNS["metrics"]) + [Column(k, "float64", None, "metric (docs/run-log.md); NaN: not in this call")
                                       for k in names]
    return m, cols


def _metrics(r: RunLogReader, dev: _Devices, chunk: int, totals: dict[str, int], metrics: dict[str, np.ndarray],
             **_: Any) -> Iterator[dict]:
    n = metrics["step"].size
    totals["records"] = n
    for a in range(0, n, chunk):
        yield {k: (v[a:a + chunk].astype(np.int64) if k == "step" else v[a:a + chunk]) for k, v in metrics.items()}


_TABLES: dict[str, Callable[..., Iterator[dict]]] = {"reads": _reads, "pulses": _pulses, "programs": _programs,
                                                     "metrics": _metrics}


# ------------------------------------------------------------------------------------------ the formats
def _arrow_type(kind: str) -> Any:
    import pyarrow as pa

    return {"int64": pa.int64(), "float64": pa.float64(), "float32": pa.float32(), "bool": pa.bool_(),
            "str": pa.string()}[kind]


def _arrow_schema(columns: list[Column], meta: dict[str, str]) -> Any:
    import pyarrow as pa

    fields = []
    for c in columns:
        fm = {"description": c.description}
        if c.units:
            fm["units"] = c.units
        fields.append(pa.field(c.name, _arrow_type(c.kind), metadata=fm))
    units = {c.name: c.units for c in columns if c.units}
    return pa.schema(fields, metadata={**meta, "units": json.dumps(units)})


def _arrow_table(chunk: dict[str, np.ndarray], schema: Any) -> Any:
    import pyarrow as pa

    return pa.Table.from_arrays([pa.array(np.asarray(chunk[f.name]), type=f.type) for f in schema], schema=schema)


class _CsvSink:
    def __init__(self, path: Path, columns: list[Column], meta: dict[str, str], chunk: int) -> None:
        import pyarrow.csv as pcsv

        self.schema = _arrow_schema(columns, meta)
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.writer = pcsv.CSVWriter(self.file, self.schema)

    def write(self, chunk: dict[str, np.ndarray]) -> None:
        self.writer.write_table(_arrow_table(chunk, self.schema))

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            self.file.close()


class _ParquetSink:
    def __init__(self, path: Path, columns: list[Column], meta: dict[str, str], chunk: int) -> None:
        import pyarrow.parquet as pq

        self.schema = _arrow_schema(columns, meta)
        self.writer = pq.ParquetWriter(path, self.schema)

    def write(self, chunk: dict[str, np.ndarray]) -> None:
        self.writer.write_table(_arrow_table(chunk, self.schema))  # one row group per chunk

    def close(self) -> None:
        self.writer.close()


class _NetcdfSink:
    """netCDF-4 (HDF5) through h5netcdf: one variable per column along one unlimited dimension."""

    def __init__(self, path: Path, columns: list[Column], meta: dict[str, str], chunk: int) -> None:
        import h5netcdf
        import h5py

        self.file = h5netcdf.File(path, "w")
        self.dim = meta["dimension"]
        # an unlimited dimension grown per append; the metrics table (read whole) gets a fixed one: h5netcdf
        # works out an unlimited dimension's size from every variable on it, slow with a hundred metric columns
        self.fixed = int(meta.get("rows") or 0) > 0
        self.file.dimensions[self.dim] = int(meta["rows"]) if self.fixed else None
        self.n, self.appends = 0, 0
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0
        for k, v in meta.items():
            if k not in ("dimension", "rows"):
                self.file.attrs[k] = v
        self.vars = {}
        rows = (int(meta["rows"]),) if self.fixed else ()  # a fixed dimension's chunks are no longer than it
        for c in columns:
            dtype = h5py.string_dtype() if c.kind == "str" else np.int8 if c.kind == "bool" else np.dtype(c.kind)
            # chunks of NC_CHUNK rows, deflated (an unlimited dimension's last chunk is allocated whole)
            var = self.file.create_variable(c.name, (self.dim,), dtype, chunks=(max(1, min(chunk, NC_CHUNK, *rows)),),
                                            compression="gzip", compression_opts=1, shuffle=True)
            var.attrs["long_name"] = c.description
            if c.units:
                var.attrs["units"] = c.units
            if c.kind == "bool":
                var.attrs["flag_values"] = np.array([0, 1], np.int8)
                var.attrs["flag_meanings"] = "false true"
            self.vars[c.name] = (var, c.kind)

    def write(self, chunk: dict[str, np.ndarray]) -> None:
        # Rows are appended NC_APPEND_ROWS or more at a time: each append rewrites the (deflated) HDF5 chunks it
        # touches, so appending a few rows at a time would cost a whole chunk each.
        n = len(next(iter(chunk.values())))
        if n:
            self.pending.append(chunk)
            self.pending_rows += n
        if self.pending_rows >= NC_APPEND_ROWS:
            self._append()

    def _append(self) -> None:
        if not self.pending_rows:
            return
        chunk = {k: np.concatenate([np.asarray(c[k]) for c in self.pending]) for k in self.vars}
        n = self.pending_rows
        self.pending, self.pending_rows = [], 0
        if not self.fixed:
            self.file.resize_dimension(self.dim, self.n + n)
        for name, (var, kind) in self.vars.items():
            v = chunk[name]
            var[self.n:self.n + n] = v.astype(object) if kind == "str" else v.astype(np.int8) if kind == "bool" else v
        self.n += n
        self.appends += 1

    def close(self) -> None:
        try:
            self._append()
        finally:
            self.file.close()


_SINKS = {"csv": _CsvSink, "parquet": _ParquetSink, "netcdf": _NetcdfSink}


# ------------------------------------------------------------------------------------------ export_run
def default_out(run_dir: Path, what: str, fmt: str) -> Path:
    """RUN_DIR/export/WHAT.csv (.parquet, .nc)."""
    return run_dir / EXPORT_DIR / f"{what}{FORMATS[fmt]}"


def export_run(path: str | Path, what: str, fmt: str, out: str | Path | None = None, *, force: bool = False,
               chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Export:
    """Write one table of a run (what: reads, programs, pulses, metrics) as fmt (csv, parquet, netcdf) to out
    (default RUN_DIR/export/WHAT.EXT), chunk_rows rows at a time. An existing out is replaced only with force.

    AnalysisError with one line otherwise (exit_code 2 for a bad argument, 1 for an unreadable log or an
    unwritable output)."""
    if what not in WHATS:
        raise AnalysisError(f"unknown table {what!r}: --what is one of {', '.join(WHATS)}", 2)
    if fmt not in FORMATS:
        raise AnalysisError(f"unknown format {fmt!r}: --format is one of {', '.join(FORMATS)}", 2)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise AnalysisError(f"chunk_rows must be a positive integer, got {chunk_rows!r}", 2)
    run_dir, log = find_log(path)
    dest = Path(out) if out is not None else default_out(run_dir, what, fmt)
    if dest.is_dir():
        raise AnalysisError(f"{dest} is a folder: --out names the file to write", 2)
    if dest.exists() and not force:
        raise AnalysisError(f"{dest} exists: give --force to replace it, or another --out", 2)
    live = writer_alive(log)
    reader = open_log(log)
    try:
        with reader as r:
            return _export(r, run_dir, log, dest, what, fmt, int(chunk_rows), live)
    except RunLogError as e:
        raise AnalysisError(str(e)) from None


def _export(r: RunLogReader, run_dir: Path, log: Path, dest: Path, what: str, fmt: str, chunk: int,
            live: bool) -> Export:
    notes: list[str] = []
    if live:
        notes.append("the run is being written: the export holds the rows flushed so far")
    elif not (run_dir / SUMMARY_FILE).is_file() and log.name == TRAIN_LOG:
        notes.append(f"no {SUMMARY_FILE} (killed or still running): the export holds the rows the log had flushed")
    if r.torn_tail:
        notes.append("the log has a torn tail (rows a killed writer wrote without their checksums), left out: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(r.torn_tail.items())))
    metrics: dict[str, np.ndarray] = {}
    if what == "metrics":
        metrics, columns = _metric_columns(r)
    else:
        columns = list(COLUMNS[what])
    dev = _devices(r, notes) if what in ("reads", "pulses") else None
    unapplied = _unapplied(run_dir, r, notes) if what in ("pulses", "programs") else np.zeros(0, np.int64)
    meta = {"title": f"pcm-hil export: {what} of {run_dir.name or run_dir}", "source": str(log),
            "what": what, "dimension": DIMENSION[what],
            "schema_version": str(r.schema_version), "history": "pcm-hil export (analysis/export.py)"}
    if what == "metrics":
        meta["rows"] = str(metrics["step"].size)  # known up front (netCDF: a fixed dimension)
    result = Export(dest, run_dir, log, what, fmt, columns, notes=notes)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnalysisError(f"cannot write {dest}: {e.strerror or e}") from None
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    try:
        sink = _SINKS[fmt](tmp, columns, meta, chunk)
        try:
            for c in _TABLES[what](r, dev, chunk, result.totals, unapplied=unapplied, metrics=metrics):
                sink.write(c)
                result.rows += len(c[columns[0].name])
        finally:
            sink.close()
        os.replace(tmp, dest)
    except OSError as e:
        raise AnalysisError(f"cannot write {dest}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return result
