"""Byte links to a tester: VISA (pyvisa, any resource string) and serial (pyserial serial_for_url).

A transport moves bytes and nothing else: write a message, read one line, read exactly n bytes,
reconnect. Every failure comes out as a driver error: DriverTimeout when the instrument did not
answer in time, Disconnected when the link is closed or broke (or could not be opened: a refused
connection says so), BadResource when the resource string names no tester. Opening is bounded by the
timeout too (a host that never answers the TCP handshake costs timeout_s, not pyvisa-py's 10 s).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .errors import BadResource, Disconnected, DriverTimeout

#: Longest line a transport reads before it calls the reply malformed (bytes).
MAX_LINE = 1 << 16

#: What a valid resource looks like, for the message that refuses a malformed one.
RESOURCE_FORMS = ("TCPIP::host::port::SOCKET, TCPIP::host::INSTR, GPIB0::5::INSTR, ASRL/dev/ttyUSB0::INSTR "
                  "(VISA), or socket://host:port, /dev/ttyUSB0, COM3 (serial)")


def bad_resource(resource: str, why: str) -> BadResource:
    return BadResource(f"{resource!r} is not a tester resource ({why}); expected one of {RESOURCE_FORMS}")


def refused(resource: str, where: str) -> Disconnected:
    return Disconnected(f"connection refused by {where} ({resource}): nothing listens there; check that the tester "
                        f"(or pcm-hil emulator) is running and that host and port are right")


def check_serial_url(url: str) -> None:
    """BadResource for a socket:// URL without host:port (pyserial's own message for it is cryptic)."""
    if url.lower().startswith("socket://"):
        host, _, port = url[len("socket://"):].split("?", 1)[0].rpartition(":")
        if not host or not (port.isdigit() and 0 < int(port) < 65536):
            raise bad_resource(url, "a socket:// URL needs host:port, the port a number in 1..65535")


def _one_line(e: BaseException) -> str:
    """An exception's text on one line (some backends' messages span several)."""
    return " ".join(str(e).split())


def check_visa_resource(resource: str) -> None:
    """BadResource unless pyvisa can parse resource (and a TCPIP SOCKET's port is a port number)."""
    from pyvisa import rname

    try:
        parsed = rname.parse_resource_name(resource)
    except rname.InvalidResourceName as e:
        raise bad_resource(resource, str(e).removeprefix(f"Could not parse {resource}: ")) from None
    port = getattr(parsed, "port", None)
    if port is not None and not (str(port).isdigit() and 0 < int(port) < 65536):
        raise bad_resource(resource, f"port {port!r} is not a number in 1..65535")


class Transport(ABC):
    """A reconnectable byte link with a timeout (seconds)."""

    timeout_s: float
    description: str

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Send data as is (the caller adds the newline)."""

    @abstractmethod
    def read_line(self) -> bytes:
        """One reply line, newline included; DriverTimeout if it does not complete in time."""

    @abstractmethod
    def read_exact(self, n: int) -> bytes:
        """Exactly n bytes, newlines or not (binary block data)."""

    @abstractmethod
    def reconnect(self) -> None:
        """Close and reopen the link, dropping anything buffered."""

    @abstractmethod
    def close(self) -> None: ...

    @contextmanager
    def timeout(self, seconds: float) -> Iterator[None]:
        """Use another timeout (s) inside the block."""
        old = self.timeout_s
        self.set_timeout(seconds)
        try:
            yield
        finally:
            self.set_timeout(old)

    def set_timeout(self, seconds: float) -> None:
        self.timeout_s = float(seconds)


# ---------------------------------------------------------------------------- VISA
class VisaTransport(Transport):
    """pyvisa resource (TCPIP::host::port::SOCKET, GPIB0::5::INSTR, USB..., ASRL...).

    backend: '@py' for pyvisa-py (default), '' or '@ivi' for NI-VISA / Keysight where installed.
    resource_kwargs go to open_resource (e.g. baud_rate for ASRL resources).
    """

    def __init__(self, resource: str, *, backend: str = "@py", timeout_s: float = 5.0,
                 **resource_kwargs: Any) -> None:
        import pyvisa

        self._pyvisa = pyvisa
        self.resource = resource
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self._kwargs = resource_kwargs
        self.description = f"VISA {resource} ({backend or 'default backend'})"
        check_visa_resource(resource)
        try:
            self._rm = pyvisa.ResourceManager(backend)
        except (OSError, ValueError, pyvisa.errors.Error) as e:
            raise Disconnected(f"cannot load VISA backend {backend!r}: {e}") from e
        self._inst: Any = None
        self._open()

    def _open(self) -> None:
        pv = self._pyvisa
        try:
            inst = self._rm.open_resource(self.resource, read_termination="\n", write_termination="",
                                          timeout=self._ms(self.timeout_s), open_timeout=self._ms(self.timeout_s),
                                          **self._kwargs)
        except pv.errors.VisaIOError as e:
            raise self._unresolved() or Disconnected(f"cannot open {self.resource}: {_one_line(e)}") from e
        except Exception as e:  # pyvisa-py raises a bare Exception("could not connect: ...") for TCPIP sockets
            if isinstance(e, ConnectionRefusedError):
                raise refused(self.resource, "the host") from e
            raise self._unresolved() or Disconnected(f"cannot open {self.resource}: {_one_line(e)}") from e
        try:
            self._tune_socket_session(inst)
        except BaseException:
            inst.close()
            raise
        self._inst = inst

    def _unresolved(self) -> Disconnected | None:
        """The error for a TCPIP host name that does not resolve (pyvisa-py says 'Bad file descriptor'), else None."""
        from pyvisa import rname

        try:
            host = getattr(rname.parse_resource_name(self.resource), "host_address", None)
            if host:
                socket.getaddrinfo(host, None)
        except socket.gaierror as e:
            return Disconnected(f"cannot open {self.resource}: host {host!r} not found ({e.strerror}); check the "
                                f"host name or use its IP address")
        except Exception:
            pass
        return None

    def _tune_socket_session(self, inst: Any) -> None:
        """Adjust a pyvisa-py TCPIP SOCKET session (other backends and sessions are left alone)."""
        session = getattr(getattr(inst, "visalib", None), "sessions", {}).get(getattr(inst, "session", None))
        if session is None:
            return
        # pyvisa-py receives 4 KiB per select()+recv(); a 1.6 MB block then costs ~400 system-call pairs.
        if isinstance(getattr(session, "max_recv_size", None), int):
            session.max_recv_size = max(session.max_recv_size, 1 << 20)
        # pyvisa-py takes recv()'s b"" (the peer closed the connection) for "nothing yet" and polls until
        # its timeout: a tester that dropped the link would cost a whole timeout per fault.
        sock = getattr(session, "interface", None)
        if isinstance(sock, socket.socket):
            # pyvisa-py's non-blocking connect takes "select() says ready" for success, so a refused connection
            # only showed at the first write, as "Broken pipe". The connect's own result is in SO_ERROR.
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                parsed = getattr(session, "parsed", None)
                where = f"{getattr(parsed, 'host_address', '?')}:{getattr(parsed, 'port', '?')}"
                if err == errno.ECONNREFUSED:
                    raise refused(self.resource, where)
                raise Disconnected(f"cannot connect to {where} ({self.resource}): {os.strerror(err)}; check the "
                                   f"host, the port and the network")
            session.interface = _PeerCloseAware(sock)

    @staticmethod
    def _ms(seconds: float) -> int:
        return max(1, int(round(seconds * 1000)))

    def set_timeout(self, seconds: float) -> None:
        super().set_timeout(seconds)
        if self._inst is not None:
            self._inst.timeout = self._ms(seconds)

    @contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        pv = self._pyvisa
        if self._inst is None:
            raise Disconnected(f"{self.description} is closed")
        try:
            yield
        except pv.errors.VisaIOError as e:
            if e.error_code == pv.constants.StatusCode.error_timeout:
                raise DriverTimeout(f"{what}: no answer from {self.resource} within {self.timeout_s} s") from e
            raise Disconnected(f"{what} on {self.resource}: {e}") from e
        except (pv.errors.Error, OSError) as e:
            raise Disconnected(f"{what} on {self.resource}: {e}") from e

    def write(self, data: bytes) -> None:
        with self._mapped("write"):
            self._inst.write_raw(data)

    def read_line(self) -> bytes:
        with self._mapped("read"):
            line = self._inst.read_raw()
        if not line.endswith(b"\n"):
            raise DriverTimeout(f"read: {self.resource} sent {len(line)} bytes without a newline")
        return line

    def read_exact(self, n: int) -> bytes:
        # Termination off for the block: pyvisa-py would otherwise stop at every newline byte inside it.
        inst = self._inst
        with self._mapped("read block"):
            inst.read_termination = None
            try:
                data = inst.read_bytes(n, chunk_size=max(n, 1))
            finally:
                inst.read_termination = "\n"
        if len(data) != n:
            raise DriverTimeout(f"read block: {len(data)} of {n} bytes from {self.resource}")
        return data

    def reconnect(self) -> None:
        self._close_inst()
        self._open()

    def _close_inst(self) -> None:
        inst, self._inst = self._inst, None
        if inst is not None:
            try:
                inst.close()
            except Exception:  # a broken session may fail to close; it is dropped either way
                pass

    def close(self) -> None:
        self._close_inst()
        try:
            self._rm.close()
        except Exception:
            pass


class _PeerCloseAware:
    """A socket whose recv() raises ConnectionResetError at end of stream instead of returning b"".

    pyvisa-py calls recv() only once select() says the socket is readable, so an empty read there is
    the peer's close, never a lull; raising turns it into Disconnected at once.
    """

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = self._sock.recv(bufsize, flags)
        if not data and bufsize > 0:
            raise ConnectionResetError("the tester closed the connection")
        return data

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


# ---------------------------------------------------------------------------- serial
class SerialTransport(Transport):
    """pyserial serial_for_url: '/dev/ttyUSB0', 'COM3', a pty path, 'socket://host:port', 'loop://'.

    baudrate, parity ('N', 'E', 'O', 'M', 'S'), bytesize, stopbits as pyserial takes them.
    timeout_s is an inactivity timeout: a long block on a slow line is fine as long as bytes keep
    coming. write_timeout_s defaults to timeout_s plus the line time of 1 MiB.
    """

    #: The port's own read timeout: reads poll at this interval against the transport's deadline,
    #: because changing a pyserial port's timeout re-applies termios, which ptys refuse with parity.
    POLL_S = 0.05

    def __init__(self, url: str, *, baudrate: int = 115200, parity: str = "N", bytesize: int = 8,
                 stopbits: float = 1, timeout_s: float = 5.0, write_timeout_s: float | None = None) -> None:
        import serial

        self._serial_mod = serial
        self.url = url
        self.timeout_s = float(timeout_s)
        self._settings = dict(baudrate=baudrate, parity=parity, bytesize=bytesize, stopbits=stopbits)
        self._write_timeout_s = (write_timeout_s if write_timeout_s is not None
                                 else self.timeout_s + 12.0 * (1 << 20) / float(baudrate))
        self.description = f"serial {url}"
        check_serial_url(url)
        self._port: Any = None
        self._open()

    def _open(self) -> None:
        s = self._serial_mod
        try:
            self._port = s.serial_for_url(self.url, timeout=self.POLL_S, write_timeout=self._write_timeout_s,
                                          **self._settings)
        except (s.SerialException, OSError, ValueError) as e:
            # pyserial's socket:// wraps the OSError in a SerialException without chaining it; its text says.
            if isinstance(e.__context__, ConnectionRefusedError) or "Connection refused" in str(e):
                host = self.url.split("://", 1)[-1]
                raise refused(self.url, host) from e
            if "expected a string in the form" in str(e) or "invalid URL" in str(e):
                raise bad_resource(self.url, str(e).split(": ", 1)[-1]) from e
            if isinstance(e, ValueError) and not isinstance(e, s.SerialException):
                raise bad_resource(self.url, str(e)) from e
            raise Disconnected(f"cannot open {self.url}: {_one_line(e)}") from e

    @contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        s = self._serial_mod
        if self._port is None:
            raise Disconnected(f"{self.description} is closed")
        try:
            yield
        except s.SerialTimeoutException as e:
            raise DriverTimeout(f"{what}: {self.url} did not accept data within {self._write_timeout_s} s") from e
        except (s.SerialException, OSError) as e:
            raise Disconnected(f"{what} on {self.url}: {e}") from e

    def write(self, data: bytes) -> None:
        with self._mapped("write"):
            self._port.write(data)
            self._port.flush()

    def _read_until_done(self, step: Callable[[bytearray], bytes], done: Callable[[bytearray], bool],
                         what: str) -> bytes:
        """Poll step() until done(buf); the deadline restarts whenever bytes arrive."""
        buf = bytearray()
        deadline = time.monotonic() + self.timeout_s
        with self._mapped(what):
            while not done(buf):
                chunk = step(buf)
                if chunk:
                    buf += chunk
                    deadline = time.monotonic() + self.timeout_s
                elif time.monotonic() >= deadline:
                    raise DriverTimeout(f"{what}: nothing more from {self.url} within {self.timeout_s} s "
                                        f"({len(buf)} bytes so far)")
        return bytes(buf)

    def read_line(self) -> bytes:
        def done(buf: bytearray) -> bool:
            if len(buf) > MAX_LINE:
                raise DriverTimeout(f"read: {self.url} sent {len(buf)} bytes without a newline")
            return buf.endswith(b"\n")
        return self._read_until_done(lambda buf: self._port.read_until(b"\n", MAX_LINE), done, "read")

    def read_exact(self, n: int) -> bytes:
        return self._read_until_done(lambda buf: self._port.read(n - len(buf)), lambda buf: len(buf) >= n,
                                     "read block")

    def reconnect(self) -> None:
        self._close_port()
        self._open()
        with self._mapped("flush"):
            self._port.reset_input_buffer()

    def _close_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except Exception:
                pass

    def close(self) -> None:
        self._close_port()


def is_serial_url(resource: str) -> bool:
    """True for what SerialTransport opens (pyserial URLs, device paths, COM ports); else VISA."""
    r = resource.strip()
    return ("://" in r) or r.startswith("/dev/") or (r.upper().startswith("COM") and r[3:].isdigit())
