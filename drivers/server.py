"""The emulated tester: the wire protocol served in front of any ArrayDriver (MockDriver by default).

`serve(driver, endpoint)` listens on TCP (loopback unless told otherwise) or on a pseudo-terminal,
one client at a time (later clients wait in the listen queue, so a reconnecting client always sees
the effect of everything the previous connection sent). The server parses what it receives with
the shared protocol table and never evaluates it: bad input becomes an error-queue entry (or the
`!<code>,"<message>"` reply of a failed query) and the server keeps serving.

State (`state_path`): the chip (PCMArray.save), the mock clock, the last applied program id and the
lifetime pulse counts are written atomically after every applied program, before its reply leaves,
and on shutdown. Reads are not saved one by one: after a crash, the read-noise generator resumes
from the last save.

Fault injection (seeded, per query, for tests): lose (close the connection on receipt, before the
command runs), drop (close the connection instead of replying, after the command has run), delay (reply after `delay_s`), corrupt (flip one byte of the reply),
error (refuse with instrument error 200 without running the command).
"""

from __future__ import annotations

import enum
import os
import select
import socket
import sys
import threading
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sim import PCMArray
from sim.files import npz_bytes, read_npz, write_atomic

from . import protocol as P
from .base import ArrayDriver
from .errors import AddressError, DriverError, ProgramError, ProtocolError, SafetyViolation
from .mock import MockDriver
from .program import PulseShapes

STATE_FORMAT = "pcm-hil-emulator-state"
STATE_VERSION = 1
ERROR_QUEUE_LENGTH = 32
DEFAULT_READ_VOLTAGE_V = 0.2
READ_VOLTAGE_RANGE_V = (0.01, 1.0)
FIRMWARE = "emulator-1"


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


@dataclass
class _Saved:
    chip: PCMArray
    t_s: float
    last_program_id: int | None
    lifetime: np.ndarray
    read_voltage_v: float


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
        u = self._fault_rng.random()
        for kind, p in ((Fault.LOSE, f.lose), (Fault.DROP, f.drop), (Fault.DELAY, f.delay), (Fault.CORRUPT, f.corrupt), (Fault.ERROR, f.error)):
            if u < p:
                return kind
            u -= p
        return None

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

    def _apply(self, payload: bytes) -> bytes:
        program = P.decode_program(payload)
        last = self.last_program_id or 0
        # Every id not after the last applied one is refused, not only an equal one: a client resending an
        # older program (a lost journal tail, a second client) would otherwise apply pulses twice.
        if program.program_id <= last:
            raise _Refused(P.ErrorCode.ALREADY_APPLIED,
                           f"program {program.program_id} is not after the last applied program {last}; not applied")
        self.driver.apply(program)
        self.last_program_id = program.program_id
        self.last_shapes = program.shapes
        # Durable before acknowledged: a crash after this point still answers PROG:LAST? right.
        try:
            self.save()
        except (OSError, DriverError) as e:
            # The program did run; saying otherwise would invite a second application.
            self.push_error(P.ErrorCode.DEVICE_ERROR, f"program {program.program_id} applied but not saved: {e}")
        return _line(str(program.program_id))

    # ------------------------------------------------------------------ state
    def save(self) -> None:
        """Write the state file (if any) atomically; only a MockDriver's chip can be saved."""
        if self.state_path is None:
            return
        d = self.driver
        if not isinstance(d, MockDriver):
            raise DriverError(f"--state needs a MockDriver, this emulator wraps {type(d).__name__}")
        save_state(self.state_path, _Saved(d.chip, d.now(), self.last_program_id, np.asarray(d.lifetime_pulses),
                                           self.read_voltage_v))

    def _restore(self, s: _Saved) -> None:
        d = self.driver
        if not isinstance(d, MockDriver):
            raise DriverError(f"--state needs a MockDriver, this emulator wraps {type(d).__name__}")
        if s.chip.n_devices != d.geometry.n_devices:
            raise DriverError(f"state file {self.state_path} holds {s.chip.n_devices} devices, the emulator has "
                              f"{d.geometry.n_devices}")
        d.chip = s.chip
        d._t = max(s.t_s, s.chip.now)  # noqa: SLF001 - same package; the mock's clock resumes where it was saved
        d._lifetime_pulses[:] = s.lifetime  # noqa: SLF001 - the endurance ledger survives restarts
        self.last_program_id = s.last_program_id
        self.read_voltage_v = s.read_voltage_v


class _Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message


def _line(text: str) -> bytes:
    return text.encode("ascii", "replace") + b"\n"


# ---------------------------------------------------------------------------- state file
def save_state(path: Path, s: _Saved) -> None:
    """One .npz holding the chip (PCMArray.to_bytes), clock, last program id, lifetime counts; atomic."""
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "t_s": s.t_s, "last_program_id": s.last_program_id,
            "read_voltage_v": s.read_voltage_v}
    chip = np.frombuffer(s.chip.to_bytes(), np.uint8)
    write_atomic(path, npz_bytes(meta, {"chip": chip, "lifetime": np.asarray(s.lifetime, np.int64)}))


def load_state(path: Path) -> _Saved:
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
    return _Saved(chip, float(meta["t_s"]), None if pid is None else int(pid), lifetime,
                  float(meta.get("read_voltage_v", DEFAULT_READ_VOLTAGE_V)))


# ---------------------------------------------------------------------------- IO loops
@dataclass(frozen=True)
class Endpoint:
    """Where to serve: TCP host:port (port 0 picks a free one) or a new pseudo-terminal."""

    kind: str = "tcp"
    host: str = "127.0.0.1"
    port: int = 5025

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """'pty', 'HOST:PORT' or 'tcp://HOST:PORT'."""
        if text == "pty":
            return cls("pty")
        t = text.removeprefix("tcp://")
        host, sep, port = t.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"endpoint must be 'pty' or HOST:PORT, got {text!r}")
        return cls("tcp", host.strip("[]") or "127.0.0.1", int(port))


@dataclass
class Server:
    """A bound, not yet serving emulator; `address` says where clients connect."""

    emulator: Emulator
    endpoint: Endpoint
    quiet_abandon_s: float = 2.0
    send_timeout_s: float = 30.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _listener: socket.socket | None = None
    _pty: tuple[int, int] | None = None
    address: str = ""

    def bind(self) -> str:
        """Open the listening socket or the pty; returns 'HOST:PORT' or the pty's path."""
        if self.endpoint.kind == "pty":
            master, slave = os.openpty()
            tty.setraw(slave)  # binary-clean, no echo, whatever the client does
            self._pty = (master, slave)
            self.address = os.ttyname(slave)
        else:
            fam = socket.AF_INET6 if ":" in self.endpoint.host else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.endpoint.host, self.endpoint.port))
            s.listen(16)
            self._listener = s
            host, port = s.getsockname()[:2]
            self.address = f"{host}:{port}"
        return self.address

    @property
    def visa_resource(self) -> str:
        """The VISA resource string of a TCP endpoint."""
        host, _, port = self.address.rpartition(":")
        return f"TCPIP::{host}::{port}::SOCKET"

    def stop(self) -> None:
        """Ask serve_forever to return (within about 0.2 s)."""
        self._stop.set()

    def serve_forever(self) -> None:
        if not self.address:
            self.bind()
        try:
            if self._pty is not None:
                self._serve_pty()
            else:
                self._serve_tcp()
        finally:
            self.emulator.save()
            self.close()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._pty is not None:
            for fd in self._pty:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._pty = None

    def _serve_tcp(self) -> None:
        assert self._listener is not None
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.settimeout(0.2)
                self._session(lambda: conn.recv(1 << 20), lambda data: self._send_tcp(conn, data), can_drop=True)

    def _send_tcp(self, conn: socket.socket, data: bytes) -> None:
        # Python's sendall timeout bounds the whole transfer; a big block to a busy client needs more
        # than the short poll timeout used for receiving.
        conn.settimeout(self.send_timeout_s)
        try:
            conn.sendall(data)
        finally:
            conn.settimeout(0.2)

    def _serve_pty(self) -> None:
        assert self._pty is not None
        master = self._pty[0]

        def recv() -> bytes:
            r, _, _ = select.select([master], [], [], 0.2)
            if not r:
                raise TimeoutError
            return os.read(master, 1 << 20)

        def send(data: bytes) -> None:
            view = memoryview(data)
            deadline = time.monotonic() + self.send_timeout_s
            while view:
                if time.monotonic() > deadline or self._stop.is_set():
                    raise TimeoutError("nobody reads the pty")
                _, w, _ = select.select([], [master], [], 0.2)
                if w:
                    view = view[os.write(master, view):]

        while not self._stop.is_set():
            # A pty has no connection to close: a drop fault just loses the reply.
            self._session(recv, send, can_drop=False)

    def _session(self, recv: Callable[[], bytes], send: Callable[[bytes], None], can_drop: bool) -> None:
        """Serve one connection until it closes (TCP) or the server stops."""
        parser = P.MessageParser(max_block=self.emulator.max_block)
        quiet_since = time.monotonic()
        while not self._stop.is_set():
            try:
                data = recv()
            except TimeoutError:
                if parser.pending and time.monotonic() - quiet_since > self.quiet_abandon_s:
                    bad = parser.abandon()
                    if bad is not None:
                        self.emulator.handle(bad)
                continue
            except OSError:
                return
            if not data:
                return
            quiet_since = time.monotonic()
            for item in parser.feed(data):
                r = self.emulator.handle(item)
                if r.fault in (Fault.LOSE, Fault.DROP):
                    if can_drop:
                        return
                    continue
                if r.data is None:
                    continue
                if r.fault is Fault.DELAY:
                    time.sleep(self.emulator.faults.delay_s)
                try:
                    send(r.data)
                except OSError:
                    return


def serve(driver: ArrayDriver | None = None, endpoint: Endpoint | str = "127.0.0.1:5025", *,
          faults: FaultPlan | None = None, state_path: str | Path | None = None,
          on_ready: Callable[[Server], None] | None = None) -> None:
    """Serve the wire protocol in front of driver (a fresh 512x784 MockDriver if None) until stopped.

    on_ready(server) is called once the endpoint is bound (server.address says where).
    """
    ep = Endpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
    drv = driver if driver is not None else MockDriver(512, 784)
    server = Server(Emulator(drv, faults=faults, state_path=state_path), ep)
    server.bind()
    if on_ready is not None:
        on_ready(server)
    server.serve_forever()


def print_ready(server: Server) -> None:
    """The documented ready line on stdout: `LISTENING tcp HOST:PORT` or `LISTENING pty PATH`."""
    print(f"LISTENING {server.endpoint.kind} {server.address}", flush=True)
    sys.stdout.flush()
