"""TesterDriver: the driver contract spoken over the wire protocol (drivers/protocol.py).

One round trip per read and per program, whatever their size. Reads and status queries are
retried after a link failure (reconnect, then SYNC? to skip any stale reply) and after error 200
(the tester did not run the command). A program is applied exactly once: if the link fails while it
is in flight, the driver reconnects, syncs, asks PROG:LAST? until two answers in a row agree, and
re-sends only if the tester did not apply it; a program refused with 200 or -160 never ran and is
sent again.
"""

from __future__ import annotations

import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import numpy.typing as npt

from . import protocol as P
from .base import ArrayDriver
from .errors import Disconnected, DriverError, DriverTimeout, InstrumentError, ProtocolError
from .program import Geometry, PulseProgram, ReadResult
from .safety import SafetyLimits
from .transport import SerialTransport, Transport, VisaTransport, is_serial_url

_LINK_ERRORS = (DriverTimeout, Disconnected, ProtocolError)
#: Instrument errors that say the command did not run, so sending it again is safe and may succeed.
_NOT_RUN = (P.ErrorCode.INJECTED_FAULT,)
#: PROG:LAST? answers asked for at most, per attempt, to get two in a row that agree.
_LAST_ID_ASKS = 4
T = TypeVar("T")


@dataclass
class LinkStats:
    """What the link has done so far (for benchmarks and tests)."""

    round_trips: int = 0
    reconnects: int = 0
    resends: int = 0
    retried_queries: int = 0
    retried_errors: int = 0
    timeouts: int = 0  # replies waited for in vain, a whole timeout each (a closed link is not one)


class TesterDriver(ArrayDriver):
    """An array tester behind a Transport. Geometry, limits and identity come from the tester.

    limits: host-side SafetyLimits; the limits in force are the strictest of these and the tester's own
    (LIM?), field by field, never wider than either. retries: link failures and not-run errors (200)
    tolerated per operation. sync_timeout_s: how long recovery waits for stale replies to end
    (default 4x the transport timeout). seed_lifetime: fill the endurance ledger from LIFE:ALL?.
    """

    def __init__(self, transport: Transport, *, limits: SafetyLimits | None = None, retries: int = 5,
                 sync_timeout_s: float | None = None, seed_lifetime: bool = True) -> None:
        self._transport = transport
        self._retries = int(retries)
        self._sync_timeout_s = sync_timeout_s
        self.stats = LinkStats()
        try:
            self._identity = self._query_text("*IDN?")
            geometry = self._query_text("GEOM?", parse=_parse_geometry)
            tester_limits = self._tester_limits(limits)
            # The host's limits may only narrow the tester's: a config cannot widen what the tester allows.
            in_force = limits.intersect(tester_limits) if limits is not None else tester_limits
        except BaseException:
            transport.close()
            raise
        super().__init__(geometry, in_force)
        self.tester_limits = tester_limits
        if seed_lifetime:
            self._lifetime_pulses[:] = self._query_block("LIFE:ALL?", parse=self._counts_of(geometry.n_devices))

    def _tester_limits(self, host_limits: SafetyLimits | None) -> SafetyLimits:
        """The tester's LIM?; a tester without it (error -113) needs limits given on the host."""
        try:
            return self._query_text("LIM?", parse=_parse_limits)
        except InstrumentError as e:
            if e.code != P.ErrorCode.UNDEFINED_HEADER:
                raise
            if host_limits is None:
                raise DriverError("the tester does not report its safety limits (LIM?): pass limits= to "
                                  "TesterDriver") from e
            return host_limits

    @classmethod
    def open(cls, resource: str, *, timeout_s: float = 5.0, backend: str = "@py", baudrate: int = 115200,
             parity: str = "N", limits: SafetyLimits | None = None, retries: int = 5,
             **transport_kwargs: Any) -> TesterDriver:
        """Connect to a tester by VISA resource string ('TCPIP::127.0.0.1::5025::SOCKET', 'GPIB0::5::INSTR')
        or serial URL ('socket://127.0.0.1:5025', '/dev/ttyUSB0', a pty path, 'COM3', 'loop://').

        timeout_s: per-reply timeout in seconds. backend: pyvisa backend ('@py' = pyvisa-py).
        baudrate, parity: serial settings (serial URLs only).
        """
        t: Transport
        if is_serial_url(resource):
            t = SerialTransport(resource, baudrate=baudrate, parity=parity, timeout_s=timeout_s, **transport_kwargs)
        else:
            t = VisaTransport(resource, backend=backend, timeout_s=timeout_s, **transport_kwargs)
        return cls(t, limits=limits, retries=retries)

    # ------------------------------------------------------------------ description
    @property
    def identity(self) -> str:
        return self._identity

    @property
    def transport(self) -> Transport:
        return self._transport

    # ------------------------------------------------------------------ the contract
    def _read(self, addresses: npt.NDArray[np.int64], whole: bool) -> ReadResult:
        def decode(payload: bytes) -> tuple[float, npt.NDArray[np.float32]]:
            t_s, g = P.decode_read_reply(payload)
            if g.size != addresses.size:
                raise ProtocolError(f"read of {addresses.size} devices answered {g.size} conductances")
            return t_s, g

        if whole:
            t_s, g = self._query_block("READ:ALL?", parse=decode)
        else:
            t_s, g = self._query_block("READ?", block=P.encode_addresses(addresses), parse=decode)
        return ReadResult(addresses, g, t_s)

    def _apply(self, program: PulseProgram) -> None:
        message = P.encode_message("PROG:APPL?", block=P.encode_program(program))
        pid = program.program_id
        last_error: Exception | None = None
        for attempt in range(self._retries + 1):
            if attempt:
                self.stats.resends += 1
            try:
                reply = self._round_trip_text(message, "PROG:APPL?")
            except InstrumentError as e:
                if e.code == P.ErrorCode.BLOCK_DATA_ERROR or e.code in _NOT_RUN:
                    last_error = e  # garbled on the way in, or refused before running: sending it again is safe
                    if e.code in _NOT_RUN:
                        self.stats.retried_errors += 1
                    continue
                if e.code == P.ErrorCode.ALREADY_APPLIED and attempt:
                    self._check_landed(pid, e)
                    return
                raise
            except _LINK_ERRORS as e:
                last_error = e
                if self._applied_after_recovery(pid):
                    return
                continue
            if reply.strip() == str(pid):
                return
            last_error = ProtocolError(f"PROG:APPL? answered {reply[:40]!r}, expected {pid}")
            if self._applied_after_recovery(pid):
                return
        raise Disconnected(f"program {pid} not confirmed after {self._retries + 1} attempts; it was not applied "
                           f"twice, ask last_program_id() whether it landed (last error: {last_error})")

    def _check_landed(self, pid: int, refusal: InstrumentError) -> None:
        """A re-send refused with 102: only our earlier send landing explains it if PROG:LAST? is pid."""
        try:
            last = self._agreed_last_id(lambda: self._query_text("PROG:LAST?", parse=_parse_id),
                                        2 * (self._retries + 1))
        except DriverError as e:
            raise Disconnected(f"program {pid} was refused as not newer than the tester's last ({refusal.message}) "
                               f"and PROG:LAST? could not be learned: {e}") from e
        if last != pid:
            raise InstrumentError(refusal.code, f"program {pid} was re-sent and refused, and the tester's last applied "
                                  f"program is {last}, not {pid}: another client or an earlier run applied programs "
                                  f"up to {last}; program ids must keep increasing", "PROG:APPL?")

    def _applied_after_recovery(self, pid: int) -> bool:
        """Reconnect, sync, and ask the tester whether program pid is the last it applied."""
        once = lambda: _parse_id(self._round_trip_text(P.encode_message("PROG:LAST?"), "PROG:LAST?"))  # noqa: E731
        for _ in range(self._retries + 1):
            try:
                self._recover()
                return self._agreed_last_id(once) == pid
            except (*_LINK_ERRORS, InstrumentError):
                continue
        raise Disconnected(f"cannot learn from the tester whether program {pid} was applied")

    @staticmethod
    def _agreed_last_id(ask: Callable[[], int], asks: int = _LAST_ID_ASKS) -> int:
        """PROG:LAST? (ask) until two answers in a row agree, at most asks times: a text reply has no
        checksum, and one flipped digit ('314' read as '324') would settle a program that never ran."""
        answers: list[int] = []
        for _ in range(asks):
            answers.append(ask())
            if len(answers) >= 2 and answers[-1] == answers[-2]:
                return answers[-1]
        raise ProtocolError(f"PROG:LAST? gave no two agreeing answers in a row: {answers}")

    def _last_program_id(self) -> int | None:
        # Each ask is retried on link errors; a resume settles programs by this answer, so it must be agreed.
        ask = lambda: self._query_text("PROG:LAST?", parse=_parse_id)  # noqa: E731
        return self._agreed_last_id(ask, 2 * (self._retries + 1)) or None

    def _now(self) -> float:
        return self._query_text("TIME?", parse=_parse_seconds)

    def tester_lifetime_pulses(self, addresses: npt.ArrayLike | None = None) -> npt.NDArray[np.int64]:
        """Pulses (SET + RESET) the tester counted per device of addresses (all devices if None)."""
        self._check_open()
        if addresses is None:
            return self._query_block("LIFE:ALL?", parse=self._counts_of(self.geometry.n_devices))
        a = self.geometry.check_addresses(addresses, unique=False)
        return self._query_block("LIFE?", block=P.encode_addresses(a), parse=self._counts_of(a.size))

    @staticmethod
    def _counts_of(n: int) -> Callable[[bytes], npt.NDArray[np.int64]]:
        def decode(payload: bytes) -> npt.NDArray[np.int64]:
            counts = P.decode_counts(payload)
            if counts.size != n:
                raise ProtocolError(f"asked for the lifetime counts of {n} devices, got {counts.size}")
            return counts
        return decode

    def read_voltage(self) -> float:
        """The tester's read voltage, volts."""
        self._check_open()
        return self._query_text("READ:VOLT?", parse=_parse_seconds)

    def set_read_voltage(self, volts: float) -> None:
        """Set the tester's read voltage (V); raises InstrumentError if the tester refuses it."""
        self._check_open()
        self._command(f"READ:VOLT {float(volts)!r}")

    def errors(self) -> list[tuple[int, str]]:
        """Drain the tester's error queue (SYST:ERR?) up to 0,"No error"."""
        self._check_open()
        out = []
        for _ in range(64):
            code, msg = self._query_text("SYST:ERR?", parse=P.parse_error)
            if code == 0:
                break
            out.append((code, msg))
        return out

    def _close(self) -> None:
        self._transport.close()

    # ------------------------------------------------------------------ messages
    def _command(self, text: str) -> None:
        """Send a command that has no reply, then check the error queue (one extra round trip)."""
        header, _, arg = text.partition(" ")
        self._transport.write(P.encode_message(header, text=arg or None))
        code, msg = self._query_text("SYST:ERR?", parse=P.parse_error)
        if code != 0:
            raise InstrumentError(code, msg, header)

    def _query_text(self, header: str, text: str | None = None, parse: Callable[[str], T] = str) -> T:
        """One retried text query; parse turns the reply into a value (ProtocolError if it cannot)."""
        msg = P.encode_message(header, text=text)
        return self._retrying(lambda: parse(self._round_trip_text(msg, header)))

    def _query_block(self, header: str, block: bytes | None = None, parse: Callable[[bytes], T] = bytes) -> T:
        """One retried block query; parse decodes the payload (a bad CRC or length is retried too)."""
        msg = P.encode_message(header, block=block)
        return self._retrying(lambda: parse(self._round_trip_block(msg, header)))

    def _retrying(self, once: Callable[[], T]) -> T:
        """Run an idempotent round trip, recovering the link after each failure and asking again after a
        not-run error (the link is fine then: no reconnect)."""
        for attempt in range(self._retries + 1):
            try:
                return once()
            except InstrumentError as e:
                if e.code not in _NOT_RUN or attempt == self._retries:
                    raise
                self.stats.retried_errors += 1
            except _LINK_ERRORS:
                if attempt == self._retries:
                    raise
                self.stats.retried_queries += 1
                try:
                    self._recover()
                except DriverError:
                    continue
        raise AssertionError("unreachable")

    @contextmanager
    def _counting_timeouts(self) -> Iterator[None]:
        try:
            yield
        except DriverTimeout:
            self.stats.timeouts += 1
            raise

    def _round_trip_text(self, message: bytes, header: str) -> str:
        self.stats.round_trips += 1
        self._transport.write(message)
        with self._counting_timeouts():
            line = self._transport.read_line()
        if line.startswith(b"!"):
            P.raise_error_reply(line, header)
        try:
            return line.decode("ascii").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ProtocolError(f"non-ASCII reply to {header}: {line[:40]!r}") from None

    def _round_trip_block(self, message: bytes, header: str) -> bytes:
        self.stats.round_trips += 1
        t = self._transport
        t.write(message)
        with self._counting_timeouts():
            head = t.read_exact(2)
            if head[:1] == b"!":
                P.raise_error_reply(head + t.read_line(), header)
            if head[:1] != b"#":
                raise ProtocolError(f"reply to {header} is neither a block nor an error: {head!r}")
            d = P.block_digits(head[1:2])
            length = P.block_length(t.read_exact(d), d)
            payload = t.read_exact(length + 1)
        if payload[-1:] != b"\n":
            raise ProtocolError(f"block reply to {header} is not followed by a newline")
        return payload[:-1]

    def _recover(self) -> None:
        """Reconnect, then read until the echo of a fresh SYNC? token: whatever came before is stale.

        Any other line may be our echo, corrupted, or a SYNC? refused without running (200): each one sends
        another SYNC? with a new token (at most retries more), so a lost echo costs a round trip instead of
        the whole sync wait. The tester answers in order, so every stale line and every earlier token's
        echo comes before the newest token's echo; only that one ends the recovery.
        """
        self.stats.reconnects += 1
        t = self._transport
        t.reconnect()
        tokens = [secrets.token_hex(8).encode()]
        wait = self._sync_timeout_s if self._sync_timeout_s is not None else 4 * t.timeout_s
        with t.timeout(wait), self._counting_timeouts():
            t.write(P.encode_message("SYNC?", text=tokens[-1].decode()))
            for _ in range(10_000):
                line = t.read_line().rstrip(b"\r\n")
                if line.endswith(tokens[-1]):
                    return
                if any(line.endswith(x) for x in tokens[:-1]) or len(tokens) > self._retries:
                    continue  # an earlier echo: the newest is on its way
                if _is_not_run(line):
                    self.stats.retried_errors += 1
                tokens.append(secrets.token_hex(8).encode())
                t.write(P.encode_message("SYNC?", text=tokens[-1].decode()))
        raise ProtocolError("SYNC? echo not found among the stale replies")


def _is_not_run(line: bytes) -> bool:
    """True for a failed-query reply whose code says the command did not run (200)."""
    return any(line.startswith(b"!%d," % code) for code in _NOT_RUN)


def _parse_geometry(text: str) -> Geometry:
    try:
        rows, cols = (int(x) for x in text.split(","))
        return Geometry(rows, cols)
    except ValueError:
        raise ProtocolError(f"GEOM? answered {text[:40]!r}, expected rows,cols") from None


def _parse_limits(text: str) -> SafetyLimits:
    try:
        return SafetyLimits.model_validate_json(text)
    except ValueError as e:
        raise ProtocolError(f"LIM? answered limits that do not validate: {e}") from None


def _parse_id(text: str) -> int:
    if not text.isdigit():
        raise ProtocolError(f"PROG:LAST? answered {text[:40]!r}, expected an integer")
    return int(text)


def _parse_seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ProtocolError(f"expected a number, got {text[:40]!r}") from None
