"""The emulated tester's brain without any IO: messages in, reply bytes out (sans-IO; fuzzable).

`Emulator` wraps any ArrayDriver (a MockDriver by default) and answers the wire protocol with the shared
protocol table; it never evaluates what it receives: bad input becomes an error-queue entry (or the
`!<code>,"<message>"` reply of a failed query). drivers/server.py puts it behind a socket or a pty.

Program ids must increase: every id not greater than the last applied one is refused (102). With a state
file, each applied program is on disk (drivers/emulator_state.py: appended to the ledger, fsynced) before
its reply leaves, so PROG:LAST? after a crash of the emulator itself still names every acknowledged program.

Fault injection (seeded, per query, for tests): lose (close the connection on receipt, before the
command runs), drop (close the connection instead of replying, after the command has run), delay
(reply after `delay_s`), corrupt (flip one byte of the reply), error (refuse with instrument error
200 without running the command).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sim.platform_memory import physical_memory_bytes  # re-exported: drivers.server

from . import protocol as P
from .base import ArrayDriver
from .emulator_state import (DEFAULT_READ_VOLTAGE_V, MIN_SNAPSHOT_LEDGER_BYTES, Ledger, SavedState, encode_record,
                             ledger_path, load_state, read_records, rng_state, save_state, set_rng_state)
from .errors import AddressError, DriverError, ProgramError, ProtocolError, SafetyViolation
from .mock import MockDriver
from .program import PulseProgram, PulseShapes

ERROR_QUEUE_LENGTH = 32
READ_VOLTAGE_RANGE_V = (0.01, 1.0)
FIRMWARE = "emulator-1"
#: What *OPT? answers: the optional commands (drivers.protocol.OPTIONAL_COMMANDS) this emulator serves.
OPTIONS = ",".join(P.OPTIONAL_COMMANDS)
#: Host memory one emulated device takes, bytes: the simulated chip (24) and the lifetime ledgers (8), and
#: a whole-array program or full read in flight (receive buffer, parser, decoded arrays, reply); a
#: 2,000,000-device emulator peaked at 67 bytes per device above its base.
BYTES_PER_DEVICE = 96
#: Most devices an emulated array may have: a program touching every device must fit one block.
MAX_DEVICES = (P.MAX_BLOCK_BYTES - 64) // 7
log = logging.getLogger(__name__)


def check_size(rows: int, cols: int, memory_bytes: int | None = None) -> None:
    """Raise ValueError, before anything is allocated, if a rows x cols emulator cannot be served: more devices
    than one block can program, or more memory (BYTES_PER_DEVICE each) than this machine has (memory_bytes;
    default: physical memory, where the system reports it)."""
    n = rows * cols
    if n > MAX_DEVICES:
        raise ValueError(f"a {rows} x {cols} array has {n:,} devices; the wire protocol serves at most {MAX_DEVICES:,} "
                         "(a program touching every device must fit one block)")
    if memory_bytes is None:
        memory_bytes = physical_memory_bytes()
    need = n * BYTES_PER_DEVICE
    if memory_bytes is not None and need > memory_bytes:
        raise ValueError(f"a {rows} x {cols} array ({n:,} devices) needs about {need / 1e9:,.1f} GB of memory "
                         f"({BYTES_PER_DEVICE} bytes per device); this machine has {memory_bytes / 1e9:,.1f} GB")


class Fault(enum.Enum):
    LOSE = "lose"
    DROP = "drop"
    DELAY = "delay"
    CORRUPT = "corrupt"
    ERROR = "error"


class FaultPlan(BaseModel):
    """Per-query probability of each injected fault, drawn from its own seeded generator."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    lose: float = Field(0.0, ge=0, le=1, description="Close the link on receipt, before the command runs.")
    drop: float = Field(0.0, ge=0, le=1, description="Close the link instead of replying (the command ran).")
    delay: float = Field(0.0, ge=0, le=1, description="Reply only after delay_s (the command ran).")
    corrupt: float = Field(0.0, ge=0, le=1, description="Flip one byte of the reply (the command ran).")
    error: float = Field(0.0, ge=0, le=1, description="Refuse with instrument error 200 (the command did not run).")
    delay_s: float = Field(1.0, ge=0, description="How late a delayed reply comes, s.")
    seed: int = 0

    @property
    def any(self) -> bool:
        return self.lose + self.drop + self.delay + self.corrupt + self.error > 0


@dataclass
class Response:
    """What the IO loop must do after one message."""

    data: bytes | None
    fault: Fault | None = None


class Emulator:
    """The tester's brain without any IO: messages in, reply bytes out (sans-IO; fuzzable)."""

    def __init__(self, driver: ArrayDriver, *, faults: FaultPlan | None = None, state_path: str | Path | None = None,
                 serial: str = "0") -> None:
        self.driver = driver
        self.faults = faults or FaultPlan()
        self._fault_rng = np.random.default_rng(self.faults.seed)
        self.state_path = Path(state_path) if state_path is not None else None
        self.serial = serial
        self.errors: list[str] = []
        self.read_voltage_v = DEFAULT_READ_VOLTAGE_V
        self.last_program_id: int | None = driver.last_program_id()
        self.last_shapes = PulseShapes()
        self.commands_seen = 0
        #: Queries that drew each injected fault so far, by kind (Fault.value), and queries that drew at all.
        self.fault_counts = {f.value: 0 for f in Fault}
        self.queries_drawn = 0
        # Open once a snapshot exists to append to (restored, or written by save()); until then the first
        # applied program writes a snapshot instead.
        self._ledger: Ledger | None = None
        self._snapshot_bytes = 0
        #: Programs the last restore re-applied from the ledger on top of the snapshot.
        self.replayed_programs = 0
        if self.state_path is not None and self.state_path.exists():
            self._restore(load_state(self.state_path))
        # Largest legitimate block: a program touching every device.
        self.max_block = 64 + 7 * driver.geometry.n_devices

    def set_faults(self, faults: FaultPlan) -> None:
        """Change the injected-fault plan (its generator restarts from faults.seed)."""
        self.faults = faults
        self._fault_rng = np.random.default_rng(faults.seed)

    # ------------------------------------------------------------------ identity
    @property
    def identity(self) -> str:
        return f"pcm-hil,emulator,{self.serial},{FIRMWARE} ({self.driver.identity.replace(',', ';')})"

    # ------------------------------------------------------------------ error queue
    def push_error(self, code: int, message: str) -> None:
        if len(self.errors) >= ERROR_QUEUE_LENGTH:
            self.errors[-1] = P.format_error(P.ErrorCode.QUEUE_OVERFLOW, "Queue overflow")
            return
        self.errors.append(P.format_error(code, message))

    # ------------------------------------------------------------------ dispatch
    def handle(self, item: P.Message | P.Malformed) -> Response:
        """Run one message; the reply bytes (None for commands), and an injected fault if drawn."""
        self.commands_seen += 1
        if isinstance(item, P.Malformed):
            self.push_error(P.ErrorCode.COMMAND_ERROR, item.reason)
            return Response(None)
        cmd = P.COMMANDS.get(item.header.upper())
        is_query = item.header.endswith("?")
        try:
            if cmd is None:
                raise _Refused(P.ErrorCode.UNDEFINED_HEADER, f"undefined header {item.header[:64]!r}")
            self._check_argument(cmd, item)
            fault = self._draw_fault() if cmd.reply is not P.Reply.NONE else None
            if fault is Fault.ERROR:
                raise _Refused(P.ErrorCode.INJECTED_FAULT, "injected fault")
            if fault is Fault.LOSE:
                return Response(None, fault)
            data = self._run(cmd, item)
        except _Refused as e:
            if is_query:
                return Response(P.error_reply(e.code, e.message))
            self.push_error(e.code, e.message)
            return Response(None)
        if data is None:
            return Response(None)
        if fault is Fault.CORRUPT:
            data = self._corrupt(data)
        return Response(data, fault)

    def _check_argument(self, cmd: P.Command, m: P.Message) -> None:
        if cmd.arg is P.Arg.NONE and (m.text is not None or m.block is not None):
            raise _Refused(P.ErrorCode.PARAMETER_NOT_ALLOWED, f"{cmd.header} takes no parameter")
        if cmd.arg is P.Arg.TEXT and m.text is None:
            raise _Refused(P.ErrorCode.MISSING_PARAMETER, f"{cmd.header} needs a text parameter")
        if cmd.arg is P.Arg.BLOCK and m.block is None:
            raise _Refused(P.ErrorCode.MISSING_PARAMETER, f"{cmd.header} needs a block parameter")
        if m.block is not None and len(m.block) > self.max_block:
            raise _Refused(P.ErrorCode.BLOCK_DATA_ERROR, f"block of {len(m.block)} bytes is larger than any "
                           f"request to this {self.driver.geometry.rows}x{self.driver.geometry.cols} array")

    def _draw_fault(self) -> Fault | None:
        f = self.faults
        if not f.any:
            return None
        self.queries_drawn += 1
        u = self._fault_rng.random()
        for kind, p in ((Fault.LOSE, f.lose), (Fault.DROP, f.drop), (Fault.DELAY, f.delay), (Fault.CORRUPT, f.corrupt), (Fault.ERROR, f.error)):
            if u < p:
                self.fault_counts[kind.value] += 1
                return kind
            u -= p
        return None

    def fault_summary(self) -> str:
        """One line: injected faults per kind out of the queries that drew (delayed replies cost delay_s each)."""
        kinds = ", ".join(f"{k} {n:,}" for k, n in self.fault_counts.items())
        return (f"injected faults: {kinds} (of {self.queries_drawn:,} queries; delays of {self.faults.delay_s:g} s: "
                f"{self.fault_counts[Fault.DELAY.value] * self.faults.delay_s:.1f} s in all)")

    def _corrupt(self, data: bytes) -> bytes:
        b = bytearray(data)
        i = int(self._fault_rng.integers(len(b)))
        b[i] ^= int(self._fault_rng.integers(1, 256))
        return bytes(b)

    def _run(self, cmd: P.Command, m: P.Message) -> bytes | None:
        h = cmd.header
        d = self.driver
        try:
            if h == "*IDN?":
                return _line(self.identity)
            if h == "*RST":
                self.read_voltage_v = DEFAULT_READ_VOLTAGE_V
                self.errors.clear()
                return None
            if h == "*CLS":
                self.errors.clear()
                return None
            if h == "*OPC?":
                return b"1\n"
            if h == "*OPT?":
                return _line(OPTIONS)
            if h == "SYST:ERR?":
                return _line(self.errors.pop(0) if self.errors else P.NO_ERROR)
            if h == "SYNC?":
                return self._sync(m.text or "")
            if h == "GEOM?":
                return _line(f"{d.geometry.rows},{d.geometry.cols}")
            if h == "LIM?":
                return _line(d.limits.model_dump_json())
            if h == "TIME?":
                return _line(repr(float(d.now())))
            if h == "READ:VOLT":
                self._set_read_voltage(m.text or "")
                return None
            if h == "READ:VOLT?":
                return _line(repr(self.read_voltage_v))
            if h == "PULS:SHAP?":
                return _line(self.last_shapes.model_dump_json())
            if h == "READ?":
                r = d.read(P.decode_addresses(m.block or b""))
                return P.encode_block(P.encode_read_reply(r.t_s, r.conductances_us)) + b"\n"
            if h == "READ:ALL?":
                r = d.read(None)
                return P.encode_block(P.encode_read_reply(r.t_s, r.conductances_us)) + b"\n"
            if h == "PROG:APPL?":
                return self._apply(m.block or b"")
            if h == "PROG:APPL:READ?":
                return self._apply(m.block or b"", read_back=True)
            if h == "PROG:LAST?":
                return _line(str(self.last_program_id or 0))
            if h == "LIFE?":
                addr = d.geometry.check_addresses(P.decode_addresses(m.block or b""), unique=False)
                return P.encode_block(P.encode_counts(d.lifetime_pulses[addr])) + b"\n"
            if h == "LIFE:ALL?":
                return P.encode_block(P.encode_counts(d.lifetime_pulses)) + b"\n"
        except P.BlockError as e:
            raise _Refused(P.ErrorCode.BLOCK_DATA_ERROR, str(e)) from None
        except AddressError as e:
            raise _Refused(P.ErrorCode.DATA_OUT_OF_RANGE, str(e)) from None
        except SafetyViolation as e:
            raise _Refused(P.ErrorCode.SAFETY_LIMIT, str(e)) from None
        except (ProgramError, ProtocolError) as e:
            raise _Refused(P.ErrorCode.DATA_TYPE_ERROR, str(e)) from None
        except DriverError as e:
            raise _Refused(P.ErrorCode.DEVICE_ERROR, str(e)) from None
        except (ArithmeticError, ValueError, TypeError, IndexError, KeyError) as e:
            # The array behind the emulator failed on this input: report it and keep serving.
            raise _Refused(P.ErrorCode.DEVICE_ERROR, f"{type(e).__name__}: {e}") from None
        raise _Refused(P.ErrorCode.UNDEFINED_HEADER, f"{h} has no handler")  # table and handlers disagree

    def _sync(self, token: str) -> bytes:
        if not 1 <= len(token) <= 64 or not token.isascii() or not token.isalnum():
            raise _Refused(P.ErrorCode.DATA_TYPE_ERROR, "SYNC? token must be 1..64 ASCII letters or digits")
        return _line(token)

    def _set_read_voltage(self, text: str) -> None:
        try:
            v = float(text)
        except ValueError:
            raise _Refused(P.ErrorCode.DATA_TYPE_ERROR, f"read voltage must be a number, got {text[:32]!r}") from None
        lo, hi = READ_VOLTAGE_RANGE_V
        if not lo <= v <= hi:
            raise _Refused(P.ErrorCode.DATA_OUT_OF_RANGE, f"read voltage {v} V is outside [{lo}, {hi}] V")
        self.read_voltage_v = v

    def _apply(self, payload: bytes, read_back: bool = False) -> bytes:
        """PROG:APPL? (the id as text) or, with read_back, PROG:APPL:READ? (one block: id, clock, read-back)."""
        program = P.decode_program(payload)
        last = self.last_program_id or 0
        # Every id not after the last applied one is refused, not only an equal one: a client resending an
        # older program (a lost journal tail, a second client) would otherwise apply pulses twice.
        if program.program_id <= last:
            raise _Refused(P.ErrorCode.ALREADY_APPLIED,
                           f"program {program.program_id} is not after the last applied program {last}; not applied")
        d = self.driver
        t_s = d.now()
        if self._ledger is not None and isinstance(d, MockDriver):
            return self._apply_logged(program, payload, t_s, read_back)
        # What re-applying this program after a crash needs besides the program: reads since the last program
        # moved the clock and drew read noise, and nothing else records that.
        rng = rng_state(d.chip) if self.state_path is not None and isinstance(d, MockDriver) else None
        d.apply(program)
        self.last_program_id = program.program_id
        self.last_shapes = program.shapes
        # Durable before acknowledged: a crash after this point still answers PROG:LAST? right.
        try:
            self._persist(payload, t_s, rng, read_back)
        except (OSError, DriverError) as e:
            # The program did run; saying otherwise would invite a second application.
            self.push_error(P.ErrorCode.DEVICE_ERROR, f"program {program.program_id} applied but not saved: {e}")
        return self._apply_reply(program, t_s, read_back)

    def _apply_reply(self, program: PulseProgram, t_s: float, read_back: bool) -> bytes:
        if not read_back:
            return _line(str(program.program_id))
        r = self.driver.read(program.addresses)
        reply = P.encode_apply_read_reply(program.program_id, t_s, r.t_s, r.conductances_us)
        return P.encode_block(reply) + b"\n"

    def _apply_logged(self, program: PulseProgram, payload: bytes, t_s: float, read_back: bool) -> bytes:
        """_apply with a ledger: the record goes to disk while the chip applies the program and reads it back.

        The record (program, clock, RNG state) is complete before the program runs, so this thread writes and
        fdatasyncs it while the ledger's worker thread applies the program and makes the reply
        (Ledger.append_while), and the reply leaves once both are done: durable before acknowledged, as ever,
        at about the cost of the longer of the two instead of their sum. The program is checked first, so a
        refused one is never recorded."""
        d = self.driver
        assert self._ledger is not None and isinstance(d, MockDriver)
        d.check_program(program)
        record = encode_record(payload, t_s, rng_state(d.chip), self.read_voltage_v, read_back)

        def run() -> bytes:
            d._apply_checked(program)  # noqa: SLF001 - check_program passed just above
            self.last_program_id = program.program_id
            self.last_shapes = program.shapes
            return self._apply_reply(program, t_s, read_back)

        reply, failed = self._ledger.append_while(record, run)
        if failed is not None:
            # The program did run; saying otherwise would invite a second application.
            self.push_error(P.ErrorCode.DEVICE_ERROR, f"program {program.program_id} applied but not saved: {failed}")
            return reply
        if self._ledger.size >= max(self._snapshot_bytes, MIN_SNAPSHOT_LEDGER_BYTES):
            try:
                self.save()
            except (OSError, DriverError) as e:
                self.push_error(P.ErrorCode.DEVICE_ERROR, f"program {program.program_id} applied but not saved: {e}")
        return reply

    def _persist(self, payload: bytes, t_s: float, rng: dict | None, read_back: bool) -> None:
        """Append the applied program to the ledger (fsynced), or snapshot when there is none or it has grown."""
        if self.state_path is None:
            return
        if self._ledger is None or rng is None:
            self.save()
            return
        self._ledger.append(encode_record(payload, t_s, rng, self.read_voltage_v, read_back))
        if self._ledger.size >= max(self._snapshot_bytes, MIN_SNAPSHOT_LEDGER_BYTES):
            self.save()

    # ------------------------------------------------------------------ state
    def save(self) -> None:
        """Snapshot the state (if a state file is set) atomically, then empty the ledger it now holds.

        Only a MockDriver's chip can be saved."""
        if self.state_path is None:
            return
        d = self.driver
        if not isinstance(d, MockDriver):
            raise DriverError(f"--state needs a MockDriver, this emulator wraps {type(d).__name__}")
        if self._ledger is not None:
            self._ledger.settle()  # no program half-way through the worker thread
        self._snapshot_bytes = save_state(self.state_path, SavedState(
            d.chip, d.now(), self.last_program_id, np.asarray(d.lifetime_pulses), self.read_voltage_v,
            self.last_shapes))
        # Emptied only once the snapshot is in place: a crash in between leaves records the snapshot already
        # holds, which a restore skips by their ids.
        if self._ledger is None:
            self._ledger = Ledger(ledger_path(self.state_path))
        self._ledger.truncate(0)

    def close(self) -> None:
        """Release the ledger file (the state stays as the last save or append left it)."""
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def _restore(self, s: SavedState) -> None:
        d = self.driver
        if not isinstance(d, MockDriver):
            raise DriverError(f"--state needs a MockDriver, this emulator wraps {type(d).__name__}")
        if s.chip.n_devices != d.geometry.n_devices:
            raise DriverError(f"state file {self.state_path} holds {s.chip.n_devices} devices, the emulator has "
                              f"{d.geometry.n_devices}")
        d.chip = s.chip
        d._t = max(s.t_s, s.chip.now)  # noqa: SLF001 - same package; the mock's clock resumes where it was saved
        d._lifetime_pulses[:] = s.lifetime  # noqa: SLF001 - the endurance ledger survives restarts
        d._last_id = s.last_program_id  # noqa: SLF001 - the mock's own PROG:LAST? as the snapshot left it
        self.last_program_id = s.last_program_id
        self.read_voltage_v = s.read_voltage_v
        if s.last_shapes is not None:
            self.last_shapes = s.last_shapes
        assert self.state_path is not None
        path = ledger_path(self.state_path)
        data = path.read_bytes() if path.exists() else b""
        records, good = read_records(data)
        for rec in records:
            if rec.program.program_id <= (self.last_program_id or 0):
                continue  # in the snapshot already (a crash came between the snapshot and emptying the ledger)
            d._t = rec.t_s  # noqa: SLF001 - the clock and RNG as they were just before the program first ran
            set_rng_state(d.chip, rec.rng)
            d._apply_checked(rec.program)  # noqa: SLF001 - accepted when it first ran; books the lifetime counts
            if rec.read_back:
                d.read(rec.program.addresses)  # PROG:APPL:READ?'s read-back moved the clock and drew noise too
            self.last_program_id = rec.program.program_id
            self.last_shapes = rec.program.shapes
            self.read_voltage_v = rec.read_voltage_v
            self.replayed_programs += 1
        self._ledger = Ledger(path, size=good)
        if any(data[good:]):
            # Only the last record can be short (each is fsynced before the next is written), and it was never
            # acknowledged; cut it off so that new records follow whole ones.
            log.warning("%s: %d bytes after the last whole record dropped (a write cut short by a crash)", path,
                        len(data.rstrip(b"\0")) - good)
            self._ledger.truncate(good)
        log.info("restored %s: snapshot up to program %s, %d programs re-applied from %s", self.state_path,
                 s.last_program_id, self.replayed_programs, path.name)


class _Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message


def _line(text: str) -> bytes:
    return text.encode("ascii", "replace") + b"\n"
