"""The emulated tester: the wire protocol served in front of any ArrayDriver (MockDriver by default).

`serve(driver, endpoint)` listens on TCP (loopback unless told otherwise) or on a pseudo-terminal
(Unix only: drivers/platform_pty.py), one client at a time (later clients wait in the listen queue, so
a reconnecting client always sees the effect of everything the previous connection sent). So that no
client can hold it forever, a connection idle for `idle_timeout_s` is closed, and a message not complete
within `message_deadline_s` of its first byte is abandoned (error -100) and its connection closed.

The tester's logic is `Emulator` (drivers/emulator.py, no IO); its state file is drivers/emulator_state.py.
Both are re-exported here, so `from drivers.server import Emulator, FaultPlan, load_state` keeps working.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import protocol as P
from .base import ArrayDriver
from .emulator import (BYTES_PER_DEVICE, ERROR_QUEUE_LENGTH, FIRMWARE, MAX_DEVICES, READ_VOLTAGE_RANGE_V, Emulator,
                       Fault, FaultPlan, Response, check_size, physical_memory_bytes)
from .emulator_state import (DEFAULT_READ_VOLTAGE_V, STATE_FORMAT, STATE_VERSION, SavedState, load_state,
                             save_state)
from .mock import MockDriver
from .platform_pty import open_raw_pty, require_pty

log = logging.getLogger(__name__)

__all__ = [
    "BYTES_PER_DEVICE", "DEFAULT_READ_VOLTAGE_V", "ERROR_QUEUE_LENGTH", "FIRMWARE", "MAX_DEVICES",
    "READ_VOLTAGE_RANGE_V", "STATE_FORMAT", "STATE_VERSION", "Emulator", "Endpoint", "Fault", "FaultPlan", "Response",
    "SavedState", "Server", "check_size", "exposed", "load_state", "physical_memory_bytes", "print_ready", "save_state",
    "serve",
]


@dataclass(frozen=True)
class Endpoint:
    """Where to serve: TCP host:port (port 0 picks a free one) or a new pseudo-terminal."""

    kind: str = "tcp"
    host: str = "127.0.0.1"
    port: int = 5025

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """'pty', 'HOST:PORT' or 'tcp://HOST:PORT'. 'pty' is refused where the system has none (Windows),
        with a ValueError naming the TCP alternative."""
        if text == "pty":
            require_pty()
            return cls("pty")
        t = text.removeprefix("tcp://")
        host, sep, port = t.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"endpoint must be 'pty' or HOST:PORT, got {text!r}")
        return cls("tcp", host.strip("[]") or "127.0.0.1", int(port))


@dataclass
class Server:
    """A bound, not yet serving emulator; `address` says where clients connect.

    quiet_abandon_s: a partial message with no new byte for this long is dropped (error -100).
    message_deadline_s: a message not complete this long after its first byte is dropped (error -100)
    and, on TCP, its connection closed: a client trickling bytes cannot hold the server.
    idle_timeout_s: a TCP connection that sends nothing for this long is closed, so the next client in
    the listen queue is served. send_timeout_s: longest a reply may take to leave. All in seconds.
    """

    emulator: Emulator
    endpoint: Endpoint
    quiet_abandon_s: float = 2.0
    send_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0
    message_deadline_s: float = 10.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _listener: socket.socket | None = None
    _pty: tuple[int, int] | None = None
    address: str = ""

    def bind(self) -> str:
        """Open the listening socket or the pty; returns 'HOST:PORT' or the pty's path."""
        if self.endpoint.kind == "pty":
            master, slave, self.address = open_raw_pty()  # Unix only (drivers/platform_pty.py)
            self._pty = (master, slave)
        else:
            fam = socket.AF_INET6 if ":" in self.endpoint.host else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
                # Windows: SO_REUSEADDR there would let a second emulator bind the same port and steal clients;
                # this refuses it, as a second bind fails on Linux and macOS.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
            else:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop
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
            try:
                self.emulator.save()
            finally:
                self.emulator.close()
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
                self._logged_session(_peer(conn), lambda: conn.recv(1 << 20), lambda data: self._send_tcp(conn, data),
                                     can_drop=True)

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
            self._logged_session(self.address, recv, send, can_drop=False)

    def _logged_session(self, who: str, recv: Callable[[], bytes], send: Callable[[bytes], None],
                        can_drop: bool) -> None:
        """_session, with one log line (info) as the client comes and one as it goes: how long, how many messages."""
        log.info("client %s connected", who)
        t0, n0 = time.monotonic(), self.emulator.commands_seen
        why = self._session(recv, send, can_drop)
        log.info("client %s %s after %.1f s, %d messages", who, why, time.monotonic() - t0,
                 self.emulator.commands_seen - n0)

    def _session(self, recv: Callable[[], bytes], send: Callable[[bytes], None], can_drop: bool) -> str:
        """Serve one connection until it closes, idles out or overruns a message deadline (TCP), or the
        server stops; returns how it ended, for the log. can_drop: the link is a connection that can be
        closed (TCP, not a pty)."""
        parser = P.MessageParser(max_block=self.emulator.max_block)
        last_byte = time.monotonic()
        started: float | None = None  # when the first byte of the pending message came
        while not self._stop.is_set():
            try:
                data: bytes | None = recv()
            except TimeoutError:
                data = None
            except OSError as e:
                return f"lost ({e.strerror or e})"
            now = time.monotonic()
            if data is not None:
                if not data:
                    return "disconnected"
                last_byte = now
                items = parser.feed(data)
                # Leftover bytes after a completed message started in this chunk.
                started = (now if items or started is None else started) if parser.pending else None
                if not self._answer(items, send, can_drop):
                    return "closed by the emulator (injected fault or failed send)"
            if parser.pending:
                assert started is not None
                if now - started > self.message_deadline_s:
                    parser.abandon()
                    self.emulator.handle(P.Malformed(f"message not complete within {self.message_deadline_s:g} s "
                                                     "of its first byte: abandoned"))
                    started = None
                    if can_drop:
                        return f"closed: a message not complete within {self.message_deadline_s:g} s"
                elif now - last_byte > self.quiet_abandon_s:
                    bad = parser.abandon()
                    if bad is not None:
                        self.emulator.handle(bad)
                    started = None
            elif can_drop and now - last_byte > self.idle_timeout_s:
                # idle: let the next client in the listen queue have the tester
                return f"closed: idle for {self.idle_timeout_s:g} s"
        return "closed: the emulator stops"

    def _answer(self, items: list[P.Message | P.Malformed], send: Callable[[bytes], None], can_drop: bool) -> bool:
        """Run received messages and send their replies; False once the connection is to end."""
        for item in items:
            r = self.emulator.handle(item)
            if r.fault in (Fault.LOSE, Fault.DROP):
                if can_drop:
                    return False
                continue
            if r.data is None:
                continue
            if r.fault is Fault.DELAY:
                time.sleep(self.emulator.faults.delay_s)
            try:
                send(r.data)
            except OSError:
                return False
        return True


def _peer(conn: socket.socket) -> str:
    try:
        host, port = conn.getpeername()[:2]
    except OSError:
        return "(unknown peer)"
    return f"{host}:{port}"


def serve(driver: ArrayDriver | None = None, endpoint: Endpoint | str = "127.0.0.1:5025", *,
          faults: FaultPlan | None = None, state_path: str | Path | None = None,
          on_ready: Callable[[Server], None] | None = None, idle_timeout_s: float = 30.0,
          message_deadline_s: float = 10.0) -> None:
    """Serve the wire protocol in front of driver (a fresh 512x784 MockDriver if None) until stopped.

    on_ready(server) is called once the endpoint is bound (server.address says where). idle_timeout_s,
    message_deadline_s: see Server (seconds).
    """
    ep = Endpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
    drv = driver if driver is not None else MockDriver(512, 784)
    server = Server(Emulator(drv, faults=faults, state_path=state_path), ep, idle_timeout_s=idle_timeout_s,
                    message_deadline_s=message_deadline_s)
    server.bind()
    if on_ready is not None:
        on_ready(server)
    server.serve_forever()


def exposed(host: str) -> bool:
    """True when a TCP listener bound to host can be reached from other machines (not loopback only)."""
    import ipaddress

    try:
        return not ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:  # a name: bind() resolved it; only 'localhost' is known to stay on this machine
        return host.lower() != "localhost"


def print_ready(server: Server) -> None:
    """The documented ready line on stdout: `LISTENING tcp HOST:PORT` or `LISTENING pty PATH`."""
    print(f"LISTENING {server.endpoint.kind} {server.address}", flush=True)
    sys.stdout.flush()
