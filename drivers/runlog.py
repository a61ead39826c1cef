"""The run log: one HDF5 file per run holding every read, every program, the metrics and the mapping.

One writer (RunLogWriter) appends rows from numpy buffers in whole chunks and flushes every few
seconds; the file is in SWMR mode, so RunLogReader, plain h5py (``swmr=True``) and h5dump can
read it while the run writes. The schema is documented in docs/run-log.md; bump SCHEMA_VERSION
with any change a reader of the old version would misread.

What survives a kill -9 of the writer: every row flushed before the kill (``flush()``, the
periodic flush, ``close()``); rows still in the buffers are lost. The file then still opens in
RunLogReader and in h5py with ``swmr=True``; ``RunLogWriter(path, append=True)`` reopens it and
clears the "open for writing" mark the dead writer left, after which h5dump reads it too.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import fcntl
import os
import re
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from .program import PulseProgram, PulseShape, PulseShapes

SCHEMA_NAME = "pcm-hil-runlog"
#: Version of the file layout (root attribute ``schema_version``).
SCHEMA_VERSION = 1

#: Oldest and newest HDF5 file-format features the log may use: v110 is the first with SWMR and is
#: what HDF5 1.10 readers (Debian's h5dump, older h5py) understand.
LIBVER = ("v110", "v110")

NAME_BYTES = 63                      # longest reason / metric name, ASCII characters
DEVICE_CHUNK = 1 << 16               # rows per chunk of the per-device columns
EVENT_CHUNK = 1 << 12                # rows per chunk of the event tables
SMALL_CHUNK = 256                    # rows per chunk of the name and shape tables
U32_MAX = 2**32 - 1
U16_MAX = 2**16 - 1
RESERVED_ATTRS = ("schema", "schema_version", "created_utc")

READ_EVENT = np.dtype([("seq", "<u8"), ("step", "<i8"), ("t_s", "<f8"), ("wall_s", "<f8"), ("reason", "<u2"),
                       ("start", "<u8"), ("count", "<u8")])
PROGRAM_EVENT = np.dtype([("seq", "<u8"), ("program_id", "<i8"), ("step", "<i8"), ("t_s", "<f8"),
                          ("wall_s", "<f8"), ("shapes", "<u4"), ("start", "<u8"), ("count", "<u8")])
SHAPES_ROW = np.dtype([("set_amplitude_ua", "<f8"), ("set_width_ns", "<f8"), ("reset_amplitude_ua", "<f8"),
                       ("reset_width_ns", "<f8")])
METRIC_ROW = np.dtype([("record", "<u8"), ("seq", "<u8"), ("step", "<i8"), ("wall_s", "<f8"), ("name", "<u2"),
                       ("value", "<f8")])
NAME = np.dtype(f"S{NAME_BYTES + 1}")  # stored NUL-terminated, so h5dump prints them as plain strings

#: path -> (dtype, rows per chunk) of every dataset a run log has from its creation.
DATASETS: dict[str, tuple[np.dtype, int]] = {
    "reads/events": (READ_EVENT, EVENT_CHUNK),
    "reads/address": (np.dtype("<u4"), DEVICE_CHUNK),
    "reads/conductance_us": (np.dtype("<f4"), DEVICE_CHUNK),
    "reads/reason_names": (NAME, SMALL_CHUNK),
    "programs/events": (PROGRAM_EVENT, EVENT_CHUNK),
    "programs/address": (np.dtype("<u4"), DEVICE_CHUNK),
    "programs/set_count": (np.dtype("<u2"), DEVICE_CHUNK),
    "programs/reset": (np.dtype("u1"), DEVICE_CHUNK),
    "programs/shapes": (SHAPES_ROW, SMALL_CHUNK),
    "metrics/rows": (METRIC_ROW, SMALL_CHUNK),
    "metrics/names": (NAME, SMALL_CHUNK),
}
ARRAYS = "arrays"


class RunLogError(Exception):
    """A run log cannot be made, opened or written; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------- buffering
class _Column:
    """One resizable 1-D dataset fed from a numpy buffer that holds the dataset's last, partial chunk.

    Rows reach HDF5 as whole aligned chunks when the buffer fills; flush() also writes the partial
    chunk (and rewrites it, larger, at the next flush), so the file only ever grows by appends.
    """

    def __init__(self, ds: h5py.Dataset) -> None:
        self.ds = ds
        self.chunk = int(ds.chunks[0])
        self.buf = np.empty(self.chunk, ds.dtype)
        n = int(ds.shape[0])
        self.base = n - n % self.chunk          # file row of buf[0]
        self.fill = n % self.chunk
        if self.fill:
            self.buf[:self.fill] = ds[self.base:n]
        self.written = n                        # rows the file holds

    @property
    def total(self) -> int:
        return self.base + self.fill

    def append_row(self, row: tuple) -> None:
        self.buf[self.fill] = row
        self.fill += 1
        if self.fill == self.chunk:
            self._write_buffer()

    def append(self, values: npt.ArrayLike) -> None:
        values = np.asarray(values)
        k = values.shape[0]
        room = self.chunk - self.fill
        if k < room:
            self.buf[self.fill:self.fill + k] = values
            self.fill += k
            return
        self.buf[self.fill:] = values[:room]
        self.fill = self.chunk
        self._write_buffer()
        whole = (k - room) // self.chunk * self.chunk
        if whole:
            # Whole chunks go to the file straight from the caller's array, no copy through the buffer.
            self._write(self.base, self.base + whole, values[room:room + whole].astype(self.ds.dtype, copy=False))
            self.base += whole
            self.written = self.base
        rest = k - room - whole
        self.buf[:rest] = values[room + whole:]
        self.fill = rest

    def flush(self) -> None:
        if self.total > self.written:
            self._write(self.base, self.total, self.buf[:self.fill])
            self.written = self.total

    def _write_buffer(self) -> None:
        end = self.base + self.chunk
        self._write(self.base, end, self.buf)
        self.base = end
        self.fill = 0
        self.written = end

    def _write(self, start: int, stop: int, rows: np.ndarray) -> None:
        try:
            if self.ds.shape[0] != stop:
                self.ds.resize((stop,))
            self.ds[start:stop] = rows
        except (OSError, RuntimeError) as e:
            raise RunLogError(f"writing {self.ds.name} of run log {self.ds.file.filename} failed "
                              f"(disk full? file removed?): {e}") from e


# ---------------------------------------------------------------------------------------- file helpers
def _describe_open_error(path: Path, exc: Exception) -> str:
    msg = str(exc)
    if "truncated file" in msg:
        return f"run log {path} is truncated (shorter than its own header says): {msg}"
    if "file signature not found" in msg:
        return f"{path} is not an HDF5 file (no HDF5 signature), so not a run log"
    if "already open for write" in msg:
        return (f"run log {path} is marked as open for writing by a writer that is still running or died "
                f"without SWMR; reopen it with RunLogWriter(..., append=True) or run `h5clear -s {path}`")
    return f"cannot open run log {path}: {msg}"


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _superblock(path: Path) -> tuple[int, int, int] | None:
    """(version, status flags, stored end-of-file address) of a v2/v3 superblock at offset 0, else None."""
    with open(path, "rb") as fh:
        head = fh.read(48)
    if head[:8] != HDF5_SIGNATURE or len(head) < 12 or head[8] < 2:
        return None
    size_o = head[9]
    at = 12 + 2 * size_o        # after base address and superblock-extension address
    if len(head) < at + size_o:
        return None
    return head[8], head[11], int.from_bytes(head[at:at + size_o], "little")


def _check_not_truncated(path: Path) -> None:
    """Refuse a log shorter than its superblock says. A SWMR open does not check this itself, and
    would then retry unreadable metadata for a long time. Applied to live logs too: in 160,000
    samples of a writer flushing every 10 ms the file was never shorter than its superblock said."""
    sb = _superblock(path)
    if sb is not None:
        size = path.stat().st_size
        if size < sb[2]:
            raise RunLogError(f"run log {path} is truncated: {size} bytes, its header says {sb[2]}")


def _open_h5(path: Path, mode: str, **kwargs: Any) -> h5py.File:
    try:
        return h5py.File(path, mode, **kwargs)
    except FileNotFoundError as e:
        raise RunLogError(f"no run log at {path}") from e
    except (OSError, ValueError, RuntimeError) as e:
        raise RunLogError(_describe_open_error(path, e)) from e


def check_schema(f: h5py.File, path: Path) -> None:
    """Raise RunLogError unless f is a run log of this SCHEMA_VERSION with every dataset in place."""
    try:
        schema = f.attrs.get("schema")
        version = f.attrs.get("schema_version")
    except (OSError, RuntimeError, KeyError) as e:
        raise RunLogError(f"run log {path} is corrupt: its root attributes cannot be read ({e})") from e
    if isinstance(schema, bytes):
        schema = schema.decode("utf-8", "replace")
    if schema != SCHEMA_NAME:
        what = "no 'schema' attribute" if schema is None else f"schema {schema!r}"
        raise RunLogError(f"{path} is not a pcm-hil run log ({what}, expected {SCHEMA_NAME!r})")
    if not isinstance(version, (int, np.integer)) or int(version) != SCHEMA_VERSION:
        raise RunLogError(f"run log {path} has schema version {version}, this code reads version {SCHEMA_VERSION}")
    for name, (dtype, _) in DATASETS.items():
        try:
            ds = f[name]
            ok = isinstance(ds, h5py.Dataset) and ds.dtype == dtype and ds.ndim == 1
        except (KeyError, OSError, RuntimeError, ValueError) as e:
            raise RunLogError(f"run log {path} is corrupt or incomplete: dataset /{name} cannot be opened ({e})") from e
        if not ok:
            raise RunLogError(f"run log {path} is corrupt: /{name} is not a 1-D dataset of {dtype}")


def _hdf5_library() -> ctypes.CDLL | None:
    """The libhdf5 this process already loaded through h5py (found in /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                p = line.split()[-1] if line.strip() else ""
                base = os.path.basename(p)
                if base.startswith("libhdf5") and not base.startswith("libhdf5_") and ".so" in base:
                    return ctypes.CDLL(p)
    except OSError:
        return None
    return None


def _clear_writer_marks(path: Path) -> None:
    """Clear the superblock's "open for writing" flags a killed writer left (what `h5clear -s` does).

    Uses the HDF5 library h5py loaded: the file-access property "clear_status_flags" that h5clear sets.
    Call only while holding the writer lock, i.e. when no writer can be alive.
    """
    lib = _hdf5_library()
    if lib is None:
        raise RunLogError(f"run log {path} was left open by a writer that died; run `h5clear -s {path}` and retry")
    lib.H5Pset.argtypes = [ctypes.c_int64, ctypes.c_char_p, ctypes.c_void_p]
    lib.H5Pset.restype = ctypes.c_int
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_V110, h5py.h5f.LIBVER_V110)
    flag = (ctypes.c_uint8 * 4)(1, 1, 1, 1)  # true whether hbool_t is 1 byte or 4, on any byte order
    if lib.H5Pset(fapl.id, b"clear_status_flags", ctypes.byref(flag)) < 0:
        raise RunLogError(f"run log {path} was left open by a writer that died; run `h5clear -s {path}` and retry")
    try:
        h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR, fapl=fapl).close()
    except (OSError, RuntimeError) as e:
        raise RunLogError(_describe_open_error(path, e)) from e


class _WriterLock:
    """An exclusive open-file-description lock on a byte far past the data: one writer per log.

    OFD locks (not flock) so readers' shared flock on the same file never conflicts, and the kernel
    drops it when the writer dies, which is how a reopening writer knows the last one is gone.
    """

    OFFSET = 1 << 62

    def __init__(self, path: Path) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise RunLogError(f"cannot open run log {path} for writing: {e.strerror}") from e
        if not hasattr(fcntl, "F_OFD_SETLK"):  # not Linux: no liveness check, HDF5's flags still guard
            return
        lk = struct.pack("hh4xqqi4x", fcntl.F_WRLCK, os.SEEK_SET, self.OFFSET, 1, 0)
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, lk)
        except OSError as e:
            os.close(self.fd)
            raise RunLogError(f"run log {path} is open in another writer (still running); one writer per log") from e

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _check_attr(key: str, value: Any) -> Any:
    if not isinstance(key, str) or not key or "/" in key:
        raise RunLogError(f"attribute name {key!r} must be a non-empty string without '/'")
    if key in RESERVED_ATTRS:
        raise RunLogError(f"attribute {key!r} is set by the run log itself")
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, np.integer)):
        return np.int64(value)
    if isinstance(value, (float, np.floating)):
        return np.float64(value)
    if isinstance(value, str):
        return value
    raise RunLogError(f"attribute {key!r} must be str, int, float or bool, got {type(value).__name__}")


def _encode_name(kind: str, name: str) -> bytes:
    if not isinstance(name, str) or not name:
        raise RunLogError(f"{kind} must be a non-empty string, got {name!r}")
    if len(name) > NAME_BYTES or not (name.isascii() and name.isprintable()):
        raise RunLogError(f"{kind} {name!r} must be at most {NAME_BYTES} printable ASCII characters")
    return name.encode("ascii")


def _create_name_table(f: h5py.File, name: str, chunk: int) -> None:
    """A resizable table of NUL-terminated ASCII strings (h5py alone would make them NUL-padded,
    which h5dump prints with every padding byte)."""
    t = h5py.h5t.C_S1.copy()
    t.set_size(NAME.itemsize)
    t.set_strpad(h5py.h5t.STR_NULLTERM)
    t.set_cset(h5py.h5t.CSET_ASCII)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((chunk,))
    space = h5py.h5s.create_simple((0,), (h5py.h5s.UNLIMITED,))
    group = f.require_group(name.rsplit("/", 1)[0])
    h5py.h5d.create(group.id, name.rsplit("/", 1)[1].encode(), t, space, dcpl=dcpl).close()


_ARRAY_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


# ---------------------------------------------------------------------------------------- writer
class RunLogWriter:
    """The single writer of a run log (see the module docstring for what a crash keeps).

    Conductances in microsiemens, times in seconds: t_s on the driver's clock, wall_s Unix time.
    """

    def __init__(self, path: str | Path, *, attrs: Mapping[str, str | int | float | bool] = {},
                 flush_interval_s: float = 2.0, append: bool = False) -> None:
        """Create a new log at path (refusing an existing path), or with append=True reopen one."""
        self.path = Path(path)
        if not flush_interval_s > 0:
            raise RunLogError(f"flush_interval_s must be positive, got {flush_interval_s}")
        self.flush_interval_s = float(flush_interval_s)
        checked = {k: _check_attr(k, v) for k, v in attrs.items()}
        self._lock: _WriterLock | None = None
        self._f: h5py.File | None = None
        if append:
            self._f = self._reopen()
        else:
            self._f = self._create()
        try:
            for k, v in checked.items():
                self._f.attrs[k] = v
            self._cols = {name: _Column(self._f[name]) for name in DATASETS}
            self._init_state()
            self._f.flush()
            # Readers may follow from here on; every dataset exists already (SWMR cannot add them safely).
            self._f.swmr_mode = True
        except BaseException:
            self._abandon()
            raise
        self._next_flush = time.monotonic() + self.flush_interval_s

    # ------------------------------------------------------------------ opening
    def _create(self) -> h5py.File:
        if self.path.exists():
            raise RunLogError(f"run log {self.path} already exists; refusing to overwrite it "
                              f"(append=True continues it)")
        if not self.path.parent.is_dir():
            raise RunLogError(f"cannot create run log {self.path}: folder {self.path.parent} does not exist")
        try:
            f = h5py.File(self.path, "x", libver=LIBVER)
        except FileExistsError as e:
            raise RunLogError(f"run log {self.path} already exists; refusing to overwrite it") from e
        except OSError as e:
            raise RunLogError(f"cannot create run log {self.path}: {e}") from e
        try:
            self._lock = _WriterLock(self.path)
            f.attrs["schema"] = SCHEMA_NAME
            f.attrs["schema_version"] = np.int64(SCHEMA_VERSION)
            f.attrs["created_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            for name, (dtype, chunk) in DATASETS.items():
                if dtype == NAME:
                    _create_name_table(f, name, chunk)
                else:
                    f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,))
            f.create_group(ARRAYS)
        except BaseException:
            f.close()
            self.path.unlink(missing_ok=True)  # our own half-made file, nothing of anyone else's
            if self._lock:
                self._lock.release()
            raise
        return f

    def _reopen(self) -> h5py.File:
        if not self.path.is_file():
            raise RunLogError(f"no run log at {self.path} to append to")
        self._lock = _WriterLock(self.path)
        try:
            try:
                f = h5py.File(self.path, "r+", libver=LIBVER)
            except OSError as e:
                if "already open for write" not in str(e):
                    raise RunLogError(_describe_open_error(self.path, e)) from e
                # We hold the writer lock, so the writer that left the mark is dead.
                _clear_writer_marks(self.path)
                f = _open_h5(self.path, "r+", libver=LIBVER)
            try:
                check_schema(f, self.path)
                self._trim_torn_tail(f)
            except BaseException:
                f.close()
                raise
            return f
        except BaseException:
            self._lock.release()
            raise

    @staticmethod
    def _trim_torn_tail(f: h5py.File) -> None:
        """Drop rows a crash left half-flushed: events whose devices or names did not reach the file."""
        for group, names_ds, cols in (("reads", "reads/reason_names", ("address", "conductance_us")),
                                      ("programs", "programs/shapes", ("address", "set_count", "reset"))):
            ev = f[f"{group}/events"]
            n_dev = min(f[f"{group}/{c}"].shape[0] for c in cols)
            n_names = f[names_ds].shape[0]
            table = ev[:]
            code = table["reason"] if group == "reads" else table["shapes"]
            ok = (table["start"] + table["count"] <= n_dev) & (code < n_names)
            n_ev = int(np.argmin(ok)) if not ok.all() else len(table)
            end = int(table["start"][n_ev - 1] + table["count"][n_ev - 1]) if n_ev else 0
            ev.resize((n_ev,))
            for c in cols:
                f[f"{group}/{c}"].resize((end,))
        rows = f["metrics/rows"]
        m = rows[:]
        bad = np.flatnonzero(m["name"] >= f["metrics/names"].shape[0])
        if bad.size:
            # A record is whole or absent: cut back to the start of the record the first bad row is in.
            rows.resize((int(np.searchsorted(m["record"], m["record"][bad[0]], side="left")),))

    def _init_state(self) -> None:
        c = self._cols
        self._reason_codes = {bytes(n).decode("ascii"): i for i, n in enumerate(c["reads/reason_names"].ds[:])}
        self._metric_codes = {bytes(n).decode("ascii"): i for i, n in enumerate(c["metrics/names"].ds[:])}
        self._shape_codes = {tuple(float(x) for x in r): i for i, r in enumerate(c["programs/shapes"].ds[:])}
        last_seq = [int(c[t].ds[c[t].written - 1]["seq"]) for t in ("reads/events", "programs/events", "metrics/rows")
                    if c[t].written]
        self._seq = max(last_seq) + 1 if last_seq else 0
        rows = c["metrics/rows"]
        self._n_metric_records = int(rows.ds[rows.written - 1]["record"]) + 1 if rows.written else 0
        self._last_shapes: PulseShapes | None = None
        self._last_shapes_code = 0

    def _abandon(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:
                pass
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
            code = self._add_name(self._reason_codes, "reads/reason_names", "read reason", reason)
        c = self._cols
        dev = c["reads/address"]
        start = dev.total
        dev.append(a)
        c["reads/conductance_us"].append(g)
        c["reads/events"].append_row((self._seq, step, t_s, time.time() if wall_s is None else wall_s, code,
                                      start, a.shape[0]))
        self._seq += 1
        self._maybe_flush()

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
        self._maybe_flush()

    def log_metrics(self, step: int, **values: float) -> None:
        """Log one evaluation's metrics (e.g. epoch=1, test_accuracy=0.97) at step."""
        self._check_open()
        if not values:
            raise RunLogError("log_metrics needs at least one value")
        rows = []
        wall = time.time()
        for name, value in values.items():
            code = self._metric_codes.get(name)
            if code is None:
                code = self._add_name(self._metric_codes, "metrics/names", "metric name", name)
            try:
                v = float(value)
            except (TypeError, ValueError) as e:
                raise RunLogError(f"metric {name!r} must be a number, got {value!r}") from e
            rows.append((self._n_metric_records, self._seq, step, wall, code, v))
        col = self._cols["metrics/rows"]
        for r in rows:
            col.append_row(r)
        self._n_metric_records += 1
        self._seq += 1
        self._maybe_flush()

    def write_array(self, name: str, data: np.ndarray) -> None:
        """Store a whole (small) array under /arrays/name, e.g. "mapping/fc1_gplus".

        Writing the same name again with equal contents does nothing (a resumed run may repeat its
        set-up); different contents raise RunLogError, nothing is overwritten.
        """
        self._check_open()
        if not isinstance(name, str) or not _ARRAY_NAME.match(name) or ".." in name.split("/"):
            raise RunLogError(f"array name {name!r} must be path parts of letters, digits, '_', '-', '.' "
                              f"joined by '/'")
        data = np.asarray(data)
        if data.dtype.kind not in "biuf":
            raise RunLogError(f"array {name!r} must be numeric or boolean, got dtype {data.dtype}")
        full = f"{ARRAYS}/{name}"
        if full in self._f:
            old = self._f[full]
            if not isinstance(old, h5py.Dataset) or old.shape != data.shape or not np.array_equal(old[()], data):
                raise RunLogError(f"array {name!r} is already in {self.path} with other contents; "
                                  f"nothing overwritten")
            return
        self._f.create_dataset(full, data=data)
        self._f.flush()

    def set_attrs(self, **attrs: str | int | float | bool) -> None:
        """Set root attributes (config TOML, safety limits JSON, instrument identity, versions...)."""
        self._check_open()
        checked = {k: _check_attr(k, v) for k, v in attrs.items()}
        for k, v in checked.items():
            self._f.attrs[k] = v
        self._f.flush()

    def flush(self) -> None:
        """Write every buffered row and make it visible to readers (and durable against a kill -9)."""
        self._check_open()
        try:
            # Devices and names first, events last: a reader that sees an event finds what it points to.
            for col in self._cols.values():
                col.flush()
            self._f.flush()
        except (OSError, RuntimeError) as e:
            raise RunLogError(f"writing run log {self.path} failed (disk full? file removed?): {e}") from e
        self._next_flush = time.monotonic() + self.flush_interval_s

    def _maybe_flush(self) -> None:
        if time.monotonic() >= self._next_flush:
            self.flush()

    def _add_name(self, codes: dict[str, int], table: str, kind: str, name: str) -> int:
        b = _encode_name(kind, name)
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
        return {k: _attr_value(v) for k, v in self._f.attrs.items()}

    @property
    def counts(self) -> dict[str, int]:
        """Rows logged so far, buffered included (and rows the file had when append reopened it)."""
        c = self._cols
        return {"read_events": c["reads/events"].total, "reads": c["reads/address"].total,
                "programs": c["programs/events"].total, "program_devices": c["programs/address"].total,
                "metrics": self._n_metric_records}

    @property
    def closed(self) -> bool:
        return self._f is None

    def _check_open(self) -> None:
        if self._f is None:
            raise RunLogError(f"run log {self.path} is closed")

    def close(self) -> None:
        """Flush and close; the file is then complete and readable by any HDF5 reader."""
        if self._f is None:
            return
        try:
            self.flush()
        finally:
            self._abandon()

    def __enter__(self) -> RunLogWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ---------------------------------------------------------------------------------------- reader
def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


class RunLogReader:
    """Reads a run log with plain h5py in SWMR mode, so it works while a writer is running.

    It sees the rows flushed when it opened; refresh() brings in the rows flushed since.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f: h5py.File | None = None
        self._open()

    def _open(self) -> None:
        if not self.path.is_file():
            raise RunLogError(f"no run log at {self.path}")
        _check_not_truncated(self.path)
        try:
            f = h5py.File(self.path, "r", swmr=True)
        except (OSError, ValueError, RuntimeError) as e:
            if "superblock version" not in str(e) and "SWMR" not in str(e):
                raise RunLogError(_describe_open_error(self.path, e)) from e
            # Not a SWMR-capable file: surely not a run log, but let the schema check say so.
            f = _open_h5(self.path, "r")
        try:
            check_schema(f, self.path)
            self.attrs: dict[str, Any] = {k: _attr_value(v) for k, v in f.attrs.items()}
            self._ds = {name: f[name] for name in DATASETS}
        except BaseException:
            f.close()
            raise
        self._f = f
        self._read_names()

    # ------------------------------------------------------------------ following a live log
    def refresh(self) -> None:
        """See what was flushed since this reader opened or last refreshed: rows, attributes, arrays.

        Reopens the file (a few milliseconds), because SWMR refreshes datasets but not the root
        group's attributes or new arrays.
        """
        if self._f is not None:
            self._f.close()
            self._f = None
        self._open()

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except RunLogError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise RunLogError(f"run log {self.path} is corrupt or truncated: {e}") from e

    def _read_names(self) -> None:
        def names(ds: h5py.Dataset) -> list[str]:
            return [bytes(b).decode("utf-8", "replace") for b in ds[:]]
        self._reason_names = self._guard(names, self._ds["reads/reason_names"])
        self._metric_names = self._guard(names, self._ds["metrics/names"])

    def _complete_events(self, group: str, cols: tuple[str, ...], code_field: str, n_codes: int
                         ) -> npt.NDArray[np.void]:
        """The events whose devices (and names) a possibly-live writer has fully flushed."""
        ev = self._ds[f"{group}/events"][:]
        n_dev = min(self._ds[f"{group}/{c}"].shape[0] for c in cols)
        ok = (ev["start"] + ev["count"] <= n_dev) & (ev[code_field] < n_codes)
        return ev if ok.all() else ev[:int(np.argmin(ok))]

    def _read_table(self) -> npt.NDArray[np.void]:
        return self._guard(self._complete_events, "reads", ("address", "conductance_us"), "reason",
                           len(self._reason_names))

    def _program_table(self) -> npt.NDArray[np.void]:
        shapes_n = self._ds["programs/shapes"].shape[0]
        return self._guard(self._complete_events, "programs", ("address", "set_count", "reset"), "shapes", shapes_n)

    # ------------------------------------------------------------------ the data
    def read_events(self) -> dict[str, np.ndarray]:
        """Per read call: seq, step, t_s (s, driver clock), wall_s (Unix s), reason (str), reason_code, start, count."""
        ev = self._read_table()
        out = {k: ev[k].copy() for k in ("seq", "step", "t_s", "wall_s", "start", "count")}
        out["reason_code"] = ev["reason"].astype(np.int64)
        out["reason"] = np.array(self._reason_names, dtype=str)[ev["reason"]] if len(ev) else np.array([], str)
        return out

    def reads(self) -> dict[str, np.ndarray]:
        """Per device read, flat: step, t_s (s), wall_s, address, conductance_us (uS), reason (str)."""
        ev = self._read_table()
        end = int(ev["start"][-1] + ev["count"][-1]) if len(ev) else 0
        addr = self._guard(lambda: self._ds["reads/address"][:end])
        g = self._guard(lambda: self._ds["reads/conductance_us"][:end])
        counts = ev["count"].astype(np.int64)
        names = np.array(self._reason_names, dtype=str) if self._reason_names else np.array([], str)
        return {"step": np.repeat(ev["step"], counts), "t_s": np.repeat(ev["t_s"], counts),
                "wall_s": np.repeat(ev["wall_s"], counts), "address": addr.astype(np.int64),
                "conductance_us": g, "reason": np.repeat(names[ev["reason"]] if len(ev) else names, counts)}

    def read_devices(self, start: int, stop: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Flat per-device rows start..stop-1 of the reads: (addresses, conductances in uS)."""
        def rows() -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
            n = min(self._ds["reads/address"].shape[0], self._ds["reads/conductance_us"].shape[0])
            return (self._ds["reads/address"][start:min(stop, n)].astype(np.int64),
                    self._ds["reads/conductance_us"][start:min(stop, n)])
        return self._guard(rows)

    def program_events(self) -> dict[str, np.ndarray]:
        """Per program: seq, program_id, step, t_s (s, NaN: not recorded), wall_s, shapes (code), start, count."""
        ev = self._program_table()
        return {k: ev[k].copy() for k in ev.dtype.names}

    def programs(self) -> list[tuple[int, float, PulseProgram]]:
        """Every logged program as (step, t_s, program), in logged order."""
        ev = self._program_table()
        end = int(ev["start"][-1] + ev["count"][-1]) if len(ev) else 0
        addr = self._guard(lambda: self._ds["programs/address"][:end]).astype(np.int64)
        cnt = self._guard(lambda: self._ds["programs/set_count"][:end]).astype(np.int64)
        rst = self._guard(lambda: self._ds["programs/reset"][:end]).astype(np.bool_)
        shapes = [self.shapes(i) for i in range(self._ds["programs/shapes"].shape[0])]
        out = []
        for e in ev:
            s, n = int(e["start"]), int(e["count"])
            out.append((int(e["step"]), float(e["t_s"]),
                        PulseProgram(int(e["program_id"]), addr[s:s + n], cnt[s:s + n], rst[s:s + n],
                                     shapes[int(e["shapes"])])))
        return out

    def shapes(self, code: int) -> PulseShapes:
        """The pulse shapes logged under code (the programs table's shapes column)."""
        r = self._guard(lambda: self._ds["programs/shapes"][code])
        return PulseShapes(set=PulseShape(amplitude_ua=float(r["set_amplitude_ua"]), width_ns=float(r["set_width_ns"])),
                           reset=PulseShape(amplitude_ua=float(r["reset_amplitude_ua"]),
                                            width_ns=float(r["reset_width_ns"])))

    def metrics(self) -> dict[str, np.ndarray]:
        """One row per log_metrics call: "step", "wall_s" and one column per metric name (NaN where absent)."""
        rows = self._guard(lambda: self._ds["metrics/rows"][:])
        rows = rows[rows["name"] < len(self._metric_names)]
        records, first, idx = np.unique(rows["record"], return_index=True, return_inverse=True)
        out: dict[str, np.ndarray] = {"step": rows["step"][first].copy(), "wall_s": rows["wall_s"][first].copy()}
        for code, name in enumerate(self._metric_names):
            col = np.full(len(records), np.nan)
            sel = rows["name"] == code
            col[idx[sel]] = rows["value"][sel]
            out[name] = col
        return out

    def array(self, name: str) -> np.ndarray:
        """The array stored under /arrays/name."""
        full = f"{ARRAYS}/{name}"
        if full not in self._f:
            raise RunLogError(f"run log {self.path} has no array {name!r}")
        return self._guard(lambda: self._f[full][()])

    def array_names(self) -> list[str]:
        """Names of every array under /arrays."""
        names: list[str] = []
        self._f[ARRAYS].visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        return sorted(names)

    @property
    def counts(self) -> dict[str, int]:
        """Rows a reader sees now, keyed like RunLogWriter.counts."""
        rev = self._read_table()
        pev = self._program_table()
        m = self._guard(lambda: self._ds["metrics/rows"][:])
        return {"read_events": len(rev), "reads": int(rev["count"].sum()), "programs": len(pev),
                "program_devices": int(pev["count"].sum()), "metrics": len(np.unique(m["record"]))}

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> RunLogReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
