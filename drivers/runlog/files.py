"""The run log's file handling below HDF5: opening with clear errors, the superblock checks, the one-writer
lock, clearing a dead writer's marks, reserving disk space ahead of libhdf5, and letting go of a file
whose writes failed without libhdf5 touching it again."""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import os
import re
import struct
from pathlib import Path
from typing import Any

import h5py

from .schema import RunLogError


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


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def superblock(path: Path) -> tuple[int, int, int] | None:
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


def open_swmr_read_once(path: Path) -> h5py.File:
    """Open path for SWMR reading with one attempt per metadata read instead of libhdf5's many.

    A SWMR reader retries a metadata block whose checksum fails (a live writer may be rewriting it),
    with growing sleeps: on a file whose metadata is gone (zeros) that takes minutes. With no writer
    alive (the writer lock held) there is nothing to wait for.
    """
    lib = _hdf5_library()
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
        raise RunLogError(describe_open_error(path, e)) from e


class WriterLock:
    """An exclusive open-file-description lock on a byte far past the data: one writer per log.

    OFD locks (not flock) so readers' shared flock on the same file never conflicts, and the kernel
    drops it when the writer dies, which is how a reopening writer knows the last one is gone. Its
    descriptor is also the one the writer reserves disk space and trims the file through.
    """

    OFFSET = 1 << 62

    def __init__(self, path: Path) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise RunLogError(f"cannot open run log {path} for writing: {describe_cause(e)}") from e
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
