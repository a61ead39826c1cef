"""Durable file writes as each system allows them (Linux, macOS, Windows), chosen at run time.

- a folder's fsync (so a new or renamed file's name survives a power cut) exists on POSIX only:
  Windows cannot open a folder with os.open, and NTFS journals names itself, so there it is skipped;
- positional writes (os.pwrite) do not exist on Windows: a seek and a write on a descriptor its caller
  uses alone do the same;
- descriptors must be opened binary on Windows (O_BINARY), or every newline byte written gains a CR;
- replacing a file another process has open (a reader of summary.json, say) fails on Windows for as long
  as that reader holds it, where POSIX replaces it at once: replace() retries there for a while.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

#: How long replace() keeps retrying on Windows while another process holds the target open, s.
REPLACE_RETRY_S = 2.0

#: Add to os.open flags: binary on Windows (no newline translation), 0 elsewhere.
O_BINARY = getattr(os, "O_BINARY", 0)


def sync_folder(folder: str | os.PathLike[str]) -> None:
    """fsync the folder itself (its entries: a file made, renamed or removed in it), where the system can."""
    folder = Path(folder) if str(folder) else Path(".")
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its file system journals names itself
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync a folder (some network ones): the file's own fsync stands
        pass
    finally:
        os.close(fd)


def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
    """Write data at offset (bytes from the start) of fd; the number of bytes written, as os.pwrite.

    Without os.pwrite (Windows) the descriptor is positioned first: only for descriptors one thread uses.
    """
    native = getattr(os, "pwrite", None)
    if native is not None:
        return native(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)


def datasync(fd: int) -> None:
    """fdatasync where the system has it (Linux), else fsync (macOS, Windows): fd's data on the disk."""
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """os.replace(src, dst); on Windows retried for up to REPLACE_RETRY_S while dst is held open elsewhere."""
    if sys.platform != "win32":
        os.replace(src, dst)
        return
    deadline = time.monotonic() + REPLACE_RETRY_S
    while True:
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            # ERROR_ACCESS_DENIED / sharing violation: a reader has dst open (readers hold it milliseconds).
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
