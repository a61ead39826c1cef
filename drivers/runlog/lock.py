"""The one-writer lock of a run log: a lock file beside it (``run.h5.lock``), held through filelock.

filelock picks the operating system's own lock at run time, and each is dropped by the system when its
holder dies, kill -9 included, so a resume after a crash never waits for anything:

- Linux and macOS: ``flock`` on the lock file (UnixFileLock). Held per open file description, so a second
  writer in the same process is refused as one in another process is. The file stays after release.
- Windows: ``LockFileEx`` on byte 0 of the lock file (WindowsFileLock); the file is removed on release.
- a system or file system without ``flock``: a marker file naming the holder (SoftFileLock); the next
  writer removes a marker whose process is gone (pid, start time and host), so a dead writer does not
  keep the log locked either.

The lock is a separate file, not a lock on run.h5 itself, because libhdf5 takes its own flock on the
HDF5 file (readers included), and a Windows lock on run.h5 would block libhdf5's reads of that range.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from .schema import RunLogError

#: The lock file's name is the log's plus this.
LOCK_SUFFIX = ".lock"
#: How long a writer waits for the lock, s. writer_alive() holds it for microseconds to ask; a live writer
#: holds it until it closes, so waiting longer would only delay the refusal of a second writer.
ACQUIRE_TIMEOUT_S = 0.5


def _filelock() -> Any:
    # Without flock, importing filelock warns once that only its soft lock exists: that is the lock we
    # then want, not something to print on every command.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import filelock
    return filelock


def lock_path(log: str | Path) -> Path:
    """The lock file of the log at log: ``run.h5`` -> ``run.h5.lock``, in the same folder."""
    p = Path(log)
    return p.with_name(p.name + LOCK_SUFFIX)


class LogLock:
    """Holds the one-writer lock of the log at log; RunLogError naming the log if another writer holds it."""

    def __init__(self, log: str | Path, timeout_s: float = ACQUIRE_TIMEOUT_S) -> None:
        filelock = _filelock()
        self.log = Path(log)
        self.path = lock_path(self.log)
        self._lock = filelock.FileLock(os.fspath(self.path), timeout=timeout_s, thread_local=False)
        try:
            self._lock.acquire()
        except filelock.Timeout as e:
            raise RunLogError(f"run log {self.log} is open in another writer (still running); one writer "
                              f"per log") from e
        except OSError as e:
            raise RunLogError(f"cannot lock run log {self.log} for writing ({self.path.name}): "
                              f"{e.strerror or e}") from e

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return bool(self._lock.is_locked)

    def release(self) -> None:
        """Let the next writer in (idempotent)."""
        if self._lock.is_locked:
            self._lock.release(force=True)


def writer_alive(log: str | Path) -> bool:
    """Whether a RunLogWriter holds the log's lock now (the run is still being written).

    Asks by taking the lock without waiting and letting it go at once; a writer starting in that moment
    waits for it (ACQUIRE_TIMEOUT_S). No lock file: no writer (a writer creates it before it writes).
    """
    path = lock_path(log)
    if not path.exists():
        return False
    filelock = _filelock()
    probe = filelock.FileLock(os.fspath(path), timeout=0, thread_local=False)
    try:
        probe.acquire()
    except filelock.Timeout:
        return True
    except OSError:
        return False   # a lock file this user cannot open: not a writer of this user's, and nothing to say
    probe.release(force=True)
    return False
