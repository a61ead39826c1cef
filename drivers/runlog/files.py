"""The run log's file handling below HDF5: opening with clear errors, the superblock checks, the one-writer
lock, clearing a dead writer's marks, reserving disk space ahead of libhdf5, and letting go of a file
whose writes failed without libhdf5 touching it again.

The platform-specific pieces each live in a module of their own, chosen at run time: the lock in
lock.py (filelock: flock, LockFileEx, or a marker file), the superblock rewrite in superblock.py (plain
Python), the libhdf5 lookup in hdf5lib.py; the disk-space reserve below uses posix_fallocate where the
system has it."""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import re
from pathlib import Path
from typing import Any

import h5py

from .hdf5lib import hdf5_library
from .lock import LogLock
from .schema import RunLogError
from .superblock import HDF5_SIGNATURE, SuperblockError, clear_status_flags, superblock

__all__ = ["HDF5_SIGNATURE", "NoSpace", "SpaceReserve", "WriterLock", "check_not_truncated", "clear_writer_marks",
           "describe_cause", "describe_open_error", "detach", "open_h5", "open_swmr_read_once", "superblock"]


def describe_cause(exc: BaseException) -> str:
    """The operating-system cause of exc in a few words ("no space left on device"), else its first line."""
    code = exc.errno if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0 else None
    if code is None:
        # libhdf5 puts the errno of a failed write or open in its message, not in the exception.
        m = re.search(r"errno = (\d+)", str(exc))
        code = int(m.group(1)) if m else None
    if code is not None:
        return os.strerror(code)[:1].lower() + os.strerror(code)[1:]
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def describe_open_error(path: Path, exc: Exception) -> str:
    msg = str(exc)
    if "truncated file" in msg:
        return f"run log {path} is truncated (shorter than its own header says): {msg}"
    if "file signature not found" in msg:
        return f"{path} is not an HDF5 file (no HDF5 signature), so not a run log"
    if "already open for write" in msg:
        return (f"run log {path} is marked as open for writing by a writer that is still running or died "
                f"without SWMR; reopen it with RunLogWriter(..., append=True) or run `h5clear -s {path}`")
    return f"cannot open run log {path}: {msg}"


def check_not_truncated(path: Path) -> None:
    """Refuse a log shorter than its superblock says. A SWMR open does not check this itself, and
    would then retry unreadable metadata for a long time. Applied to live logs too: in 160,000
    samples of a writer flushing every 10 ms the file was never shorter than its superblock said."""
    sb = superblock(path)
    if sb is not None:
        size = path.stat().st_size
        if size < sb[2]:
            raise RunLogError(f"run log {path} is truncated: {size} bytes, its header says {sb[2]} (if its writer "
                              f"died on a full disk, RunLogWriter(path, append=True) restores the end and "
                              f"checks the rows with their checksums)")


def open_h5(path: Path, mode: str, **kwargs: Any) -> h5py.File:
    try:
        return h5py.File(path, mode, **kwargs)
    except FileNotFoundError as e:
        raise RunLogError(f"no run log at {path}") from e
    except (OSError, ValueError, RuntimeError) as e:
        raise RunLogError(describe_open_error(path, e)) from e


def open_swmr_read_once(path: Path) -> h5py.File:
    """Open path for SWMR reading with one attempt per metadata read instead of libhdf5's many.

    A SWMR reader retries a metadata block whose checksum fails (a live writer may be rewriting it),
    with growing sleeps: on a file whose metadata is gone (zeros) that takes minutes. With no writer
    alive (the writer lock held) there is nothing to wait for.
    """
    lib = hdf5_library()
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    if lib is not None:
        lib.H5Pset_metadata_read_attempts.argtypes = [ctypes.c_int64, ctypes.c_uint]
        lib.H5Pset_metadata_read_attempts.restype = ctypes.c_int
        lib.H5Pset_metadata_read_attempts(fapl.id, 1)
    try:
        fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl)
    except (OSError, RuntimeError, ValueError) as e:
        raise RunLogError(describe_open_error(path, e)) from e
    return h5py.File(fid)


def clear_writer_marks(path: Path) -> None:
    """Clear the superblock's "open for writing" flags a killed writer left (what `h5clear -s` does).

    Rewrites the superblock's flags byte and checksum (superblock.py): no HDF5 tool, no libhdf5 internals,
    the same bytes libhdf5's own clearing writes. Call only while holding the writer lock, i.e. when no
    writer can be alive.
    """
    try:
        clear_status_flags(path)
    except SuperblockError as e:
        raise RunLogError(f"run log {path} was left open by a writer that died, and its superblock cannot be "
                          f"cleared here ({e}); run `h5clear -s {path}` and retry") from e
    except OSError as e:
        raise RunLogError(f"run log {path} was left open by a writer that died, and its superblock cannot be "
                          f"cleared: {describe_cause(e)}") from e


class WriterLock:
    """The one writer's hold on a log: the lock file beside it (lock.py) and a descriptor on the log.

    The lock is the log's lock file (``run.h5.lock``), which the system lets go of when the writer dies,
    kill -9 included; that is how a reopening writer knows the last one is gone. The descriptor (fd) is
    the one the writer reserves disk space and trims the file through. It is opened first, so a log this
    user cannot write is refused as such before any lock file is made.
    """

    def __init__(self, path: Path) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise RunLogError(f"cannot open run log {path} for writing: {describe_cause(e)}") from e
        try:
            self._lock: LogLock | None = LogLock(path)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def close_file(self) -> None:
        """Close the descriptor on the log, keeping the lock (Windows cannot remove a file still open)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def release(self) -> None:
        """Close the descriptor and let the next writer in (idempotent)."""
        self.close_file()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def remove_log(self, path: Path) -> None:
        """Remove the writer's own half-made log at path and its lock file, and release (a refused creation).

        The descriptor is closed first (Windows cannot remove a file that is still open).
        """
        self.close_file()
        path.unlink(missing_ok=True)
        lock_file = self._lock.path if self._lock is not None else None
        self.release()
        if lock_file is not None:
            try:
                lock_file.unlink(missing_ok=True)   # filelock keeps it on Unix; no log is left to lock
            except OSError:
                pass


class NoSpace(OSError):
    """The disk space a write needs could not be reserved; libhdf5 has not been asked to write it."""


class SpaceReserve:
    """Keeps the file's allocated length ahead of what libhdf5 may write next, so a full disk (or a file
    size limit) is met here, before libhdf5 writes, and never inside it.

    libhdf5 cannot recover from a failed write: its flush, its close and its exit handler then fail
    again, print tracebacks and can crash the process. Space is taken with posix_fallocate in steps of
    GROW bytes; SLACK stays reserved beyond every write for the metadata a flush or close adds, so a
    writer that runs out can still close its file cleanly. The zeros past the end of a killed
    writer's file are harmless (HDF5 reads only up to the end its superblock records); close() cuts them.
    """

    SLACK = 1 << 20        # bytes kept free beyond every write, for HDF5 metadata (a flush adds a few KiB)
    GROW = 2 << 20         # reserve in steps this size beyond the need, so fallocate runs rarely

    def __init__(self, f: h5py.File, fd: int, path: Path) -> None:
        self.f, self.fd, self.path = f, fd, path
        self.pending = 0                       # raw bytes handed to libhdf5 since its last flush
        self.reserved_to = os.fstat(fd).st_size

    def need(self, nbytes: int) -> None:
        """Make room for nbytes more of raw data (plus SLACK); NoSpace if the file system refuses."""
        self.pending += nbytes
        end = self.f.id.get_filesize() + self.pending + self.SLACK
        if end > self.reserved_to:
            self._grow(end + self.GROW)

    def flushed(self) -> None:
        """libhdf5 flushed: its end of file now counts what was pending."""
        self.pending = 0

    #: What a file system says when it has no room: the only refusals that stop the log.
    FULL = frozenset({_errno.ENOSPC, _errno.EFBIG, _errno.EDQUOT})

    def _grow(self, end: int) -> None:
        size = os.fstat(self.fd).st_size
        if size < end:
            try:
                os.posix_fallocate(self.fd, size, end - size)
            except OSError as e:
                if e.errno not in self.FULL:
                    # A file system that cannot reserve (or not this way) is not a full one: write without
                    # a reserve; a write libhdf5 then fails is still one RunLogError (detach).
                    self.reserved_to = 1 << 62
                    return
                raise NoSpace(e.errno, f"cannot reserve {end - size} bytes at the end of {self.path}: "
                                       f"{describe_cause(e)}") from e
            except AttributeError:     # no posix_fallocate on this system (macOS): no reserve
                self.reserved_to = 1 << 62
                return
            size = end
        self.reserved_to = size

    def trim(self) -> None:
        """Cut the reserve off a closed file: its length back to the end its superblock records."""
        try:
            sb = superblock(self.path)
            if sb is not None and os.fstat(self.fd).st_size > sb[2]:
                os.ftruncate(self.fd, sb[2])
        except OSError:
            pass   # the reserve is zeros past HDF5's end of file: harmless if it stays


def detach(f: h5py.File) -> None:
    """Close f without libhdf5 writing another byte to its file (after a write inside libhdf5 failed).

    libhdf5's descriptor is pointed at /dev/null first, so the flush inside close succeeds and the file
    keeps what it had; a close that fails would leave the file open for libhdf5's exit handler, which
    then crashes the process.
    """
    try:
        fd = f.id.get_vfd_handle()
        nul = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(nul, fd)
        finally:
            os.close(nul)
    except (OSError, RuntimeError, ValueError, TypeError):
        pass
    try:
        f.close()
    except Exception:  # noqa: BLE001 - nothing more can be done for this file, and nothing may be printed
        pass
