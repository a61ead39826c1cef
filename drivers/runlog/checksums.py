"""The /checksums table (schema 2): which rows of each dataset a CRC-32 covers, and recomputing them.

One row per dataset per flush that added rows to it: (dataset code, start, stop, crc32), the CRC-32
(zlib's) of rows start..stop-1 as their little-endian bytes in the dataset's dtype. A dataset's blocks
follow one another from row 0 without gap or overlap; the rows past its last block are a torn tail
(written by a flush whose checksums never reached the file) and are not part of the log.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import h5py
import numpy as np

from .schema import CHECKSUM_ROW, CHECKSUMS

WINDOW_BYTES = 32 << 20      # rows read from the file at a time when recomputing checksums


def crc(rows: np.ndarray, value: int = 0) -> int:
    """CRC-32 of rows' bytes continued from value (zlib.crc32)."""
    return zlib.crc32(np.ascontiguousarray(rows), value)


def load_table(f: h5py.File) -> tuple[np.ndarray, list[str]]:
    """The checksum rows and the dataset names their codes stand for.

    Trailing all-zero rows are dropped: a table row whose bytes never reached the file before a kill reads
    as the fill value, and a real block always ends past row 0.
    """
    ds = f[CHECKSUMS]
    table = np.ascontiguousarray(ds[:], CHECKSUM_ROW)
    n = len(table)
    while n and table["stop"][n - 1] == 0:
        n -= 1
    names = [x.decode() if isinstance(x, bytes) else str(x) for x in ds.attrs.get("datasets", [])]
    return table[:n], names


def chain(table: np.ndarray, names: list[str], lengths: dict[str, int]
          ) -> tuple[dict[str, int], dict[str, list[int]], list[str]]:
    """Walk each dataset's blocks without reading its rows.

    Returns (rows covered from row 0 per dataset, table rows of those blocks per dataset, problems):
    a block that does not start where the previous one stopped, is empty, names no known dataset or
    reaches past the dataset's end is a problem, and the dataset's covered rows end before it.
    """
    covered = {n: 0 for n in lengths}
    valid: dict[str, list[int]] = {n: [] for n in lengths}
    broken: set[str] = set()
    problems: list[str] = []
    for i, (code, start, stop) in enumerate(zip(table["dataset"].tolist(), table["start"].tolist(),
                                                table["stop"].tolist(), strict=True)):
        name = names[code] if code < len(names) else None
        if name not in lengths:
            problems.append(f"/{CHECKSUMS} row {i} names dataset code {code}, which this log does not have")
            continue
        if name in broken:
            continue
        at = covered[name]
        if start != at or stop <= start:
            problems.append(f"/{name}: checksum block {i} covers rows {start}..{stop - 1}, but the blocks "
                            f"before it end at row {at}")
            broken.add(name)
        elif stop > lengths[name]:
            problems.append(f"/{name} rows {start}..{stop - 1} are checksummed but the dataset has only "
                            f"{lengths[name]} rows (cut short?)")
            broken.add(name)
        else:
            covered[name] = stop
            valid[name].append(i)
    return covered, valid, problems


def crcs(ds: h5py.Dataset, dtype: np.dtype, ranges: Iterable[tuple[int, int]]) -> list[int]:
    """The CRC-32 of each row range (start, stop) of ds, in order, reading ds in windows of WINDOW_BYTES."""
    window = max(1, WINDOW_BYTES // dtype.itemsize)
    lo = hi = 0
    rows = np.empty(0, dtype)
    out = []
    for start, stop in ranges:
        value, at = 0, start
        while at < stop:
            if not lo <= at < hi:
                lo, hi = at, min(int(ds.shape[0]), at + window)
                if hi <= lo:
                    break               # rows missing from the file: the value cannot match
                rows = np.ascontiguousarray(ds[lo:hi], dtype)
            end = min(stop, hi)
            value = zlib.crc32(rows[at - lo:end - lo], value)
            at = end
        out.append(value)
    return out
