"""The step journal: an append-only file, one record per program (and its step's update factors).

A record is written with a single os.write *before* its program is sent, so it survives a kill -9
of the trainer at any moment (the kernel keeps the bytes). With fsync=True each record is also on
the disk before its program is sent, so it survives a host crash or power cut; without it, a lost
tail is detected at resume from the tester's PROG:LAST? and the resume is refused (docs/checkpoint.md).
Layout of a record:

    u32 length of body | body | u32 crc32 of body
    body = u32 length of header | header (JSON) | raw array bytes, in header order

A torn last record (short or bad CRC) is what a kill mid-write leaves; it is dropped on reading,
and nothing after it is trusted. See docs/checkpoint.md.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from drivers import PulseProgram, PulseShapes

_U32 = struct.Struct("<I")


class JournalError(RuntimeError):
    """The journal is unreadable in a way a torn last record does not explain."""


def encode_record(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """One journal record: meta (JSON-able) and named arrays (kept bit-exact, dtype and shape stored)."""
    raw = [np.ascontiguousarray(a) for a in arrays.values()]  # (a 0-d array is stored 1-d, as always)
    header = _header(meta, arrays.keys(), raw)
    # One join and one CRC pass over the body (a record is a few hundred bytes to a few KB; the copies cost
    # less than more calls).
    body = b"".join([_U32.pack(len(header)), header, *raw])
    return b"".join([_U32.pack(len(body)), body, _U32.pack(zlib.crc32(body))])


def encode_update_record(step: int, epoch: int, pos: int, correct: int, n: int, program_id: int | None,
                         arrays: dict[str, np.ndarray]) -> bytes:
    """encode_record of a step's update record, byte for byte: meta {"step", "epoch", "pos", "kind": "update",
    "correct", "n"} and "program_id" unless None, all ints; arrays C-contiguous and at least 1-d (as a step's are).

    The trainer writes one per step: one format string instead of encode_record's walk over the meta dict.
    """
    specs = []
    for name, a in arrays.items():
        key = (name, a.dtype, a.shape)
        piece = _SPEC_PIECES.get(key)
        if piece is None:
            if not _plain(name):
                raise ValueError(f"journal array name {name!r} needs escaping")
            if len(_SPEC_PIECES) >= 4096:
                _SPEC_PIECES.clear()
            piece = _SPEC_PIECES[key] = json.dumps([name, a.dtype.str, list(a.shape)], separators=(",", ":"))
        specs.append(piece)
    pid = "" if program_id is None else f',"program_id":{program_id}'
    header = (f'{{"meta":{{"step":{step},"epoch":{epoch},"pos":{pos},"kind":"update","correct":{correct},'
              f'"n":{n}{pid}}},"arrays":[{",".join(specs)}]}}').encode()
    body = b"".join([_U32.pack(len(header)), header, *arrays.values()])
    return b"".join([_U32.pack(len(body)), body, _U32.pack(zlib.crc32(body))])


def _header(meta: dict[str, Any], names: Any, raw: list[np.ndarray]) -> bytes:
    """The record's JSON header, byte for byte what json.dumps(..., separators=(",", ":")) writes.

    Every step writes one, so the common case (int and plain-ASCII str values) is formatted by hand
    from cached pieces; anything else goes through json.dumps.
    """
    keys = tuple(meta)
    lead = _META_LEADS.get(keys)
    if lead is None:
        if not all(type(k) is str and _plain(k) for k in keys):
            return _json_header(meta, names, raw)
        if len(_META_LEADS) >= 256:
            _META_LEADS.clear()
        lead = _META_LEADS[keys] = [f'"{k}":' for k in keys]
    fields = []
    for piece, v in zip(lead, meta.values()):
        t = type(v)
        if t is int:
            fields.append(f"{piece}{v}")
        elif t is str and _plain(v):
            fields.append(f'{piece}"{v}"')
        else:
            return _json_header(meta, names, raw)
    specs = []
    for name, a in zip(names, raw):
        key = (name, a.dtype, a.shape)
        piece = _SPEC_PIECES.get(key)
        if piece is None:
            if type(name) is not str or not _plain(name):
                return _json_header(meta, names, raw)
            if len(_SPEC_PIECES) >= 4096:
                _SPEC_PIECES.clear()
            piece = _SPEC_PIECES[key] = json.dumps([name, a.dtype.str, list(a.shape)], separators=(",", ":"))
        specs.append(piece)
    return f'{{"meta":{{{",".join(fields)}}},"arrays":[{",".join(specs)}]}}'.encode()


def _json_header(meta: dict[str, Any], names: Any, raw: list[np.ndarray]) -> bytes:
    spec = [[name, a.dtype.str, list(a.shape)] for name, a in zip(names, raw, strict=True)]
    return json.dumps({"meta": meta, "arrays": spec}, separators=(",", ":")).encode()


# Strings json.dumps writes as '"' + s + '"' (no escapes), learned as they are seen.
_PLAIN: set[str] = set()
_SPEC_PIECES: dict[tuple[str, np.dtype, tuple[int, ...]], str] = {}
# '"key":' of each key, per tuple of meta keys (a run writes a handful of record layouts).
_META_LEADS: dict[tuple[Any, ...], list[str]] = {}


def _plain(s: str) -> bool:
    if s in _PLAIN:
        return True
    if not (s.isascii() and s.isprintable() and '"' not in s and "\\" not in s):
        return False
    if len(_PLAIN) < 4096:
        _PLAIN.add(s)
    return True


def decode_body(body: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (hlen,) = _U32.unpack_from(body, 0)
    header = json.loads(body[4:4 + hlen])
    off = 4 + hlen
    arrays = {}
    for name, dtype, shape in header["arrays"]:
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) * dt.itemsize
        arrays[name] = np.frombuffer(body, dt, count=int(np.prod(shape)), offset=off).reshape(shape).copy()
        off += n
    return header["meta"], arrays


class Journal:
    """Append-only writer; each append is one os.write of a whole record (then fsync, if asked)."""

    def __init__(self, path: str | Path, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = bool(fsync)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0), 0o644)
        if self.fsync:
            _sync_folder(self.path.parent)  # the new segment's name must survive a power cut too

    def append(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Write one record; with fsync, return only once it is on the disk. OSError if it is not whole."""
        self.append_encoded(encode_record(meta, arrays))

    def append_encoded(self, rec: bytes) -> None:
        """append() of a record encode_record (or encode_update_record) made."""
        written = os.write(self._fd, rec)
        if written != len(rec):  # a regular file takes the whole write unless the disk is full
            raise OSError(errno.ENOSPC, f"journal {self.path}: short write ({written} of {len(rec)} bytes), "
                                        "disk full?")
        if self.fsync:
            os.fsync(self._fd)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its file system journals names itself
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_journal(path: str | Path) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """Every whole record of the journal, in order; a torn tail is dropped. Missing file: no records."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    off = 0
    while off + 4 <= len(data):
        (blen,) = _U32.unpack_from(data, off)
        end = off + 4 + blen + 4
        if end > len(data):
            break  # torn tail
        body = data[off + 4:off + 4 + blen]
        (crc,) = _U32.unpack_from(data, off + 4 + blen)
        if zlib.crc32(body) != crc:
            if end == len(data):
                break  # torn tail written out of order by the page cache
            raise JournalError(f"journal {p}: record at byte {off} fails its checksum and is not the last one")
        try:
            out.append(decode_body(body))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            raise JournalError(f"journal {p}: record at byte {off} is malformed: {e}") from e
        off = end
    return out


def program_arrays(p: PulseProgram, small_addresses: bool) -> dict[str, np.ndarray]:
    """A program's arrays as the journal keeps them: int32 addresses (arrays under 2**31 devices), uint8 SET
    counts where they fit, no RESET flags when there are none; journaled_program restores them exactly."""
    # Counts are never negative (PulseProgram refuses them): the largest one says whether uint8 holds them all.
    out = {"addresses": p.addresses.astype(np.int32) if small_addresses else p.addresses,
           "set_counts": p.set_counts.astype(np.uint8) if p.set_counts.size and p.most_set_pulses <= 255
           else p.set_counts}
    if p.reset_pulses:
        out["reset"] = p.reset
    return out


def journaled_program(meta: dict[str, Any], arr: dict[str, np.ndarray], shapes: PulseShapes) -> PulseProgram:
    """The PulseProgram of a journal record (int64 addresses and counts, as the live one; older records hold
    them as int64 and always a reset array)."""
    addresses = arr["addresses"].astype(np.int64)
    reset = arr["reset"] if "reset" in arr else np.zeros(addresses.size, np.bool_)
    return PulseProgram(int(meta["program_id"]), addresses, arr["set_counts"].astype(np.int64), reset, shapes)
