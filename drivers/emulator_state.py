"""The emulated tester's state on disk: a snapshot file plus an append-only ledger of applied programs.

`pcm-hil emulator --state FILE`: FILE is a snapshot (one .npz, sim/files.py: atomic replacement, JSON header)
of the chip (PCMArray.to_bytes, its RNG included), its clock, the last applied program id, the read voltage,
the last pulse shapes and the lifetime counts. FILE.ledger holds every program applied since that snapshot,
one record each, appended and fdatasynced before the tester acknowledges the program (written while the chip
applies it: Ledger.append_while). A restart loads the
snapshot and re-applies the ledger's programs in order; each record carries the chip's clock and RNG state
just before its program ran, so re-applying reproduces the chip bit for bit, however many reads (which
move the clock and draw read noise) came between the programs. A snapshot is written when the ledger has
grown as large as the snapshot (so the amortized cost per program is a few times its record, not the
chip), at start and at shutdown; then the ledger is emptied.

Ledger record: `u32 length` of the body, the body, `u32 CRC32` of the body. Body: `u32 m`, m bytes of JSON
(`t_s`: the chip clock as the program started, s; `rng`: the PCG64 state; `read_voltage_v`; `read_back`:
the program came with PROG:APPL:READ?, whose read-back a restore repeats for its clock and noise draws), then the
program payload exactly as it travels (drivers/protocol.py, with its own CRC). A crash can leave only the
last record short (each is fsynced before the next is written); it was never acknowledged and is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

from sim import PCMArray
from sim.files import npz_bytes, read_npz, write_atomic
from sim.platform_fs import O_BINARY, pwrite, sync_folder

from . import protocol as P
from .errors import DriverError
from .program import PulseProgram, PulseShapes

STATE_FORMAT = "pcm-hil-emulator-state"
STATE_VERSION = 1
DEFAULT_READ_VOLTAGE_V = 0.2
LEDGER_SUFFIX = ".ledger"
#: The smallest ledger (bytes) that triggers a snapshot, whatever the snapshot's size: a tiny chip's snapshot
#: would otherwise be rewritten every few programs.
MIN_SNAPSHOT_LEDGER_BYTES = 1 << 20
_U32 = struct.Struct("<I")
log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class SavedState:
    """What the snapshot holds (lifetime: pulses per device, int64; t_s: the chip clock, s)."""

    chip: PCMArray
    t_s: float
    last_program_id: int | None
    lifetime: np.ndarray
    read_voltage_v: float
    last_shapes: PulseShapes | None = None


def save_state(path: Path, s: SavedState) -> int:
    """One .npz holding the chip (PCMArray.to_bytes), clock, last program id, lifetime counts; atomic.

    Returns the bytes written."""
    meta: dict[str, Any] = {"format": STATE_FORMAT, "version": STATE_VERSION, "t_s": s.t_s,
                            "last_program_id": s.last_program_id, "read_voltage_v": s.read_voltage_v}
    if s.last_shapes is not None:
        meta["last_shapes"] = s.last_shapes.model_dump()
    chip = np.frombuffer(s.chip.to_bytes(), np.uint8)
    data = npz_bytes(meta, {"chip": chip, "lifetime": np.asarray(s.lifetime, np.int64)})
    write_atomic(path, data)
    return len(data)


def load_state(path: Path) -> SavedState:
    """The snapshot alone (no ledger applied): see Emulator for the state a restart resumes from."""
    try:
        meta, arrays = read_npz(path)
        chip = PCMArray.from_bytes(arrays["chip"].tobytes(), f"{path} (chip)")
        lifetime = np.asarray(arrays["lifetime"], np.int64)
    except Exception as e:  # any unreadable file is one clear error
        raise DriverError(f"{path} is not a readable emulator state file: {e}") from e
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise DriverError(f"{path} has format {meta.get('format')!r} version {meta.get('version')!r}, expected "
                          f"{STATE_FORMAT!r} version {STATE_VERSION}")
    if lifetime.shape != (chip.n_devices,):
        raise DriverError(f"{path}: lifetime counts for {lifetime.size} devices, chip has {chip.n_devices}")
    pid = meta.get("last_program_id")
    shapes = meta.get("last_shapes")
    return SavedState(chip, float(meta["t_s"]), None if pid is None else int(pid), lifetime,
                      float(meta.get("read_voltage_v", DEFAULT_READ_VOLTAGE_V)),
                      None if shapes is None else PulseShapes.model_validate(shapes))


# ---------------------------------------------------------------------------- the chip's RNG
# sim.PCMArray keeps its generator private; the ledger needs its exact position before each program, and
# this package is the only one that replays programs onto a chip.
def rng_state(chip: PCMArray) -> dict[str, Any]:
    """The chip's PCG64 state (JSON-able; two 128-bit integers and a buffered word)."""
    return chip._rng.bit_generator.state  # noqa: SLF001 - see above


def set_rng_state(chip: PCMArray, state: dict[str, Any]) -> None:
    chip._rng.bit_generator.state = state  # noqa: SLF001 - see above


# ---------------------------------------------------------------------------- the ledger
@dataclass(frozen=True)
class LedgerRecord:
    """One applied program and what the chip model needs to apply it again exactly (t_s in s)."""

    program: PulseProgram
    t_s: float
    rng: dict[str, Any]
    read_voltage_v: float
    read_back: bool = False


def encode_record(program_payload: bytes, t_s: float, rng: dict[str, Any], read_voltage_v: float,
                  read_back: bool = False) -> bytes:
    """One ledger record around a program payload (as drivers.protocol.encode_program makes it)."""
    meta = json.dumps({"t_s": t_s, "rng": rng, "read_voltage_v": read_voltage_v, "read_back": read_back},
                      separators=(",", ":")).encode()
    body = _U32.pack(len(meta)) + meta + program_payload
    return _U32.pack(len(body)) + body + _U32.pack(zlib.crc32(body))


def read_records(data: bytes) -> tuple[list[LedgerRecord], int]:
    """The whole records at the start of data, and the byte length they take (where a short or bad one starts)."""
    out: list[LedgerRecord] = []
    end = 0
    for record, stop in _records(data):
        out.append(record)
        end = stop
    return out, end


def _records(data: bytes) -> Iterator[tuple[LedgerRecord, int]]:
    at = 0
    while at + 4 <= len(data):
        (n,) = _U32.unpack_from(data, at)
        stop = at + 4 + n + 4
        if n < 4 or stop > len(data):
            return
        body = data[at + 4:at + 4 + n]
        if zlib.crc32(body) != _U32.unpack_from(data, stop - 4)[0]:
            return
        (m,) = _U32.unpack_from(body, 0)
        try:
            meta = json.loads(body[4:4 + m])
            program = P.decode_program(bytes(body[4 + m:]))
            record = LedgerRecord(program, float(meta["t_s"]), meta["rng"], float(meta["read_voltage_v"]),
                                  bool(meta.get("read_back", False)))
        except (ValueError, KeyError, TypeError, DriverError):
            return
        yield record, stop
        at = stop


class Ledger:
    """FILE.ledger: records appended after the last, each on disk (fdatasync) before the tester acknowledges it.

    The file is kept ZERO_AHEAD bytes of written zeros longer than its records: a record then overwrites
    blocks the file already has, and its fdatasync need not commit a new file size or extent as well (about
    a third cheaper per program here). A zero length word ends the records.

    append_while() makes a record durable while a worker thread runs the program and makes its reply: the
    calling thread waits in fdatasync (0.1-4 ms on the shared test machine's disk) with the interpreter lock
    released, so the two overlap instead of adding up. Nothing is acknowledged before both are done, so every
    acknowledged program is on disk as before. A record on disk whose program was never acknowledged (a crash
    between the two) is re-applied by a restore, as a crash between the fdatasync and the reply always did:
    the host asks PROG:LAST? and learns that it ran.
    """

    ZERO_AHEAD = 1 << 20

    def __init__(self, path: Path, size: int | None = None) -> None:
        """Open (or create) path; size: where the records end (default: the file's length)."""
        self.path = path
        new = not path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | O_BINARY, 0o644)
        self._length = os.fstat(self._fd).st_size
        self.size = self._length if size is None else size
        if new:
            _fsync_folder(path)  # the file's name must survive a power cut as well as its records
        # append_while's worker thread (started at its first use) and its hand-off: two locks as binary semaphores
        self._worker: threading.Thread | None = None
        self._go = threading.Lock()
        self._done = threading.Lock()
        self._go.acquire()
        self._done.acquire()
        self._work: Callable[[], Any] | None = None
        self._result: Any = None
        self._error: BaseException | None = None
        self._busy = False

    def append(self, record: bytes) -> None:
        """Write record after the last and return once it is on disk."""
        self._write(record, self.size)
        self.size += len(record)

    def append_while(self, record: bytes, work: Callable[[], T]) -> tuple[T, OSError | None]:
        """Write record after the last and make it durable while work() runs in the ledger's worker thread.

        Returns once both are done: work()'s result, and the error that kept the record off the disk (None
        when it is on disk). If work() raises, the record is taken back (durably) and the error propagates: a
        record must not outlive a program that did not run."""
        at = self.size
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve, name=f"ledger {self.path.name}", daemon=True)
            self._worker.start()
        self._work, self._result, self._error = work, None, None
        self._busy = True
        self._go.release()  # the worker starts work() now and runs it while this thread waits in fdatasync
        failed: OSError | None = None
        try:
            self._write(record, at)
        except OSError as e:
            failed = e
        finally:
            self.settle()
        result, error = self._result, self._error
        self._work = self._result = self._error = None
        if error is not None:
            if failed is None:
                self._discard(at, len(record))
            raise error
        if failed is None:
            self.size = at + len(record)
        return result, failed  # type: ignore[return-value]

    def settle(self) -> None:
        """Wait for append_while's work if it is still running (an interrupt can leave it so): snapshots and
        close() must not see a chip that is half-way through a program."""
        if self._busy:
            self._done.acquire()
            self._busy = False

    def _discard(self, at: int, length: int) -> None:
        pwrite(self._fd, bytes(length), at)
        _datasync(self._fd)

    def _serve(self) -> None:
        while True:
            self._go.acquire()
            work = self._work
            if work is None:  # close()
                self._done.release()
                return
            try:
                self._result = work()
            except BaseException as e:  # noqa: BLE001 - handed to append_while, which raises it in its thread
                self._error = e
            self._done.release()

    def _write(self, record: bytes, at: int) -> None:
        end = at + len(record)
        if end + 4 > self._length:
            self._zero_to(end + 4 + self.ZERO_AHEAD)
        view = memoryview(record)
        while view:
            n = pwrite(self._fd, view, at)
            view, at = view[n:], at + n
        _datasync(self._fd)

    def truncate(self, size: int = 0) -> None:
        """Cut the records to size bytes (0: none, once a snapshot holds everything), durably."""
        self.settle()
        os.ftruncate(self._fd, size)
        self._length = size
        self.size = size
        self._zero_to(size + self.ZERO_AHEAD)

    def _zero_to(self, length: int) -> None:
        pwrite(self._fd, bytes(length - self._length), self._length)
        os.fsync(self._fd)
        self._length = length

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._worker is not None:
            self.settle()
            self._work = None
            self._go.release()
            self._done.acquire()
            self._worker.join()
            self._worker = None
        os.close(self._fd)
        self._fd = -1


def ledger_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + LEDGER_SUFFIX)


def _datasync(fd: int) -> None:
    # fdatasync also writes the size an append changed; it skips only the timestamps fsync would add.
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _fsync_folder(path: Path) -> None:
    sync_folder(path.parent)  # POSIX only: Windows cannot open a folder (sim/platform_fs.py)
