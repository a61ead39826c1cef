"""The wire protocol of the array tester: one table and one codec, shared by client and server.

SCPI style. A message is one ASCII header, optionally a space and one argument (ASCII text or one
IEEE 488.2 definite-length block `#<n><len><bytes>`), then a newline. Queries end in `?` and
always get exactly one reply: ASCII text or one block, then a newline; a failed query replies
`!<code>,"<message>"` instead. Commands without `?` never reply; their errors go to the error
queue (`SYST:ERR?`). Block payloads are little-endian and end in a CRC32 (zlib) of everything
before it, so a corrupted byte is refused instead of applied. See docs/protocol.md.
"""

from __future__ import annotations

import enum
import functools
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import InstrumentError, ProgramError, ProtocolError
from .program import PulseProgram, PulseShape, PulseShapes

#: Largest block the codec accepts (bytes); the 9-digit length field allows at most 999,999,999.
MAX_BLOCK_BYTES = 999_999_999
#: Longest header + text argument the server accepts (bytes, newline excluded).
MAX_LINE_BYTES = 4096
#: Optional commands a tester may serve; it lists those it does in its *OPT? reply (one without *OPT? has none).
OPTIONAL_COMMANDS = ("PROG:APPL:READ?",)
#: Largest SET count one device can carry on the wire (uint16).
MAX_WIRE_SET_COUNT = 0xFFFF
#: Largest address the wire carries (uint32).
MAX_WIRE_ADDRESS = 0xFFFF_FFFF

NO_ERROR = '0,"No error"'


class Arg(enum.Enum):
    """What follows a header."""

    NONE = "none"
    TEXT = "text"
    BLOCK = "block"


class Reply(enum.Enum):
    """What a command answers."""

    NONE = "none"
    TEXT = "text"
    BLOCK = "block"


@dataclass(frozen=True)
class Command:
    header: str
    arg: Arg
    reply: Reply
    summary: str


#: The protocol table. Headers are matched case-insensitively, in this exact (long) form only.
COMMANDS: dict[str, Command] = {c.header: c for c in (
    Command("*IDN?", Arg.NONE, Reply.TEXT, "identity: maker,model,serial,firmware"),
    Command("*RST", Arg.NONE, Reply.NONE, "settings to defaults, error queue cleared; the chip and PROG:LAST? are kept"),
    Command("*CLS", Arg.NONE, Reply.NONE, "clear the error queue"),
    Command("*OPC?", Arg.NONE, Reply.TEXT, "1 once every earlier command has completed"),
    Command("*OPT?", Arg.NONE, Reply.TEXT, "optional commands this tester serves, comma-separated; 0 if none"),
    Command("SYST:ERR?", Arg.NONE, Reply.TEXT, 'oldest error-queue entry, <code>,"<message>"; 0,"No error" when empty'),
    Command("SYNC?", Arg.TEXT, Reply.TEXT, "echo the token (1..64 of [A-Za-z0-9]); used to find the end of stale replies"),
    Command("GEOM?", Arg.NONE, Reply.TEXT, "rows,cols"),
    Command("LIM?", Arg.NONE, Reply.TEXT, "the tester's safety limits, JSON (SafetyLimits)"),
    Command("TIME?", Arg.NONE, Reply.TEXT, "the tester's clock, seconds"),
    Command("READ:VOLT", Arg.TEXT, Reply.NONE, "set the read voltage, volts"),
    Command("READ:VOLT?", Arg.NONE, Reply.TEXT, "the read voltage, volts"),
    Command("PULS:SHAP?", Arg.NONE, Reply.TEXT, "pulse shapes of the last applied program (defaults before any), JSON"),
    Command("READ?", Arg.BLOCK, Reply.BLOCK, "read conductances of an address block"),
    Command("READ:ALL?", Arg.NONE, Reply.BLOCK, "read the whole array in address order"),
    Command("PROG:APPL?", Arg.BLOCK, Reply.TEXT, "apply a program block; replies its id once applied"),
    Command("PROG:APPL:READ?", Arg.BLOCK, Reply.BLOCK, "apply a program block, then read its devices back; replies "
            "one block: the id, the clock at the program's start and the read-back (optional: *OPT? lists it)"),
    Command("PROG:LAST?", Arg.NONE, Reply.TEXT, "id of the last applied program, 0 if none"),
    Command("LIFE?", Arg.BLOCK, Reply.BLOCK, "lifetime pulses (SET + RESET) of an address block"),
    Command("LIFE:ALL?", Arg.NONE, Reply.BLOCK, "lifetime pulses of every device in address order"),
)}


class ErrorCode(enum.IntEnum):
    """Error-queue codes: SCPI standard codes (negative) and this tester's own (positive)."""

    COMMAND_ERROR = -100
    DATA_TYPE_ERROR = -104
    PARAMETER_NOT_ALLOWED = -108
    MISSING_PARAMETER = -109
    UNDEFINED_HEADER = -113
    BLOCK_DATA_ERROR = -160
    DATA_OUT_OF_RANGE = -222
    DEVICE_ERROR = -300
    QUEUE_OVERFLOW = -350
    SAFETY_LIMIT = 101
    ALREADY_APPLIED = 102
    INJECTED_FAULT = 200


class BlockError(ProtocolError):
    """A binary block or its payload is malformed (framing, length, CRC, values)."""


# ---------------------------------------------------------------------------- framing
def encode_block(payload: bytes | bytearray | memoryview) -> bytes:
    """IEEE 488.2 definite-length block: b'#' + digits of len + len + payload."""
    n = len(payload)
    if n > MAX_BLOCK_BYTES:
        raise BlockError(f"block of {n} bytes exceeds the {MAX_BLOCK_BYTES}-byte limit")
    digits = str(n).encode()
    return b"#" + str(len(digits)).encode() + digits + bytes(payload)


def decode_block(data: bytes) -> bytes:
    """Payload of one complete block (no trailing bytes allowed)."""
    if len(data) < 2 or data[:1] != b"#":
        raise BlockError(f"a block starts with '#<digit>', got {bytes(data[:8])!r}")
    d = block_digits(data[1:2])
    length = block_length(data[2:2 + d], d)
    body = data[2 + d:]
    if len(body) != length:
        raise BlockError(f"block header says {length} bytes, {len(body)} follow")
    return bytes(body)


def block_digits(b: bytes) -> int:
    """Number of length digits from the byte after '#' (1..9)."""
    if len(b) != 1 or not 0x31 <= b[0] <= 0x39:
        raise BlockError(f"block length-digit count must be 1..9, got {b!r}")
    return b[0] - 0x30


def block_length(digits: bytes, d: int) -> int:
    """Payload length from the d ASCII digits of a block header."""
    if len(digits) != d or not digits.isdigit():
        raise BlockError(f"block length must be {d} ASCII digits, got {digits!r}")
    return int(digits)


def encode_message(header: str, text: str | None = None, block: bytes | None = None) -> bytes:
    """One client message, checked against the protocol table, newline-terminated."""
    cmd = COMMANDS.get(header)
    if cmd is None:
        raise ProtocolError(f"{header!r} is not in the protocol table")
    if cmd.arg is Arg.NONE and (text is not None or block is not None):
        raise ProtocolError(f"{header} takes no argument")
    if cmd.arg is Arg.TEXT:
        if text is None or block is not None or "\n" in text or not text.isascii():
            raise ProtocolError(f"{header} takes one line of ASCII text")
        return f"{header} {text}\n".encode()
    if cmd.arg is Arg.BLOCK:
        if block is None or text is not None:
            raise ProtocolError(f"{header} takes one block")
        return header.encode() + b" " + encode_block(block) + b"\n"
    return header.encode() + b"\n"


def format_error(code: int, message: str) -> str:
    """`<code>,"<message>"` with the message on one line and quotes doubled (SCPI string)."""
    clean = "".join(c if c.isprintable() and c.isascii() else " " for c in message)[:200]
    return f'{int(code)},"{clean.replace(chr(34), chr(34) * 2)}"'


_ERROR_RE = re.compile(r'^(-?\d+),"(.*)"$', re.S)


def parse_error(text: str) -> tuple[int, str]:
    """Code and message of a `<code>,"<message>"` string (SYST:ERR? or a failed query's reply)."""
    m = _ERROR_RE.match(text)
    if m is None:
        raise ProtocolError(f"not an error-queue entry: {text[:80]!r}")
    return int(m.group(1)), m.group(2).replace('""', '"')


def error_reply(code: int, message: str) -> bytes:
    """What a failed query answers: b'!' + the error entry + newline."""
    return b"!" + format_error(code, message).encode() + b"\n"


def raise_error_reply(line: bytes, command: str) -> None:
    """Raise the InstrumentError a `!<code>,"<message>"` reply carries (ProtocolError if malformed)."""
    try:
        code, msg = parse_error(line[1:].decode("ascii").rstrip("\r\n"))
    except UnicodeDecodeError:
        raise ProtocolError(f"non-ASCII error reply to {command}: {line[:80]!r}") from None
    raise InstrumentError(code, msg, command)


# ---------------------------------------------------------------------------- payloads
def _with_crc(parts: list[bytes]) -> bytes:
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def _check_crc(payload: bytes, what: str) -> memoryview:
    if len(payload) < 4:
        raise BlockError(f"{what} payload of {len(payload)} bytes is too short for its CRC")
    body = memoryview(payload)[:-4]
    (crc,) = struct.unpack_from("<I", payload, len(payload) - 4)
    if zlib.crc32(body) != crc:
        raise BlockError(f"{what} payload fails its CRC32 check (corrupted in transit)")
    return body


def _count(body: memoryview, offset: int, per_item: int, what: str) -> int:
    if len(body) < offset + 4:
        raise BlockError(f"{what} payload of {len(body)} bytes is shorter than its header")
    (n,) = struct.unpack_from("<I", body, offset)
    if len(body) != offset + 4 + n * per_item:
        raise BlockError(f"{what} payload says {n} entries but holds {len(body) - offset - 4} bytes for them")
    return n


def _wire_addresses(addresses: npt.ArrayLike) -> npt.NDArray[np.uint32]:
    a = np.asarray(addresses)
    if a.size and (a.min() < 0 or a.max() > MAX_WIRE_ADDRESS):
        raise ProgramError(f"addresses must lie in 0 .. {MAX_WIRE_ADDRESS} to travel as uint32")
    return a.astype("<u4", copy=False)


def encode_addresses(addresses: npt.ArrayLike) -> bytes:
    """Address block payload: u32 n, u32[n] addresses, u32 CRC."""
    a = _wire_addresses(addresses)
    return _with_crc([struct.pack("<I", a.size), a.tobytes()])


def decode_addresses(payload: bytes) -> npt.NDArray[np.int64]:
    body = _check_crc(payload, "address")
    n = _count(body, 0, 4, "address")
    return np.frombuffer(body, "<u4", n, 4).astype(np.int64)


def encode_read_reply(t_s: float, conductances_us: npt.ArrayLike) -> bytes:
    """Read reply payload: f64 tester time (s), u32 n, f32[n] conductances (uS), u32 CRC."""
    g = np.asarray(conductances_us, "<f4")
    return _with_crc([struct.pack("<dI", float(t_s), g.size), g.tobytes()])


def decode_read_reply(payload: bytes) -> tuple[float, npt.NDArray[np.float32]]:
    """(tester time in s, conductances in uS as float32)."""
    body = _check_crc(payload, "read reply")
    if len(body) < 8:
        raise BlockError("read reply payload is shorter than its header")
    (t_s,) = struct.unpack_from("<d", body, 0)
    n = _count(body, 8, 4, "read reply")
    return t_s, np.frombuffer(body, "<f4", n, 12).astype(np.float32)


def encode_counts(counts: npt.ArrayLike) -> bytes:
    """Lifetime-count payload: u32 n, u64[n] pulses, u32 CRC."""
    c = np.asarray(counts)
    if c.size and c.min() < 0:
        raise ProtocolError("pulse counts cannot be negative")
    c = c.astype("<u8", copy=False)
    return _with_crc([struct.pack("<I", c.size), c.tobytes()])


def decode_counts(payload: bytes) -> npt.NDArray[np.int64]:
    body = _check_crc(payload, "count")
    n = _count(body, 0, 8, "count")
    c = np.frombuffer(body, "<u8", n, 4)
    if c.size and c.max() >= 2**63:
        raise BlockError("pulse count does not fit int64")
    return c.astype(np.int64)


def encode_apply_read_reply(program_id: int, t_program_s: float, t_s: float, conductances_us: npt.ArrayLike) -> bytes:
    """PROG:APPL:READ? reply payload: u64 program id, f64 tester clock as the program started (s), then a read
    reply's fields: f64 tester clock of the read (s), u32 n, f32[n] conductances (uS); u32 CRC."""
    g = np.asarray(conductances_us, "<f4")
    return _with_crc([struct.pack("<QddI", int(program_id), float(t_program_s), float(t_s), g.size), g.tobytes()])


def decode_apply_read_reply(payload: bytes) -> tuple[int, float, float, npt.NDArray[np.float32]]:
    """(program id, clock at the program's start in s, clock of the read in s, conductances in uS as float32)."""
    body = _check_crc(payload, "apply-read reply")
    if len(body) < 24:
        raise BlockError("apply-read reply payload is shorter than its header")
    pid, t_prog, t_s = struct.unpack_from("<Qdd", body, 0)
    n = _count(body, 24, 4, "apply-read reply")
    return pid, t_prog, t_s, np.frombuffer(body, "<f4", n, 28).astype(np.float32)


def parse_options(text: str) -> frozenset[str]:
    """The optional commands an *OPT? reply names ('0': none), upper-cased."""
    names = {x.strip().upper() for x in text.split(",")}
    return frozenset(names - {"", "0"})


_PROG_HEAD = struct.Struct("<QddddI")


def encode_program(program: PulseProgram) -> bytes:
    """Program payload: u64 id, f64 SET amplitude (uA), f64 SET width (ns), f64 RESET amplitude (uA),
    f64 RESET width (ns), u32 n, u32[n] addresses, u16[n] SET counts, u8[n] RESET flags, u32 CRC."""
    p = program
    if p.n_devices and int(p.set_counts.max()) > MAX_WIRE_SET_COUNT:
        i = int(np.argmax(p.set_counts))
        raise ProgramError(f"SET count {int(p.set_counts[i])} for device {int(p.addresses[i])} exceeds the wire's "
                           f"{MAX_WIRE_SET_COUNT}")
    s = p.shapes
    head = _PROG_HEAD.pack(p.program_id, s.set.amplitude_ua, s.set.width_ns, s.reset.amplitude_ua,
                           s.reset.width_ns, p.n_devices)
    return _with_crc([head, _wire_addresses(p.addresses).tobytes(), p.set_counts.astype("<u2").tobytes(),
                      p.reset.astype(np.uint8).tobytes()])


def decode_program(payload: bytes) -> PulseProgram:
    """PulseProgram of a program payload; BlockError on framing, ProgramError on values."""
    body = _check_crc(payload, "program")
    if len(body) < _PROG_HEAD.size:
        raise BlockError(f"program payload of {len(body)} bytes is shorter than its {_PROG_HEAD.size}-byte header")
    pid, sa, sw, ra, rw, n = _PROG_HEAD.unpack_from(body, 0)
    if len(body) != _PROG_HEAD.size + 7 * n:
        raise BlockError(f"program payload says {n} devices but holds {len(body) - _PROG_HEAD.size} bytes for them")
    o = _PROG_HEAD.size
    addr = np.frombuffer(body, "<u4", n, o).astype(np.int64)
    cnt = np.frombuffer(body, "<u2", n, o + 4 * n).astype(np.int64)
    rst = np.frombuffer(body, np.uint8, n, o + 6 * n)
    if rst.size and rst.max() > 1:
        raise BlockError("RESET flags must be 0 or 1")
    return PulseProgram(pid, addr, cnt, rst.astype(bool), _shapes(pid, sa, sw, ra, rw))


@functools.lru_cache(maxsize=16)
def _valid_shapes(sa: float, sw: float, ra: float, rw: float) -> PulseShapes:
    # A run sends the same few shapes in every program: validating them once saves the tester ~4 us a program.
    return PulseShapes(set=PulseShape(amplitude_ua=sa, width_ns=sw), reset=PulseShape(amplitude_ua=ra, width_ns=rw))


def _shapes(pid: int, sa: float, sw: float, ra: float, rw: float) -> PulseShapes:
    try:
        return _valid_shapes(sa, sw, ra, rw)
    except ValueError as e:
        raise ProgramError(f"invalid pulse shape in program {pid}: {e.errors()[0]['msg'] if hasattr(e, 'errors') else e}") from None


# ---------------------------------------------------------------------------- server-side parsing
@dataclass(frozen=True)
class Message:
    """One received message: header as sent, and its text or block argument."""

    header: str
    text: str | None = None
    block: bytes | None = None


@dataclass(frozen=True)
class Malformed:
    """Bytes that are not a message; the parser skipped them up to the next newline."""

    reason: str


class MessageParser:
    """Incremental (sans-IO) splitter of received bytes into Messages; never evaluates anything.

    Garbage yields Malformed and the parser skips to the next newline. A block whose header
    announces more than max_block bytes is refused at once; an incomplete message stays buffered
    until more bytes arrive or abandon() drops it (the server calls it after a quiet period).
    """

    def __init__(self, max_block: int = MAX_BLOCK_BYTES, max_line: int = MAX_LINE_BYTES) -> None:
        self._buf = bytearray()
        self._skipping = False
        self._max_block = max_block
        self._max_line = max_line

    @property
    def pending(self) -> bool:
        """True when part of a message is buffered."""
        return bool(self._buf) or self._skipping

    def abandon(self) -> Malformed | None:
        """Drop a partial message (Malformed if there was one)."""
        had = bool(self._buf)
        self._buf.clear()
        self._skipping = False
        return Malformed("incomplete message abandoned") if had else None

    def feed(self, data: bytes) -> list[Message | Malformed]:
        """Add received bytes; return every message (or malformed stretch) they complete."""
        self._buf += data
        out: list[Message | Malformed] = []
        while True:
            item = self._next()
            if item is None:
                return out
            out.append(item)

    def _skip_line(self, reason: str) -> Malformed:
        nl = self._buf.find(b"\n")
        if nl >= 0:
            del self._buf[:nl + 1]
        else:
            self._buf.clear()
            self._skipping = True
        return Malformed(reason)

    def _next(self) -> Message | Malformed | None:
        buf = self._buf
        if self._skipping:
            nl = buf.find(b"\n")
            if nl < 0:
                buf.clear()
                return None
            del buf[:nl + 1]
            self._skipping = False
        if not buf:
            return None
        nl = buf.find(b"\n")
        sp = buf.find(b" ", 0, nl if nl >= 0 else len(buf))
        if sp < 0 and nl < 0:
            return self._skip_line("command line too long") if len(buf) > self._max_line else None
        end = sp if sp >= 0 else nl
        header = self._header(bytes(buf[:end]))
        if isinstance(header, Malformed):
            return self._skip_line(header.reason)
        if sp < 0:
            del buf[:nl + 1]
            return Message(header)
        if len(buf) > sp + 1 and buf[sp + 1] == 0x23:  # '#': a block argument
            return self._block(header, sp + 1)
        if nl < 0:
            return self._skip_line("command line too long") if len(buf) > self._max_line else None
        raw = bytes(buf[sp + 1:nl]).rstrip(b"\r")
        del buf[:nl + 1]
        if len(raw) > self._max_line or not raw.isascii() or not all(0x20 <= c < 0x7F for c in raw):
            return Malformed(f"argument of {header} is not one line of printable ASCII")
        return Message(header, text=raw.decode("ascii"))

    def _header(self, raw: bytes) -> str | Malformed:
        raw = raw.rstrip(b"\r")
        if not raw:
            return Malformed("empty command")
        if len(raw) > 64 or not all(0x21 <= c < 0x7F for c in raw):
            return Malformed("command header must be 1..64 printable ASCII characters")
        return raw.decode("ascii")

    def _block(self, header: str, at: int) -> Message | Malformed | None:
        buf = self._buf
        if len(buf) < at + 2:
            return None
        if not 0x31 <= buf[at + 1] <= 0x39:
            return self._skip_line("block length-digit count must be 1..9")
        d = buf[at + 1] - 0x30
        if len(buf) < at + 2 + d:
            return None
        digits = bytes(buf[at + 2:at + 2 + d])
        if not digits.isdigit():
            return self._skip_line("block length must be ASCII digits")
        length = int(digits)
        if length > self._max_block:
            return self._skip_line(f"block of {length} bytes exceeds this tester's {self._max_block}-byte limit")
        start = at + 2 + d
        stop = start + length
        if len(buf) < stop + 1:
            return None
        term = buf[stop]
        payload = bytes(buf[start:stop])
        if term != 0x0A:
            del buf[:stop]
            return self._skip_line("block is not followed by a newline")
        del buf[:stop + 1]
        return Message(header, block=payload)
