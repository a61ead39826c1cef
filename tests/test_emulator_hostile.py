"""The emulated tester under hostile or careless clients, over real sockets: nobody holds it forever."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from drivers import MockDriver, PulseProgram
from drivers import protocol as P
from drivers.server import Emulator, Endpoint, Server, exposed


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(Emulator(MockDriver(3, 3, seed=1)), Endpoint("tcp", "127.0.0.1", 0), idle_timeout_s=0.5,
                 message_deadline_s=1.0, quiet_abandon_s=30.0)
    srv.bind()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.stop()
    thread.join(10)


def _connect(srv: Server) -> socket.socket:
    host, port = srv.address.rsplit(":", 1)
    # Generous: the old server never served a second client at all, so the read below would time out.
    return socket.create_connection((host, int(port)), timeout=20)


def _closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def test_an_idle_client_is_disconnected_so_the_next_one_is_served(server):
    with _connect(server) as idle:
        idle.sendall(b"*IDN?\n")
        assert idle.recv(200).startswith(b"pcm-hil,emulator,")
        with _connect(server) as other, other.makefile("rb") as f:
            other.sendall(b"GEOM?\n")
            assert f.readline() == b"3,3\n"  # served once the idle one was dropped
        assert _closed_by_server(idle)


def test_the_next_client_sees_everything_the_idle_one_sent(server):
    prog = PulseProgram(7, np.array([4]), np.array([3]), np.array([False]))
    with _connect(server) as first, first.makefile("rb") as f:
        first.sendall(P.encode_message("PROG:APPL?", block=P.encode_program(prog)) + b"READ:VOLT 0.5\n")
        assert f.readline() == b"7\n"
        with _connect(server) as second, second.makefile("rb") as g:
            second.sendall(b"PROG:LAST?\nREAD:VOLT?\nSYST:ERR?\n")
            assert [g.readline() for _ in range(3)] == [b"7\n", b"0.5\n", b'0,"No error"\n']


def test_a_message_trickled_past_its_deadline_is_abandoned_and_the_link_closed(server):
    """One byte every 0.1 s keeps a message 'alive' for any quiet period; the deadline still ends it."""
    with _connect(server) as slow:
        closed = False
        for b in b"READ:VOLT 0.3333333333333333333333333333333333333333333333333333333333333\n":
            try:
                slow.sendall(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.1)
        slow.settimeout(5)
        assert closed or _closed_by_server(slow)
    with _connect(server) as s, s.makefile("rb") as f:
        s.sendall(b"SYST:ERR?\nREAD:VOLT?\n")
        err, volt = f.readline(), f.readline()
    assert err.startswith(b'-100,"message not complete within 1 s of its first byte') and volt == b"0.2\n"


def test_a_message_completed_in_time_is_served_even_if_it_comes_in_pieces(server):
    with _connect(server) as s, s.makefile("rb") as f:
        for piece in (b"*ID", b"N?", b"\nGE", b"OM?\n"):
            s.sendall(piece)
            time.sleep(0.05)
        assert f.readline().startswith(b"pcm-hil,emulator,") and f.readline() == b"3,3\n"


@pytest.mark.parametrize("host,expected", [("127.0.0.1", False), ("127.0.0.5", False), ("::1", False),
                                           ("localhost", False), ("0.0.0.0", True), ("::", True),
                                           ("192.168.1.20", True), ("tester.lab", True)])
def test_listening_beyond_loopback_counts_as_exposed(host, expected):
    assert exposed(host) is expected


def test_the_cli_idle_timeout_lets_a_driver_in_past_an_idle_client():
    from drivers import TesterDriver
    from hil.cli_emulator import EmulatorProcess

    with EmulatorProcess(["--rows", "2", "--cols", "2", "--idle-timeout-s", "0.5", "--message-deadline-s", "1"]) as emu:
        host, port = emu.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=20) as idle:
            idle.sendall(b"*IDN?\n")
            assert idle.recv(100).startswith(b"pcm-hil")  # then silence
            with socket.create_connection((host, int(port)), timeout=20) as half:
                half.sendall(b"*IDN")  # half a message, then silence
                with TesterDriver.open(emu.resource, timeout_s=20) as drv:
                    assert drv.geometry.n_devices == 4
                    assert drv.errors() == [(-100, "message not complete within 1 s of its first byte: abandoned")]
