"""The writer's building blocks: a dataset column buffered in whole chunks (with its running CRC-32), the
name tables, and trimming a killed writer's torn tail back to the last checksummed rows."""

from __future__ import annotations

import h5py
import numpy as np
import numpy.typing as npt

from . import schema as _schema
from .checksums import chain, crc, crcs, load_table
from .files import SpaceReserve
from .schema import CHECKSUMS, NAME


# ---------------------------------------------------------------------------------------- buffering
class Column:
    """One resizable 1-D dataset fed from a numpy buffer that holds the dataset's last, partial chunk.

    Rows reach HDF5 as whole aligned chunks when the buffer fills; flush() also writes the partial
    chunk (and rewrites it, larger, at the next flush), so the file only ever grows by appends. The
    CRC of rows written since the last checksum block is kept as they are written.
    """

    def __init__(self, ds: h5py.Dataset, space: SpaceReserve) -> None:
        self.ds = ds
        self.space = space
        self.chunk = int(ds.chunks[0])
        self.chunk_bytes = self.chunk * ds.dtype.itemsize
        self.buf = np.empty(self.chunk, ds.dtype)
        n = int(ds.shape[0])
        self.base = n - n % self.chunk          # file row of buf[0]
        self.fill = n % self.chunk
        if self.fill:
            self.buf[:self.fill] = ds[self.base:n]
        self.written = n                        # rows the file holds
        self.block_start = n                    # first row no checksum block covers yet
        self.crc = 0                            # CRC-32 of rows block_start .. written-1

    @property
    def total(self) -> int:
        return self.base + self.fill

    def append_row(self, row: tuple | bytes) -> None:
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
            self._write(self.base, self.base + whole,
                        np.ascontiguousarray(values[room:room + whole], dtype=self.ds.dtype))
            self.base += whole
        rest = k - room - whole
        self.buf[:rest] = values[room + whole:]
        self.fill = rest

    def flush(self) -> None:
        if self.total > self.written:
            self._write(self.base, self.total, self.buf[:self.fill])

    def take_block(self) -> tuple[int, int, int] | None:
        """(start, stop, crc32) of the rows written since the last block, or None; starts the next block."""
        if self.written == self.block_start:
            return None
        block = (self.block_start, self.written, self.crc)
        self.block_start, self.crc = self.written, 0
        return block

    def _write_buffer(self) -> None:
        self._write(self.base, self.base + self.chunk, self.buf)
        self.base += self.chunk
        self.fill = 0

    def _write(self, start: int, stop: int, rows: np.ndarray) -> None:
        # HDF5 allocates whole chunks, also for a partial one.
        self.space.need(((stop - 1) // self.chunk - start // self.chunk + 1) * self.chunk_bytes)
        if self.ds.shape[0] != stop:
            self.ds.resize((stop,))
        self.ds[start:stop] = rows
        # Rows before `written` are a rewritten partial chunk: their CRC is in already.
        self.crc = crc(rows[self.written - start:], self.crc)
        self.written = stop


def create_name_table(f: h5py.File, name: str, chunk: int) -> None:
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


def trim_torn_tail(f: h5py.File) -> None:
    """Drop what a crash left half-flushed: rows past their dataset's last checksum block, events whose
    devices or names did not reach the file, the values of a metrics record cut short. Blocks are cut to
    match (a block cut inside is replaced by the CRC of its kept rows)."""
    names = list(_schema.DATASETS)
    table, table_names = load_table(f)
    lengths = {n: int(f[n].shape[0]) for n in names}
    covered, valid, _ = chain(table, table_names, lengths)
    for n in names:
        if lengths[n] > covered[n]:
            f[n].resize((covered[n],))
    for group, names_ds, cols in (("reads", "reads/reason_names", ("address", "conductance_us")),
                                  ("programs", "programs/shapes", ("address", "set_count", "reset"))):
        ev = f[f"{group}/events"]
        n_dev = min(f[f"{group}/{c}"].shape[0] for c in cols)
        n_names = f[names_ds].shape[0]
        events = ev[:]
        code = events["reason"] if group == "reads" else events["shapes"]
        ok = (events["start"] + events["count"] <= n_dev) & (code < n_names)
        n_ev = int(np.argmin(ok)) if not ok.all() else len(events)
        end = int(events["start"][n_ev - 1] + events["count"][n_ev - 1]) if n_ev else 0
        ev.resize((n_ev,))
        for c in cols:
            f[f"{group}/{c}"].resize((end,))
    rows = f["metrics/rows"]
    m = rows[:]
    bad = np.flatnonzero(m["name"] >= f["metrics/names"].shape[0])
    if bad.size:
        # A record is whole or absent: cut back to the start of the record the first bad row is in.
        rows.resize((int(np.searchsorted(m["record"], m["record"][bad[0]], side="left")),))
    kept: list[np.void] = []
    for n in names:
        length = int(f[n].shape[0])
        for i in valid[n]:
            start, stop = int(table["start"][i]), int(table["stop"][i])
            if stop <= length:
                kept.append(table[i])
            elif start < length:
                row = table[i].copy()
                row["stop"] = length
                row["crc32"] = crcs(f[n], _schema.DATASETS[n][0], [(start, length)])[0]
                kept.append(row)
    # Each dataset's blocks stay in their order; the table's order across datasets does not matter.
    new = np.array(kept, dtype=table.dtype) if kept else np.empty(0, table.dtype)
    ds = f[CHECKSUMS]
    old = ds[:]
    if len(old) != len(new) or not np.array_equal(old, new):
        ds.resize((len(new),))
        if len(new):
            ds[:] = new


# ---------------------------------------------------------------------------------------- writer
