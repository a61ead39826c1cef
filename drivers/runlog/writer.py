"""RunLogWriter: the single writer of a run log, appending whole chunks from numpy buffers under SWMR.

Every flush writes the new rows first and then, once libhdf5 has flushed them, one /checksums row per
dataset that grew: a kill -9 therefore leaves rows with their checksums, or rows past the last
checksum (a torn tail, dropped on append), never a checksum without its rows. A failed write becomes
one RunLogError and closes the log for good (see _fail).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import h5py
import numpy as np
import numpy.typing as npt

from ..program import PulseProgram, PulseShapes
from . import schema as _schema
from .checksums import crc
from .columns import Column, create_name_table, trim_torn_tail
from .files import (NoSpace, SpaceReserve, WriterLock, clear_writer_marks, describe_cause, describe_open_error,
                    detach, open_h5, superblock)
from .reader import RunLogReader, format_problems
from .schema import (ARRAY_CRC_ATTR, ARRAYS, CHECKSUMS, LIBVER, NAME, OLD_VERSION_LACKS, SCHEMA_NAME, SCHEMA_VERSION,
                     U16_MAX, U32_MAX, OldSchemaLog, RunLogError, attr_value, check_attr, check_schema, encode_name,
                     enum_reason_names, read_event_dtype, reason_names_for)

_ARRAY_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
#: Errors of a write that libhdf5 or the file system refused (h5py raises OSError or RuntimeError).
_WRITE_ERRORS = (OSError, RuntimeError)


def check_appendable(path: Path, version: int, attrs: Mapping[str, Any]) -> None:
    """RunLogError unless this code can append to a log of schema version (a resume of an older run).

    The message names what the old version lacks, who wrote it (package_version / git_commit attributes,
    where the log has them) and what to do; the caller has changed nothing.
    """
    if version == SCHEMA_VERSION:
        return
    lacks = OLD_VERSION_LACKS.get(version, "another layout")
    by = ", ".join(f"{k} {attrs[k]}" for k in ("package_version", "git_commit")
                   if attrs.get(k) not in (None, "", "unknown"))
    raise OldSchemaLog(f"run log {path} is schema version {version} ({lacks}{'; written by ' + by if by else ''}); "
                      f"this version appends only to schema {SCHEMA_VERSION} logs, so that run cannot be "
                      f"continued here (nothing changed): finish it with the version that started it, or start "
                      f"a new run (its log stays readable: report, export and replay read it)")


class RunLogWriter:
    """The single writer of a run log (docs/run-log.md says what a crash or a full disk keeps).

    Conductances in microsiemens, times in seconds: t_s on the driver's clock, wall_s Unix time. Any
    failed write raises RunLogError naming the file and the cause (e.g. "no space left on device") and
    closes the log; every later call raises RunLogError too.
    """

    def __init__(self, path: str | Path, *, attrs: Mapping[str, str | int | float | bool] = {},
                 flush_interval_s: float = 2.0, append: bool = False, verify: bool = True,
                 reasons: Sequence[str] = ()) -> None:
        """Create a new log at path (refusing an existing path), or with append=True reopen one.

        reasons: read reasons beyond schema.READ_REASONS this log will take; the read events' reason is
        an HDF5 enum fixed when the log is made, so a read of another reason is refused (RunLogError).
        append=True keeps the log's own enum (reasons is then ignored); it refuses a log of another
        schema version, and first checks every checksummed row (verify=False skips that, e.g. right
        after verify_log) and refuses a log that fails, before changing anything; then it drops the torn tail.
        """
        self.path = Path(path)
        if not flush_interval_s > 0:
            raise RunLogError(f"flush_interval_s must be positive, got {flush_interval_s}")
        self.flush_interval_s = float(flush_interval_s)
        checked = {k: check_attr(k, v) for k, v in attrs.items()}
        if isinstance(reasons, str):
            raise RunLogError(f"reasons must be a list of read reasons, got the string {reasons!r}")
        names = reason_names_for(reasons)
        self._lock: WriterLock | None = None
        self._f: h5py.File | None = None
        self._space: SpaceReserve | None = None
        self._broken: str | None = None
        self._f = self._reopen(verify) if append else self._create(names)
        try:
            for k, v in checked.items():
                self._f.attrs[k] = v
            self._cols = {name: Column(self._f[name], self._space) for name in _schema.DATASETS}
            self._sums = Column(self._f[CHECKSUMS], self._space)
            if not append:
                # The enum's names by code, also as the table every schema version has (with their checksums).
                for name in names:
                    self._cols["reads/reason_names"].append_row(name.encode("ascii"))
            self._init_state()
            self._flush()
            # Readers may follow from here on; every dataset exists already (SWMR cannot add them safely).
            self._f.swmr_mode = True
        except _WRITE_ERRORS as e:
            self._fail("setting it up", e, remove=not append)
        except BaseException:
            self._abandon()
            raise
        self._next_flush = time.monotonic() + self.flush_interval_s

    # ------------------------------------------------------------------ opening
    def _create(self, reasons: list[str]) -> h5py.File:
        if self.path.exists():
            raise RunLogError(f"run log {self.path} already exists; refusing to overwrite it "
                              f"(append=True continues it)")
        folder = self.path.parent
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise RunLogError(f"cannot create run log {self.path}: folder {folder} {what}")
        try:
            f = h5py.File(self.path, "x", libver=LIBVER)
        except FileExistsError as e:
            raise RunLogError(f"run log {self.path} already exists; refusing to overwrite it") from e
        except OSError as e:
            raise RunLogError(f"cannot create run log {self.path}: {describe_cause(e)}") from e
        try:
            self._lock = WriterLock(self.path)
            self._space = SpaceReserve(f, self._lock.fd, self.path)
            self._space.need(0)   # a disk that cannot hold the first few MB is refused before HDF5 writes
            f.attrs["schema"] = SCHEMA_NAME
            f.attrs["schema_version"] = np.int64(SCHEMA_VERSION)
            f.attrs["created_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            for name, (dtype, chunk) in _schema.DATASETS.items():
                if name == "reads/events":
                    dtype = read_event_dtype(reasons)
                if dtype == NAME:
                    create_name_table(f, name, chunk)
                else:
                    f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,))
                if name in _schema.UNITS:
                    f[name].attrs["units"] = _schema.UNITS[name]
            sums = f.create_dataset(CHECKSUMS, shape=(0,), maxshape=(None,), dtype=_schema.CHECKSUM_ROW,
                                    chunks=(_schema.CHECKSUM_CHUNK,))
            sums.attrs["datasets"] = np.array(list(_schema.DATASETS), dtype=h5py.string_dtype("ascii"))
            f.create_group(ARRAYS)
        except BaseException as e:
            # Our own half-made file, nothing of anyone else's; libhdf5 must not write to a disk that refused.
            detach(f)
            self.path.unlink(missing_ok=True)
            if self._lock:
                self._lock.release()
            if isinstance(e, _WRITE_ERRORS):
                raise RunLogError(f"cannot create run log {self.path}: {describe_cause(e)}") from e
            raise
        return f

    def _reopen(self, verify: bool) -> h5py.File:
        if not self.path.is_file():
            raise RunLogError(f"no run log at {self.path} to append to")
        self._lock = WriterLock(self.path)
        try:
            short = self._restore_recorded_end()
            try:
                self._check_before_append(verify or short is not None)
            except BaseException:
                if short is not None:
                    os.ftruncate(self._lock.fd, short)   # refused: the file as it was
                raise
            try:
                f = h5py.File(self.path, "r+", libver=LIBVER)
            except OSError as e:
                if "already open for write" not in str(e):
                    raise RunLogError(describe_open_error(self.path, e)) from e
                # We hold the writer lock, so the writer that left the mark is dead.
                clear_writer_marks(self.path)
                f = open_h5(self.path, "r+", libver=LIBVER)
            try:
                check_schema(f, self.path)
                self._space = SpaceReserve(f, self._lock.fd, self.path)
                self._space.need(0)
                trim_torn_tail(f)
            except _WRITE_ERRORS as e:
                detach(f)
                raise RunLogError(f"cannot reopen run log {self.path} for appending: {describe_cause(e)}") from e
            except BaseException:
                f.close()
                raise
            return f
        except BaseException:
            self._lock.release()
            raise

    def _restore_recorded_end(self) -> int | None:
        """Give a file cut short of the end its superblock records its length back (zeros); its old length, or None.

        What a write failing inside libhdf5 leaves (the superblock already counted chunks that never
        reached the disk). The zeros can only stand for rows past the last checksums or for rows
        verify() then refuses, so the checksums decide; a refused append restores the old length.
        We hold the writer lock, so no writer is alive to be confused by it.
        """
        sb = superblock(self.path)
        size = os.fstat(self._lock.fd).st_size
        if sb is None or size >= sb[2]:
            return None
        try:
            os.ftruncate(self._lock.fd, sb[2])
        except OSError as e:
            raise RunLogError(f"run log {self.path} is truncated ({size} bytes, its header says {sb[2]}) and "
                              f"its end cannot be restored: {describe_cause(e)}") from e
        return size

    def _check_before_append(self, verify: bool) -> None:
        """Refuse a log that is not schema SCHEMA_VERSION or fails its checksums, before anything in it changes."""
        try:
            reader = RunLogReader(self.path, _no_writer=True)
        except RunLogError as e:
            if "open for writing" not in str(e):
                raise
            clear_writer_marks(self.path)  # a writer that died before SWMR: we hold the lock, it is gone
            reader = RunLogReader(self.path, _no_writer=True)
        with reader:
            check_appendable(self.path, reader.schema_version, reader.attrs)
            if verify:
                problems = reader.verify()
                if problems:
                    raise RunLogError(format_problems(self.path, problems, "refusing to append to it"))

    def _init_state(self) -> None:
        c = self._cols
        names = enum_reason_names(c["reads/events"].ds)
        assert names is not None   # check_schema: a log of this version has the enum
        self._reason_codes = {n: i for i, n in enumerate(names)}
        self._metric_codes = {bytes(n).decode("ascii"): i for i, n in enumerate(c["metrics/names"].ds[:])}
        self._shape_codes = {tuple(float(x) for x in r): i for i, r in enumerate(c["programs/shapes"].ds[:])}
        last_seq = [int(c[t].ds[c[t].written - 1]["seq"]) for t in ("reads/events", "programs/events", "metrics/rows")
                    if c[t].written]
        self._seq = max(last_seq) + 1 if last_seq else 0
        rows = c["metrics/rows"]
        self._n_metric_records = int(rows.ds[rows.written - 1]["record"]) + 1 if rows.written else 0
        self._last_shapes: PulseShapes | None = None
        self._last_shapes_code = 0

    # ------------------------------------------------------------------ failing
    def _fail(self, action: str, exc: BaseException, remove: bool = False) -> NoReturn:
        """Close the log for good after a failed write, and raise one RunLogError naming file and cause.

        When the space reserve refused (a full disk, a file size limit), libhdf5 never saw a failed
        write: the file is flushed and closed normally within the reserve, so every row flushed before
        stays readable. After a failure inside libhdf5 it may not write again (its retries print
        tracebacks and its exit handler can crash the process): the file is detached, not flushed.
        """
        cause = describe_cause(exc)
        self._broken = f"{action} failed: {cause}"
        f, self._f = self._f, None
        clean = isinstance(exc, NoSpace)
        if f is not None:
            if clean:
                try:
                    f.flush()
                except _WRITE_ERRORS:
                    clean = False
            if clean:
                try:
                    f.close()
                except _WRITE_ERRORS:
                    clean = False
            if not clean:
                detach(f)
        if self._space is not None:
            self._space.trim()
        if remove:
            self.path.unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.release()
        kept = ("rows flushed before stay readable" if clean
                else "libhdf5 was stopped from writing to it again, so its last flush may be torn")
        raise RunLogError(f"run log {self.path}: {action} failed: {cause}; the log is closed ({kept})") from exc

    def _abandon(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # noqa: BLE001 - already failing; the caller's error is the one to see
                detach(self._f)
            self._f = None
        if self._lock is not None:
            self._lock.release()

    # ------------------------------------------------------------------ logging
    def log_reads(self, step: int, t_s: float, addresses: npt.NDArray[np.int64],
                  conductances_us: npt.NDArray[np.float32], reason: str, wall_s: float | None = None) -> None:
        """Log one read call: the devices read (flat addresses), their conductances (uS), at t_s (s)."""
        a = np.asarray(addresses)
        g = np.asarray(conductances_us)
        if a.ndim != 1 or g.shape != a.shape:
            raise RunLogError(f"a read needs 1-D addresses and conductances of one length, got shapes "
                              f"{a.shape} and {g.shape}")
        if g.size and g.dtype.kind not in "fiu":
            raise RunLogError(f"conductances must be numbers (uS), got dtype {g.dtype}")
        if a.size and not (np.issubdtype(a.dtype, np.integer) and 0 <= int(a.min()) and int(a.max()) <= U32_MAX):
            raise RunLogError(f"read addresses must be integers in 0 .. {U32_MAX}")
        self._log_reads(step, t_s, a, g, reason, wall_s)

    def _log_reads(self, step: int, t_s: float, a: npt.NDArray[np.integer], g: npt.NDArray[np.floating],
                   reason: str, wall_s: float | None) -> None:
        """log_reads without the address checks (for callers whose addresses were checked already)."""
        self._check_open()
        code = self._reason_codes.get(reason)
        if code is None:
            raise RunLogError(f"read reason {reason!r} is not one of the reasons of run log {self.path} "
                              f"({', '.join(self._reason_codes)}); the reasons are an HDF5 enum fixed when "
                              f"the log is made: declare others with RunLogWriter(..., reasons=[...])")
        try:
            c = self._cols
            dev = c["reads/address"]
            start = dev.total
            dev.append(a)
            c["reads/conductance_us"].append(g)
            c["reads/events"].append_row((self._seq, step, t_s, time.time() if wall_s is None else wall_s, code,
                                          start, a.shape[0]))
            self._seq += 1
            if time.monotonic() >= self._next_flush:
                self._flush()
        except _WRITE_ERRORS as e:
            self._fail("writing a read", e)

    def log_program(self, step: int, program: PulseProgram, t_s: float | None = None,
                    wall_s: float | None = None) -> None:
        """Log one pulse program (call it before the program is sent); t_s on the driver clock (s), None: unknown."""
        p = program
        if not isinstance(p, PulseProgram):
            raise RunLogError(f"log_program needs a PulseProgram, got {type(p).__name__}")
        if p.n_devices and (int(p.addresses.min()) < 0 or int(p.addresses.max()) > U32_MAX):
            raise RunLogError(f"program {p.program_id}: addresses must be in 0 .. {U32_MAX}")
        self._log_program(step, p, t_s, wall_s)

    def _log_program(self, step: int, p: PulseProgram, t_s: float | None, wall_s: float | None) -> None:
        """log_program without the address checks (for callers whose addresses were checked already)."""
        self._check_open()
        if p.most_set_pulses > U16_MAX:
            raise RunLogError(f"program {p.program_id}: a SET count above {U16_MAX} cannot be logged")
        try:
            if p.shapes is self._last_shapes:
                code = self._last_shapes_code
            else:
                code = self._shapes_code(p.shapes)
            c = self._cols
            dev = c["programs/address"]
            start = dev.total
            dev.append(p.addresses)
            c["programs/set_count"].append(p.set_counts)
            c["programs/reset"].append(p.reset)
            c["programs/events"].append_row((self._seq, p.program_id, step, np.nan if t_s is None else t_s,
                                            time.time() if wall_s is None else wall_s, code, start, p.n_devices))
            self._seq += 1
            if time.monotonic() >= self._next_flush:
                self._flush()
        except _WRITE_ERRORS as e:
            self._fail(f"writing program {p.program_id}", e)

    def log_metrics(self, step: int, **values: float) -> None:
        """Log one evaluation's metrics (e.g. epoch=1, test_accuracy=0.97) at step."""
        self._check_open()
        if not values:
            raise RunLogError("log_metrics needs at least one value")
        wall = time.time()
        checked = []
        for name, value in values.items():
            encode_name("metric name", name)
            try:
                checked.append((name, float(value)))
            except (TypeError, ValueError) as e:
                raise RunLogError(f"metric {name!r} must be a number, got {value!r}") from e
        try:
            rows = []
            for name, v in checked:
                code = self._metric_codes.get(name)
                if code is None:
                    code = self._add_name(self._metric_codes, "metrics/names", "metric name", name)
                rows.append((self._n_metric_records, self._seq, step, wall, code, v))
            col = self._cols["metrics/rows"]
            for r in rows:
                col.append_row(r)
            self._n_metric_records += 1
            self._seq += 1
            if time.monotonic() >= self._next_flush:
                self._flush()
        except _WRITE_ERRORS as e:
            self._fail("writing metrics", e)

    def write_array(self, name: str, data: np.ndarray, **attrs: str) -> None:
        """Store a whole (small) array under /arrays/name, e.g. "mapping/fc1_gplus", with its CRC-32 and any
        string attrs (e.g. columns="layer, row, ...", units="uS").

        Writing the same name again with equal contents does nothing (a resumed run may repeat its
        set-up); different contents raise RunLogError, nothing is overwritten.
        """
        self._check_open()
        if not isinstance(name, str) or not _ARRAY_NAME.match(name) or ".." in name.split("/"):
            raise RunLogError(f"array name {name!r} must be path parts of letters, digits, '_', '-', '.' "
                              f"joined by '/'")
        data = np.ascontiguousarray(data)
        if data.dtype.kind not in "biuf":
            raise RunLogError(f"array {name!r} must be numeric or boolean, got dtype {data.dtype}")
        full = f"{ARRAYS}/{name}"
        try:
            if full in self._f:
                old = self._f[full]
                if not isinstance(old, h5py.Dataset) or old.shape != data.shape or not np.array_equal(old[()], data):
                    raise RunLogError(f"array {name!r} is already in {self.path} with other contents; "
                                      f"nothing overwritten")
                return
            self._space.need(data.nbytes + 4096)
            ds = self._f.create_dataset(full, data=data)
            ds.attrs[ARRAY_CRC_ATTR] = np.uint32(crc(data))
            for k, v in attrs.items():
                ds.attrs[k] = str(v)
            self._f.flush()
            self._space.flushed()
        except _WRITE_ERRORS as e:
            self._fail(f"writing array {name!r}", e)

    def set_attrs(self, **attrs: str | int | float | bool) -> None:
        """Set root attributes (config TOML, safety limits JSON, instrument identity, versions...)."""
        self._check_open()
        checked = {k: check_attr(k, v) for k, v in attrs.items()}
        try:
            self._space.need(sum(len(k) + (len(v.encode()) if isinstance(v, str) else 8) + 256
                                 for k, v in checked.items()))
            for k, v in checked.items():
                self._f.attrs[k] = v
            self._f.flush()
            self._space.flushed()
        except _WRITE_ERRORS as e:
            self._fail("writing attributes", e)

    def flush(self) -> None:
        """Write every buffered row with its checksums and make it visible to readers (and kept by a kill -9)."""
        self._check_open()
        try:
            self._flush()
        except _WRITE_ERRORS as e:
            self._fail("flushing", e)

    def _flush(self) -> None:
        cols = self._cols
        for col in cols.values():
            col.flush()
        self._f.flush()
        self._space.flushed()
        # Checksums only after their rows are in the file: a kill in between leaves a torn tail, not a
        # checksum whose rows are missing.
        blocks = [(code, *b) for code, col in enumerate(cols.values()) if (b := col.take_block()) is not None]
        if blocks:
            for b in blocks:
                self._sums.append_row(b)
            self._sums.flush()
            self._f.flush()
            self._space.flushed()
        self._next_flush = time.monotonic() + self.flush_interval_s

    def _add_name(self, codes: dict[str, int], table: str, kind: str, name: str) -> int:
        b = encode_name(kind, name)
        col = self._cols[table]
        code = col.total
        if code > U16_MAX:
            raise RunLogError(f"too many distinct {kind}s (at most {U16_MAX + 1})")
        col.append_row(b)
        codes[name] = code
        return code

    def _shapes_code(self, shapes: PulseShapes) -> int:
        key = (float(shapes.set.amplitude_ua), float(shapes.set.width_ns),
               float(shapes.reset.amplitude_ua), float(shapes.reset.width_ns))
        code = self._shape_codes.get(key)
        if code is None:
            col = self._cols["programs/shapes"]
            code = col.total
            col.append_row(key)
            self._shape_codes[key] = code
        self._last_shapes = shapes
        self._last_shapes_code = code
        return code

    # ------------------------------------------------------------------ state
    @property
    def attrs(self) -> dict[str, Any]:
        """The root attributes as the file holds them now (Python str / int / float / bool)."""
        self._check_open()
        return {k: attr_value(v) for k, v in self._f.attrs.items()}

    @property
    def counts(self) -> dict[str, int]:
        """Rows logged so far, buffered included (and rows the file had when append reopened it)."""
        c = self._cols
        return {"read_events": c["reads/events"].total, "reads": c["reads/address"].total,
                "programs": c["programs/events"].total, "program_devices": c["programs/address"].total,
                "metrics": self._n_metric_records}

    @property
    def closed(self) -> bool:
        """True once closed, or after a failed write closed the log."""
        return self._f is None

    @property
    def failure(self) -> str | None:
        """What closed the log after a failed write (e.g. "flushing failed: no space left on device"), else None."""
        return self._broken

    def _check_open(self) -> None:
        if self._f is None:
            if self._broken:
                raise RunLogError(f"run log {self.path} was closed when {self._broken}; nothing more is logged")
            raise RunLogError(f"run log {self.path} is closed")

    def close(self) -> None:
        """Flush and close; the file is then complete and readable by any HDF5 reader.

        Does nothing on a log already closed, also by a failed write (that failure was raised then).
        """
        if self._f is None:
            return
        try:
            self._flush()
            f = self._f
            self._f = None
            try:
                f.close()
            except _WRITE_ERRORS:
                self._f = f
                raise
        except _WRITE_ERRORS as e:
            self._fail("closing", e)
        except BaseException:
            self._abandon()
            raise
        if self._space is not None:
            self._space.trim()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> RunLogWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
