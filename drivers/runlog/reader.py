"""RunLogReader: reads a run log with plain h5py in SWMR mode (also while it is written), and checks it.

In a schema-2 log a reader sees only rows a checksum block covers: rows past a dataset's last block
are a torn tail (a writer that died between writing rows and their checksums, or one mid-flush) and
are what RunLogWriter(append=True) drops. verify() recomputes every checksum.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from ..program import PulseProgram, PulseShape, PulseShapes
from .checksums import chain, crc, crcs, load_table
from .files import check_not_truncated, describe_open_error, open_h5, open_swmr_read_once
from .schema import ARRAY_CRC_ATTR, ARRAYS, DATASETS, RunLogError, attr_value, check_schema, enum_reason_names

#: Problems quoted in one RunLogError message; the rest are counted.
QUOTED_PROBLEMS = 5


def format_problems(path: Path, problems: list[str], consequence: str) -> str:
    """One message for a failed integrity check: the file, the first problems (dataset and rows), the count."""
    more = len(problems) - QUOTED_PROBLEMS
    listed = "; ".join(problems[:QUOTED_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")
    return f"run log {path} fails its integrity check, {consequence}: {listed}"


class RunLogReader:
    """Reads a run log with plain h5py in SWMR mode, so it works while a writer is running.

    It sees the rows flushed when it opened; refresh() brings in the rows flushed since.
    """

    def __init__(self, path: str | Path, *, _no_writer: bool = False) -> None:
        """_no_writer: the caller holds the writer lock, so metadata reads need not wait for a writer."""
        self.path = Path(path)
        self._f: h5py.File | None = None
        self._no_writer = _no_writer
        self._open()

    def _open(self) -> None:
        if not self.path.is_file():
            raise RunLogError(f"no run log at {self.path}")
        check_not_truncated(self.path)
        try:
            f = open_swmr_read_once(self.path) if self._no_writer else h5py.File(self.path, "r", swmr=True)
        except RunLogError:
            raise
        except (OSError, ValueError, RuntimeError) as e:
            if "superblock version" not in str(e) and "SWMR" not in str(e):
                raise RunLogError(describe_open_error(self.path, e)) from e
            # Not a SWMR-capable file: surely not a run log, but let the schema check say so.
            f = open_h5(self.path, "r")
        try:
            #: The file's schema version: 1 (no checksums) or 2.
            self.schema_version = check_schema(f, self.path)
            self.attrs: dict[str, Any] = {k: attr_value(v) for k, v in f.attrs.items()}
            self._ds = {name: f[name] for name in DATASETS}
            lengths = {name: int(ds.shape[0]) for name, ds in self._ds.items()}
            if self.has_checksums:
                self._table, names = self._guard(load_table, f)
                covered, self._valid, self._chain_problems = chain(self._table, names, lengths)
                self._n = covered
                self._torn = {n: lengths[n] - covered[n] for n in lengths if lengths[n] > covered[n]}
            else:
                self._n = lengths
                self._torn = {}
        except BaseException:
            f.close()
            raise
        self._f = f
        self._read_names()

    @property
    def has_checksums(self) -> bool:
        """Whether the log carries checksums (schema 2 and later); verify() has nothing to check otherwise."""
        return self.schema_version >= 2

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
        def names(name: str) -> list[str]:
            return [bytes(b).decode("utf-8", "replace") for b in self._ds[name][:self._n[name]]]
        # Schema 3: the enum names the codes (the table repeats it, checksummed); before, only the table does.
        enum = self._guard(enum_reason_names, self._ds["reads/events"]) if self.schema_version >= 3 else None
        self._reason_names = enum if enum is not None else self._guard(names, "reads/reason_names")
        self._metric_names = self._guard(names, "metrics/names")

    # ------------------------------------------------------------------ integrity
    def verify(self) -> list[str]:
        """Recompute the CRC-32 of every checksummed row and array; one line per problem, [] when all match.

        Each problem names the dataset and its rows (e.g. "/programs/set_count rows 0..99: CRC-32 ...").
        Rows past a dataset's last checksum block (a torn tail) are not problems; torn_tail says how
        many there are. A schema-1 log has no checksums: [] (see has_checksums).
        """
        if not self.has_checksums:
            return []
        problems = list(self._chain_problems)
        t = self._table
        for name, rows in self._valid.items():
            if not rows:
                continue
            ranges = list(zip(t["start"][rows].tolist(), t["stop"][rows].tolist(), strict=True))
            got = self._guard(crcs, self._ds[name], DATASETS[name][0], ranges)
            for (start, stop), want, value in zip(ranges, t["crc32"][rows].tolist(), got, strict=True):
                if value != want:
                    problems.append(f"/{name} rows {start}..{stop - 1}: CRC-32 {value:#010x}, "
                                    f"its checksum says {want:#010x} (the rows were changed)")
        for name in self.array_names():
            ds = self._f[f"{ARRAYS}/{name}"]
            want = ds.attrs.get(ARRAY_CRC_ATTR)
            if want is None:
                problems.append(f"/{ARRAYS}/{name}: no {ARRAY_CRC_ATTR} attribute")
            elif crc(self._guard(lambda d=ds: d[()])) != int(want):
                problems.append(f"/{ARRAYS}/{name}: CRC-32 differs from its {ARRAY_CRC_ATTR} attribute "
                                f"(the array was changed)")
        return problems

    @property
    def torn_tail(self) -> dict[str, int]:
        """Rows per dataset past its last checksum block (not served, dropped on append); {} for none."""
        return dict(self._torn)

    @property
    def checksummed_rows(self) -> int:
        """Rows (all datasets together) that checksum blocks cover."""
        return sum(self._n.values()) if self.has_checksums else 0

    # ------------------------------------------------------------------ the data
    def _complete_events(self, group: str, cols: tuple[str, ...], code_field: str, n_codes: int
                         ) -> npt.NDArray[np.void]:
        """The events whose devices (and names) a possibly-live writer has fully flushed."""
        ev = self._ds[f"{group}/events"][:self._n[f"{group}/events"]]
        n_dev = min(self._n[f"{group}/{c}"] for c in cols)
        ok = (ev["start"] + ev["count"] <= n_dev) & (ev[code_field] < n_codes)
        return ev if ok.all() else ev[:int(np.argmin(ok))]

    def _read_table(self) -> npt.NDArray[np.void]:
        return self._guard(self._complete_events, "reads", ("address", "conductance_us"), "reason",
                           len(self._reason_names))

    def _program_table(self) -> npt.NDArray[np.void]:
        return self._guard(self._complete_events, "programs", ("address", "set_count", "reset"), "shapes",
                           self._n["programs/shapes"])

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
            n = min(self._n["reads/address"], self._n["reads/conductance_us"])
            return (self._ds["reads/address"][start:min(stop, n)].astype(np.int64),
                    self._ds["reads/conductance_us"][start:min(stop, n)])
        return self._guard(rows)

    def program_devices(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Flat per-device rows start..stop-1 of the programs (those flushed): address, set_count, reset (bool)."""
        def rows() -> dict[str, np.ndarray]:
            n = min(self._n["programs/address"], self._n["programs/set_count"], self._n["programs/reset"])
            hi = min(stop, n)
            return {"address": self._ds["programs/address"][start:hi].astype(np.int64),
                    "set_count": self._ds["programs/set_count"][start:hi].astype(np.int64),
                    "reset": self._ds["programs/reset"][start:hi].astype(np.bool_)}
        return self._guard(rows)

    def program_events(self) -> dict[str, np.ndarray]:
        """Per program: seq, program_id, step, t_s (s, NaN: not recorded), wall_s, shapes (code), start, count."""
        ev = self._program_table()
        return {k: ev[k].copy() for k in ev.dtype.names}

    def pulses_per_device(self, n_devices: int, exclude: Any = ()) -> npt.NDArray[np.int64]:
        """SET + RESET pulses per device address of every logged program but those whose ids are in exclude
        (e.g. summary.json's unapplied_program_ids): what the chip's own lifetime counters should show."""
        skip = set(exclude)
        pulses = np.zeros(n_devices, np.int64)
        for _step, _t, p in self.programs():
            if p.program_id not in skip:
                np.add.at(pulses, p.addresses, p.set_counts + p.reset)
        return pulses

    def programs(self) -> list[tuple[int, float, PulseProgram]]:
        """Every logged program as (step, t_s, program), in logged order."""
        ev = self._program_table()
        end = int(ev["start"][-1] + ev["count"][-1]) if len(ev) else 0
        addr = self._guard(lambda: self._ds["programs/address"][:end]).astype(np.int64)
        cnt = self._guard(lambda: self._ds["programs/set_count"][:end]).astype(np.int64)
        rst = self._guard(lambda: self._ds["programs/reset"][:end]).astype(np.bool_)
        shapes = [self.shapes(i) for i in range(self._n["programs/shapes"])]
        out = []
        for e in ev:
            s, n = int(e["start"]), int(e["count"])
            out.append((int(e["step"]), float(e["t_s"]),
                        PulseProgram(int(e["program_id"]), addr[s:s + n], cnt[s:s + n], rst[s:s + n],
                                     shapes[int(e["shapes"])])))
        return out

    # ------------------------------------------------------------------ the data, in chunks
    @property
    def reason_names(self) -> list[str]:
        """The read reasons by code (the read events' reason column indexes this list)."""
        return list(self._reason_names)

    @property
    def shape_rows(self) -> int:
        """Rows of /programs/shapes a reader sees (codes 0 .. shape_rows - 1; shapes(code) gives each)."""
        return int(self._n["programs/shapes"])

    def _event_chunks(self, group: str, cols: tuple[str, ...], code_field: str, n_codes: int,
                      chunk_rows: int) -> Iterator[npt.NDArray[np.void]]:
        """The events of group, chunk_rows at a time, up to the first one a possibly-live writer has not
        fully flushed (as _complete_events, without loading the whole table)."""
        n_ev = self._n[f"{group}/events"]
        n_dev = min(self._n[f"{group}/{c}"] for c in cols)
        for lo in range(0, n_ev, chunk_rows):
            ev = self._guard(lambda a=lo: self._ds[f"{group}/events"][a:min(a + chunk_rows, n_ev)])
            ok = (ev["start"] + ev["count"] <= n_dev) & (ev[code_field] < n_codes)
            if not ok.all():
                cut = int(np.argmin(ok))
                if cut:
                    yield ev[:cut]
                return
            yield ev

    def _device_windows(self, group: str, ev: npt.NDArray[np.void], cols: tuple[str, ...], chunk_rows: int
                        ) -> Iterator[tuple[npt.NDArray[np.int64], dict[str, np.ndarray]]]:
        """The device rows of the events ev, at most chunk_rows at a time and in event order:
        (index into ev of each row, {column: values})."""
        start = ev["start"].astype(np.int64)
        stop = start + ev["count"].astype(np.int64)
        if not len(ev) or int(stop.max()) <= int(start.min()):
            return
        lo, hi = int(start.min()), int(stop.max())
        for a in range(lo, hi, chunk_rows):
            b = min(a + chunk_rows, hi)
            s, e = np.maximum(start, a), np.minimum(stop, b)
            sel = np.flatnonzero(e > s)
            if not sel.size:
                continue
            n = (e - s)[sel]
            which = np.repeat(sel, n)
            # row offsets inside [a, b): each selected event's rows s..e-1, in event order
            first = np.cumsum(n) - n
            rows = np.repeat(s[sel] - a - first, n) + np.arange(int(n.sum()))
            data = {c: self._guard(lambda c=c: self._ds[f"{group}/{c}"][a:b])[rows] for c in cols}
            yield which.astype(np.int64), data

    def iter_read_events(self, chunk_rows: int = 1 << 16) -> Iterator[dict[str, np.ndarray]]:
        """read_events() in pieces of at most chunk_rows events, in order; reads the table a piece at a time."""
        names = np.array(self._reason_names, dtype=str) if self._reason_names else np.array([], str)
        for ev in self._event_chunks("reads", ("address", "conductance_us"), "reason", len(self._reason_names),
                                     _rows(chunk_rows)):
            out = {k: ev[k].copy() for k in ("seq", "step", "t_s", "wall_s", "start", "count")}
            out["reason_code"] = ev["reason"].astype(np.int64)
            out["reason"] = names[ev["reason"]]
            yield out

    def iter_reads(self, chunk_rows: int = 1 << 20) -> Iterator[dict[str, np.ndarray]]:
        """reads() in pieces of at most chunk_rows device rows, in order, reading the log a piece at a time
        (so a log larger than memory can be gone through). Each piece also has seq (the read call's),
        reason_code and event (the row of the read call in read_events())."""
        chunk_rows = _rows(chunk_rows)
        names = np.array(self._reason_names, dtype=str) if self._reason_names else np.array([], str)
        done = 0
        for ev in self._event_chunks("reads", ("address", "conductance_us"), "reason", len(self._reason_names),
                                     chunk_rows):
            for i, d in self._device_windows("reads", ev, ("address", "conductance_us"), chunk_rows):
                e = ev[i]
                yield {"seq": e["seq"], "step": e["step"], "t_s": e["t_s"], "wall_s": e["wall_s"],
                       "address": d["address"].astype(np.int64), "conductance_us": d["conductance_us"],
                       "reason": names[e["reason"]], "reason_code": e["reason"].astype(np.int64),
                       "event": i + done}
            done += len(ev)

    def iter_program_events(self, chunk_rows: int = 1 << 16) -> Iterator[dict[str, np.ndarray]]:
        """program_events() in pieces of at most chunk_rows programs, in order, each program with its
        devices (count), set_pulses and reset_pulses (sums over its devices); device rows are read
        chunk_rows at a time."""
        chunk_rows = _rows(chunk_rows)
        cols = ("address", "set_count", "reset")
        for ev in self._event_chunks("programs", cols, "shapes", self._n["programs/shapes"], chunk_rows):
            sets = np.zeros(len(ev), np.int64)
            resets = np.zeros(len(ev), np.int64)
            for i, d in self._device_windows("programs", ev, ("set_count", "reset"), chunk_rows):
                sets += np.bincount(i, weights=d["set_count"], minlength=len(ev)).astype(np.int64)
                resets += np.bincount(i, weights=d["reset"] != 0, minlength=len(ev)).astype(np.int64)
            out = {k: ev[k].copy() for k in ev.dtype.names}
            out["set_pulses"], out["reset_pulses"] = sets, resets
            yield out

    def iter_program_devices(self, chunk_rows: int = 1 << 20) -> Iterator[dict[str, np.ndarray]]:
        """Every logged program's devices, flat, in logged order, at most chunk_rows rows at a time: seq,
        program_id, step, t_s, wall_s, shapes (code) of the program; address, set_count, reset (bool) of
        the device; event (the program's row in program_events())."""
        chunk_rows = _rows(chunk_rows)
        cols = ("address", "set_count", "reset")
        done = 0
        for ev in self._event_chunks("programs", cols, "shapes", self._n["programs/shapes"], chunk_rows):
            for i, d in self._device_windows("programs", ev, cols, chunk_rows):
                e = ev[i]
                yield {"seq": e["seq"], "program_id": e["program_id"], "step": e["step"], "t_s": e["t_s"],
                       "wall_s": e["wall_s"], "shapes": e["shapes"], "address": d["address"].astype(np.int64),
                       "set_count": d["set_count"].astype(np.int64), "reset": d["reset"].astype(np.bool_),
                       "event": i + done}
            done += len(ev)

    def shapes(self, code: int) -> PulseShapes:
        """The pulse shapes logged under code (the programs table's shapes column)."""
        if not 0 <= code < self._n["programs/shapes"]:
            raise RunLogError(f"run log {self.path} has no pulse shapes {code}")
        r = self._guard(lambda: self._ds["programs/shapes"][code])
        return PulseShapes(set=PulseShape(amplitude_ua=float(r["set_amplitude_ua"]), width_ns=float(r["set_width_ns"])),
                           reset=PulseShape(amplitude_ua=float(r["reset_amplitude_ua"]),
                                            width_ns=float(r["reset_width_ns"])))

    def metrics(self) -> dict[str, np.ndarray]:
        """One row per log_metrics call: "step", "wall_s" and one column per metric name (NaN where absent)."""
        rows = self._guard(lambda: self._ds["metrics/rows"][:self._n["metrics/rows"]])
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
        m = self._guard(lambda: self._ds["metrics/rows"][:self._n["metrics/rows"]])
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


def _rows(chunk_rows: int) -> int:
    if int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    return int(chunk_rows)


def verify_log(path: str | Path, *, for_append: bool = False) -> str:
    """Check every checksummed row and array of the run log at path without changing it.

    Returns a one-line summary ("... rows verified", or "no checksums (schema 1)" for a log that has
    none); raises RunLogError naming the file, the failing datasets and their row ranges otherwise.
    Rows past a dataset's last checksum (a killed writer's torn tail) are counted, not refused.
    for_append: also refuse (first) a log this code cannot append to, an older schema version (what a
    resume asks before it writes anything).
    """
    with RunLogReader(path) as r:
        if for_append:
            from .writer import check_appendable

            check_appendable(r.path, r.schema_version, r.attrs)
        if not r.has_checksums:
            return f"run log {r.path}: no checksums (schema 1), nothing verified"
        problems = r.verify()
        if problems:
            raise RunLogError(format_problems(r.path, problems, "so it cannot be trusted"))
        blocks = len(r._table)
        torn = sum(r.torn_tail.values())
        tail = f"; {torn} rows past the last checksums (a torn tail) are not part of it" if torn else ""
        return f"run log {r.path}: {r.checksummed_rows} rows in {blocks} checksum blocks verified{tail}"
