"""TesterDriver: the driver contract spoken over the wire protocol (drivers/protocol.py).

One round trip per read and per program, whatever their size. Reads and status queries are
retried after a link failure (reconnect, then SYNC? to skip any stale reply) and after error 200
(the tester did not run the command). A program is applied exactly once: if the link fails while it
is in flight, the driver reconnects, syncs, asks PROG:LAST? until two answers in a row agree, and
re-sends only if the tester did not apply it; a program refused with 200 or -160 never ran and is
sent again. A tester that stops answering is reconnected with backoff for the reconnect window
(default 60 s, warnings "tester not answering, retry N, S s" on the way), then LinkLost; while
connecting the window is 0, so a silent tester fails after one reply timeout plus one sync wait.
"""

from __future__ import annotations

import logging
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import numpy.typing as npt

from . import protocol as P
from .base import APPLY_READ, ArrayDriver
from .errors import Disconnected, DriverError, DriverTimeout, InstrumentError, LinkLost, NoAnswer, ProtocolError
from .program import Geometry, PulseProgram, ReadResult
from .safety import SafetyLimits
from .transport import SerialTransport, Transport, VisaTransport, is_serial_url

_LINK_ERRORS = (DriverTimeout, Disconnected, ProtocolError)
#: Instrument errors that say the command did not run, so sending it again is safe and may succeed.
_NOT_RUN = (P.ErrorCode.INJECTED_FAULT,)
#: PROG:LAST? answers asked for at most, per attempt, to get two in a row that agree.
_LAST_ID_ASKS = 4
#: Pauses (s) before the 1st, 2nd, ... reconnect retry within the window; the last one repeats. The first is 0:
#: one failed recovery is most often a fault on a live link, not an outage.
_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 4.0, 5.0)
T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class LinkStats:
    """What the link has done so far (for benchmarks and tests)."""

    round_trips: int = 0
    reconnects: int = 0
    resends: int = 0
    retried_queries: int = 0
    retried_errors: int = 0
    timeouts: int = 0  # replies waited for in vain, a whole timeout each (a closed link is not one)
    drained_replies: int = 0  # stale lines skipped while waiting for a SYNC? echo


class TesterDriver(ArrayDriver):
    """An array tester behind a Transport. Geometry, limits and identity come from the tester.

    limits: host-side SafetyLimits; the limits in force are the strictest of these and the tester's own
    (LIM?), field by field, never wider than either. retries: link failures and not-run errors (200)
    tolerated per operation on a link that recovers. sync_timeout_s: how long recovery waits for each
    line up to its SYNC? echo (default the transport timeout, so one recovery try costs at most about 2x
    timeout_s: reconnect plus sync). reconnect_window_s: how long (s) recovery keeps trying, with
    backoff, while the tester does not answer (default RECONNECT_WINDOW_S = 60); then LinkLost. An outage
    costs at most about the window plus two timeouts. While connecting the window is 0: one reconnect.
    seed_lifetime: fill the endurance ledger from LIFE:ALL?.
    """

    #: Default reconnect window, seconds.
    RECONNECT_WINDOW_S = 60.0

    def __init__(self, transport: Transport, *, limits: SafetyLimits | None = None, retries: int = 5,
                 sync_timeout_s: float | None = None, seed_lifetime: bool = True,
                 reconnect_window_s: float | None = None) -> None:
        self._transport = transport
        self._retries = int(retries)
        self._sync_timeout_s = sync_timeout_s
        window = self.RECONNECT_WINDOW_S if reconnect_window_s is None else float(reconnect_window_s)
        if not window >= 0:
            transport.close()
            raise ValueError(f"reconnect_window_s must be >= 0 seconds, got {reconnect_window_s!r}")
        self._reconnect_window_s = window
        self._last_header = ""
        self._reopened = False
        self.stats = LinkStats()
        # A tester that does not answer the handshake is not retried for a window: it gets one reconnect.
        self._connecting = True
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
        # The optional commands the tester's *OPT? lists: asked at the first use, so connecting stays four round trips.
        self._options: frozenset[str] | None = None
        if seed_lifetime:
            self._lifetime_pulses[:] = self._query_block("LIFE:ALL?", parse=self._counts_of(geometry.n_devices))
        self._connecting = False

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
             reconnect_window_s: float | None = None, **transport_kwargs: Any) -> TesterDriver:
        """Connect to a tester by VISA resource string ('TCPIP::127.0.0.1::5025::SOCKET', 'GPIB0::5::INSTR')
        or serial URL ('socket://127.0.0.1:5025', '/dev/ttyUSB0', a pty path, 'COM3', 'loop://').

        timeout_s: per-reply timeout in seconds (also bounds opening the link). backend: pyvisa backend
        ('@py' = pyvisa-py). baudrate, parity: serial settings (serial URLs only). reconnect_window_s: how
        long (s) to keep reconnecting to a tester that stopped answering mid-run (default 60). A malformed
        resource raises BadResource, a refused connection Disconnected ("connection refused ...").
        """
        t: Transport
        if is_serial_url(resource):
            t = SerialTransport(resource, baudrate=baudrate, parity=parity, timeout_s=timeout_s, **transport_kwargs)
        else:
            t = VisaTransport(resource, backend=backend, timeout_s=timeout_s, **transport_kwargs)
        return cls(t, limits=limits, retries=retries, reconnect_window_s=reconnect_window_s)

    # ------------------------------------------------------------------ description
    @property
    def identity(self) -> str:
        return self._identity

    @property
    def transport(self) -> Transport:
        return self._transport

    @property
    def capabilities(self) -> frozenset[str]:
        """{APPLY_READ} when the tester's *OPT? lists PROG:APPL:READ? (asked once, at the first use)."""
        if self._options is None:
            self._options = self._tester_options()
        return frozenset({APPLY_READ}) if "PROG:APPL:READ?" in self._options else frozenset()

    def _tester_options(self) -> frozenset[str]:
        """The optional commands *OPT? names; none from a tester that lacks *OPT? (error -113)."""
        try:
            return self._query_text("*OPT?", parse=P.parse_options)
        except InstrumentError as e:
            if e.code != P.ErrorCode.UNDEFINED_HEADER:
                raise
            return frozenset()

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

        def once() -> None:
            reply = self._round_trip_text(message, "PROG:APPL?")
            if reply.strip() != str(pid):
                raise ProtocolError(f"PROG:APPL? answered {reply[:40]!r}, expected {pid}")

        self._exactly_once(pid, once)

    def _apply_and_read_checked(self, program: PulseProgram) -> tuple[float | None, ReadResult]:
        """PROG:APPL:READ? where the tester has it (one round trip), exactly once as PROG:APPL?; otherwise
        apply() then read(). When the reply is lost but PROG:LAST? says the program landed, it is not sent
        again and its devices are read with a plain READ? (the clock at its start is then unknown: None)."""
        if APPLY_READ not in self.capabilities:
            return super()._apply_and_read_checked(program)
        addresses = program.addresses
        message = P.encode_message("PROG:APPL:READ?", block=P.encode_program(program))
        pid = program.program_id

        def once() -> tuple[float, ReadResult]:
            got, t_program, t_s, g = P.decode_apply_read_reply(self._round_trip_block(message, "PROG:APPL:READ?"))
            if got != pid or g.size != addresses.size:
                raise ProtocolError(f"PROG:APPL:READ? answered program {got} with {g.size} conductances, expected "
                                    f"{pid} with {addresses.size}")
            return t_program, ReadResult(addresses, g, t_s)

        landed = self._exactly_once(pid, once)
        self._book_pulses(program)
        return landed if landed is not None else (None, self.read(addresses))

    def _exactly_once(self, pid: int, once: Callable[[], T]) -> T | None:
        """Send program pid with once() until the tester has applied it exactly once: once's value, or None when
        it landed but its reply was lost (PROG:LAST? said so, or a re-send was refused as already applied).
        once raises ProtocolError for a reply that does not confirm pid."""
        last_error: Exception | None = None
        for attempt in range(self._retries + 1):
            if attempt:
                self.stats.resends += 1
            try:
                return once()
            except InstrumentError as e:
                if e.code == P.ErrorCode.BLOCK_DATA_ERROR or e.code in _NOT_RUN:
                    last_error = e  # garbled on the way in, or refused before running: sending it again is safe
                    if e.code in _NOT_RUN:
                        self.stats.retried_errors += 1
                    continue
                if e.code == P.ErrorCode.ALREADY_APPLIED and attempt:
                    self._check_landed(pid, e)
                    return None
                raise
            except _LINK_ERRORS as e:
                last_error = e  # a lost, garbled or unconfirming reply: the tester knows whether it applied it
                if self._applied_after_recovery(pid):
                    return None
        raise Disconnected(f"program {pid} not confirmed after {self._retries + 1} attempts; it was not applied "
                           f"twice, ask last_program_id() whether it landed (last error: {last_error})")

    def _check_landed(self, pid: int, refusal: InstrumentError) -> None:
        """A re-send refused with 102: only our earlier send landing explains it if PROG:LAST? is pid."""
        try:
            last = self._agreed_last_id(lambda: self._query_text("PROG:LAST?", parse=_parse_id),
                                        2 * (self._retries + 1))
        except LinkLost:
            raise
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
                last = self._agreed_last_id(once)
            except LinkLost as e:
                raise LinkLost(f"{e}. Program {pid} was in flight: whether it landed is settled by PROG:LAST? once "
                               f"the tester answers again (a resume does this)") from e
            except (*_LINK_ERRORS, InstrumentError):
                continue
            if last == pid:
                log.info("program %d landed before the link failed (PROG:LAST? %d): not sent again", pid, last)
            else:
                log.info("program %d did not land (PROG:LAST? %d): sending it again", pid, last)
            return last == pid
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
            except _LINK_ERRORS as e:
                if attempt == self._retries:
                    raise
                self.stats.retried_queries += 1
                self._recover(e)  # LinkLost (the tester stayed silent for the window) ends the operation
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
        self._last_header = header
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
        self._last_header = header
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

    def _recover(self, cause: BaseException | None = None) -> None:
        """Reconnect and sync (_resync); while that fails, try again with backoff (_BACKOFF_S) until the
        reconnect window (s, from the first try) has passed, then LinkLost. Each try is bounded: the
        reconnect by the transport timeout, the sync by sync_timeout_s per line. While connecting, a
        tester that has only timed out gets no window (NoAnswer after one try: one reply timeout plus one
        sync wait); one that showed life (closed the link, a garbled or refused reply) gets the window.
        """
        # Faults on a live tester (a dropped link, a garbled reply) cost no timeout; only silence does.
        heard = cause is not None and not isinstance(cause, DriverTimeout)
        what = self._last_header or "the last command"
        if cause is not None:
            log.info("link to %s failed after %s (%s); reconnecting", self._resource, what, cause)
        t0 = time.monotonic()
        tries = 0
        while True:
            tries += 1
            self._reopened = False
            try:
                self._resync()
            except _LINK_ERRORS as e:
                last: DriverError = e
                heard = heard or (self._reopened and not isinstance(e, DriverTimeout))
            else:
                if tries > 1:
                    log.warning("tester answering again after %d retries, %.0f s", tries - 1, time.monotonic() - t0)
                return
            elapsed = time.monotonic() - t0
            window = self._reconnect_window_s if heard or not self._connecting else 0.0
            if elapsed >= window:
                raise self._link_lost(what, cause, window, tries, elapsed, last)
            log.warning("tester not answering, retry %d, %.0f s (%s)", tries, elapsed, last)
            time.sleep(min(_BACKOFF_S[min(tries - 1, len(_BACKOFF_S) - 1)], window - elapsed))

    @property
    def _resource(self) -> str:
        t = self._transport
        return str(getattr(t, "resource", None) or getattr(t, "url", None) or getattr(t, "description", "the tester"))

    def _link_lost(self, what: str, cause: BaseException | None, window: float, tries: int, elapsed: float,
                   last: DriverError) -> LinkLost:
        if self._connecting and window == 0:
            first = (f"no answer from {self._resource} to {what} within {self._transport.timeout_s:g} s"
                     if cause is None or isinstance(cause, DriverTimeout) else f"{what} failed ({cause})")
            after = ("nor to SYNC? after reconnecting" if isinstance(last, DriverTimeout)
                     else f"and reconnecting failed: {last}")
            return NoAnswer(f"{first}, {after}; check that the tester is on, that {self._resource} is its address, that no "
                            f"other client holds it, and that it speaks the pcm-hil wire protocol (docs/protocol.md)")
        return LinkLost(f"the tester at {self._resource} stopped answering ({what} unanswered) and did not come back "
                        f"within the reconnect window of {window:g} s ({tries} reconnects over {elapsed:.0f} s; last: "
                        f"{last}); check the cable or network and that the tester is on")

    def _resync(self) -> None:
        """Reconnect, then read until the echo of a fresh SYNC? token: whatever came before is stale.

        Any other line may be our echo, corrupted, or a SYNC? refused without running (200): each one sends
        another SYNC? with a new token (at most retries more), so a lost echo costs a round trip instead of
        the whole sync wait. The tester answers in order, so every stale line and every earlier token's
        echo comes before the newest token's echo; only that one ends the recovery.
        """
        self.stats.reconnects += 1
        t = self._transport
        t.reconnect()
        self._reopened = True
        tokens = [secrets.token_hex(8).encode()]
        wait = self._sync_timeout_s if self._sync_timeout_s is not None else t.timeout_s
        drained = 0
        with t.timeout(wait), self._counting_timeouts():
            t.write(P.encode_message("SYNC?", text=tokens[-1].decode()))
            for _ in range(10_000):
                line = t.read_line().rstrip(b"\r\n")
                if line.endswith(tokens[-1]):
                    if drained:
                        log.info("reconnected to %s; drained %d stale replies before the SYNC? echo",
                                 self._resource, drained)
                    else:
                        log.info("reconnected to %s", self._resource)
                    return
                if any(line.endswith(x) for x in tokens[:-1]):
                    continue  # an earlier echo: the newest is on its way
                drained += 1
                self.stats.drained_replies += 1
                if len(tokens) > self._retries:
                    continue
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
