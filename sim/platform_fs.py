"""Durable file writes as each system allows them (Linux, macOS, Windows), chosen at run time.

- a folder's fsync (so a new or renamed file's name survives a power cut) exists on POSIX only:
  Windows cannot open a folder with os.open, and NTFS journals names itself, so there it is skipped;
- positional writes (os.pwrite) do not exist on Windows: a seek and a write on a descriptor its caller
  uses alone do the same;
- descriptors must be opened binary on Windows (O_BINARY), or every newline byte written gains a CR.
"""

from __future__ import annotations

import os
from pathlib import Path

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
