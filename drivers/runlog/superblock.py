"""The HDF5 superblock of a run log, read and (to clear a dead writer's marks) rewritten in plain Python.

A writer marks the file "open for writing" (and "for SWMR writing") in the superblock's file consistency
flags; a killed writer leaves the marks, and libhdf5 then refuses to open the file for writing again. This
module clears them the way ``h5clear -s`` does, with no HDF5 tool and no access to libhdf5's internals, so
it works wherever Python does: the flags byte is set to 0 and the superblock's checksum recomputed.

Layout (HDF5 file format specification, superblock versions 2 and 3; run logs are version 3): signature
(8 bytes), version, size of offsets O, size of lengths, file consistency flags (1 byte each), base
address, superblock extension address, end-of-file address, root group object header address (O bytes
each, little-endian), then a Jenkins lookup3 checksum (4 bytes) of everything before it.
"""

from __future__ import annotations

import os
from pathlib import Path

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Offset of the file consistency flags in a version 2 / 3 superblock.
FLAGS_OFFSET = 11
_M = 0xFFFFFFFF
_BINARY = getattr(os, "O_BINARY", 0)   # Windows: no newline translation on this descriptor


class SuperblockError(Exception):
    """The file's first bytes are not a version 2 / 3 superblock this module can rewrite (message says why)."""


def superblock(path: str | Path) -> tuple[int, int, int] | None:
    """(version, status flags, stored end-of-file address) of a v2/v3 superblock at offset 0, else None."""
    with open(path, "rb") as fh:
        head = fh.read(48)
    if head[:8] != HDF5_SIGNATURE or len(head) < 12 or head[8] < 2:
        return None
    size_o = head[9]
    at = 12 + 2 * size_o        # after base address and superblock-extension address
    if len(head) < at + size_o:
        return None
    return head[8], head[FLAGS_OFFSET], int.from_bytes(head[at:at + size_o], "little")


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    for x, y, z, k in ((0, 2, 1, 4), (1, 0, 2, 6), (2, 1, 0, 8), (0, 2, 1, 16), (1, 0, 2, 19), (2, 1, 0, 4)):
        # the reference's mix(): v[x] -= v[y]; v[x] ^= rot(v[y], k); v[y] += v[z]
        v = [a, b, c]
        v[x] = ((v[x] - v[y]) & _M) ^ _rot(v[y], k)
        v[y] = (v[y] + v[z]) & _M
        a, b, c = v
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    for x, y, k in ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24)):
        # the reference's final(): v[x] ^= v[y]; v[x] -= rot(v[y], k)
        v = [a, b, c]
        v[x] = ((v[x] ^ v[y]) - _rot(v[y], k)) & _M
        a, b, c = v
    return c


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 hashlittle of data: the checksum HDF5 puts on its metadata (H5_checksum_lookup3)."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & _M
    i = 0
    while True:
        block = data[i:i + 12]
        if not block:
            return c                               # empty input: no final mixing (as the reference)
        words = bytes(block) + bytes(12 - len(block))  # the last 1..12 bytes, little-endian words, zero-padded
        a = (a + int.from_bytes(words[0:4], "little")) & _M
        b = (b + int.from_bytes(words[4:8], "little")) & _M
        c = (c + int.from_bytes(words[8:12], "little")) & _M
        if n - i <= 12:
            return _final(a, b, c)
        a, b, c = _mix(a, b, c)
        i += 12


def _read_at(fd: int, n: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def clear_status_flags(path: str | Path) -> bool:
    """Clear the superblock's file consistency flags (what ``h5clear -s`` does); whether any were set.

    Only while no writer can be alive (the caller holds the writer lock). The stored checksum is checked
    first, so a superblock that is not what this module understands is refused (SuperblockError), never
    rewritten.
    """
    fd = os.open(path, os.O_RDWR | _BINARY)
    try:
        head = _read_at(fd, 12)
        if len(head) < 12 or head[:8] != HDF5_SIGNATURE:
            raise SuperblockError("no HDF5 signature at the start of the file")
        if head[8] not in (2, 3):
            raise SuperblockError(f"superblock version {head[8]} (only versions 2 and 3 carry these flags)")
        size_o = head[9]
        if size_o not in (2, 4, 8, 16, 32):
            raise SuperblockError(f"size of offsets {size_o} is not one HDF5 writes")
        body_len = 12 + 4 * size_o
        block = _read_at(fd, body_len + 4)
        if len(block) < body_len + 4:
            raise SuperblockError("the file ends inside its superblock")
        stored = int.from_bytes(block[body_len:], "little")
        if lookup3(block[:body_len]) != stored:
            raise SuperblockError("the superblock's checksum does not match its contents")
        if block[FLAGS_OFFSET] == 0:
            return False
        body = block[:FLAGS_OFFSET] + b"\x00" + block[FLAGS_OFFSET + 1:body_len]
        new = body + lookup3(body).to_bytes(4, "little")
        os.lseek(fd, 0, os.SEEK_SET)
        if os.write(fd, new) != len(new):
            raise OSError(f"short write of the superblock of {path}")
        return True
    finally:
        os.close(fd)
