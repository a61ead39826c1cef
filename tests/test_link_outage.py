"""A link that fails costs seconds, not hours (issue 9, part 2): real outages through a TCP proxy that can be cut
and restored while the emulated tester keeps its state, a silent tester, a refused connection, a malformed
resource. Elapsed-time bounds here are hang guards, not performance assertions."""

from __future__ import annotations

import json
import logging
import select
import shlex
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from drivers import Disconnected, MockDriver, PulseProgram
from drivers import TesterDriver as Driver
from drivers.errors import BadResource, LinkLost
from drivers.server import Emulator, Endpoint, Server
from hil.cli import app
from hil.cli_emulator import EmulatorProcess


# ---------------------------------------------------------------------------- a proxy that can be cut
class Proxy:
    """127.0.0.1 TCP proxy in front of upstream (host, port), one thread per connection.

    cut("silent"): bytes vanish both ways; connections stay open and new ones are accepted, never answered
    (a pulled cable, a hung tester). cut("refuse"): every connection is closed and new ones are refused (a
    tester rebooting). restore(): forwarding again; connections made during a silent cut stay silent.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode = "up"
        self.port = 0
        self.programs = 0  # PROG:APPL? and PROG:APPL:READ? messages forwarded to the tester
        self.cuts = 0
        self._tail = b""
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listen()

    @property
    def resource(self) -> str:
        return f"TCPIP::127.0.0.1::{self.port}::SOCKET"

    def _listen(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            up = None
            if self.mode == "up":
                try:
                    up = socket.create_connection(self.upstream)
                except OSError:
                    client.close()
                    continue
            threading.Thread(target=self._pump, args=(client, up), daemon=True).start()

    def _pump(self, client: socket.socket, up: socket.socket | None) -> None:
        socks = [client] + ([up] if up is not None else [])
        with self._lock:
            self._conns.update(socks)
        try:
            while True:
                readable, _, _ = select.select(socks, [], [], 0.2)
                for s in readable:
                    data = s.recv(1 << 16)
                    if not data:
                        return
                    if self.mode != "up" or up is None:
                        continue  # the outage: nothing gets through
                    if s is client:
                        buf = self._tail + data
                        self.programs += buf.count(b"PROG:APPL")
                        self._tail = buf[-8:]
                        up.sendall(data)
                    else:
                        client.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.difference_update(socks)
            for s in socks:
                s.close()

    def cut(self, mode: str) -> None:
        self.cuts += 1
        self.mode = mode
        if mode == "refuse":
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
            self._listener.close()
            with self._lock:
                for s in self._conns:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def restore(self) -> None:
        if self.mode == "refuse":
            self._listen()  # the same port
        self.mode = "up"

    def outage_after(self, programs: int, mode: str, seconds: float) -> threading.Thread:
        """In the background: once `programs` PROG:APPL? went through, cut for `seconds`, then restore."""
        def run() -> None:
            deadline = time.monotonic() + 120
            while self.programs < programs and time.monotonic() < deadline:
                time.sleep(0.01)
            self.cut(mode)
            time.sleep(seconds)
            self.restore()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            for s in self._conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def tester_log():
    """The messages drivers.tester logs (info and above) during the test."""
    logger = logging.getLogger("drivers.tester")
    handler, old = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.fixture
def served():
    """An in-process emulated 4 x 4 tester on 127.0.0.1 behind a Proxy: (emulator, proxy)."""
    emulator = Emulator(MockDriver(4, 4, seed=3))
    server = Server(emulator, Endpoint("tcp", "127.0.0.1", 0))
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.address.rsplit(":", 1)
    proxy = Proxy((host, int(port)))
    try:
        yield emulator, proxy
    finally:
        proxy.close()
        server.stop()
        thread.join(10)


def _programs(n: int, first: int = 1):
    rng = np.random.default_rng(first)
    for pid in range(first, first + n):
        addr = rng.choice(16, 3, replace=False)
        yield PulseProgram(pid, addr, rng.integers(0, 3, 3), np.zeros(3, bool))


# ---------------------------------------------------------------------------- connecting
def test_a_silent_tester_fails_within_two_timeouts_naming_resource_command_and_what_to_check():
    """It took 5 x (timeout + 4 x timeout sync wait) + timeout before: 264 s at the default 10 s."""
    timeout = 0.5
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts (backlog) but never answers
        resource = f"TCPIP::127.0.0.1::{listener.getsockname()[1]}::SOCKET"
        t0 = time.monotonic()
        with pytest.raises(LinkLost) as e:
            Driver.open(resource, timeout_s=timeout)
        elapsed = time.monotonic() - t0
    assert elapsed < 4 * timeout + 5  # a hang guard: one reply timeout plus one reconnect is ~2 x timeout
    msg = str(e.value)
    assert resource in msg and "*IDN?" in msg and "within 0.5 s" in msg and "check that the tester is on" in msg


@pytest.mark.parametrize("form", ["TCPIP::127.0.0.1::{port}::SOCKET", "socket://127.0.0.1:{port}"])
def test_a_refused_connection_says_connection_refused(form):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections to it are refused
        resource = form.format(port=port)
        with pytest.raises(Disconnected) as e:
            Driver.open(resource, timeout_s=1)
    assert str(e.value).startswith("connection refused by 127.0.0.1:%d" % port), str(e.value)
    assert resource in str(e.value) and "Broken pipe" not in str(e.value)


@pytest.mark.parametrize("resource,why", [("foo", "unknown interface type"),
                                          ("TCPIP::127.0.0.1::abc::SOCKET", "port 'abc'"),
                                          ("socket://127.0.0.1", "needs host:port")])
def test_a_malformed_resource_says_what_a_valid_one_looks_like(resource, why):
    with pytest.raises(BadResource) as e:
        Driver.open(resource, timeout_s=1)
    msg = str(e.value)
    assert why in msg and "TCPIP::host::port::SOCKET" in msg and "socket://host:port" in msg and "COM3" in msg
    assert "read_termination" not in msg and "\n" not in msg


def test_the_cli_refuses_a_silent_or_malformed_tester_with_one_line(tmp_path: Path):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        silent = f"TCPIP::127.0.0.1::{listener.getsockname()[1]}::SOCKET"
        for resource, expected in ((silent, f"no answer from {silent} to *IDN? within 0.5 s"),
                                   ("127.0.0.1:5025", "is not a tester resource"),
                                   ("TCPIP::nowhere.invalid::5025::SOCKET", "host 'nowhere.invalid' not found"),
                                   ("TCPIP::127.0.0.1::x::SOCKET", "expected one of TCPIP::host::port::SOCKET")):
            t0 = time.monotonic()
            r = CliRunner().invoke(app, ["train", "--data", "digits", "--driver", resource, "--set",
                                         "driver.timeout_s=0.5", "--uncalibrated", "--out", str(tmp_path / "run")])
            assert time.monotonic() - t0 < 4 * 0.5 + 10  # hang guard
            assert r.exit_code == 2 and "Traceback" not in r.output, r.output
            lines = [x for x in r.output.splitlines() if x.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.output
            assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- outages under the driver
@pytest.mark.parametrize("mode", ["silent", "refuse"])
def test_a_three_second_outage_is_survived_and_every_program_lands_once(served, tester_log, mode):
    emulator, proxy = served
    with Driver.open(proxy.resource, timeout_s=0.3, reconnect_window_s=30) as drv:
        progs = list(_programs(40))
        outage = proxy.outage_after(15, mode, 3.0)
        t0 = time.monotonic()
        for p in progs:
            drv.apply(p)
            drv.read(p.addresses)
        assert time.monotonic() - t0 < 3.0 + 30  # hang guard
        outage.join(10)
        assert drv.last_program_id() == 40
        assert np.array_equal(drv.tester_lifetime_pulses(), drv.lifetime_pulses)
        expected = np.zeros(16, np.int64)
        for p in progs:
            np.add.at(expected, p.addresses, p.set_counts)
        assert np.array_equal(drv.lifetime_pulses, expected)  # each program applied exactly once
    assert proxy.cuts == 1 and drv.stats.reconnects >= 2
    assert any(m.startswith("tester not answering, retry 1, ") for m in tester_log), tester_log
    assert any(m.startswith("tester answering again after ") for m in tester_log), tester_log
    assert any(m.startswith("reconnected to ") for m in tester_log)


def test_an_outage_longer_than_the_window_raises_link_lost_and_the_program_is_settled_after(served, tester_log):
    emulator, proxy = served
    drv = Driver.open(proxy.resource, timeout_s=0.3, reconnect_window_s=1.5)
    progs = list(_programs(10))
    for p in progs[:5]:
        drv.apply(p)
    proxy.cut("silent")
    t0 = time.monotonic()
    with pytest.raises(LinkLost) as e:
        drv.apply(progs[5])
    assert time.monotonic() - t0 < 0.3 + 1.5 + 4 * 0.3 + 5  # hang guard: the window plus about two timeouts
    msg = str(e.value)
    assert "reconnect window of 1.5 s" in msg and proxy.resource in msg and "Program 6 was in flight" in msg
    assert sum(m.startswith("tester not answering, retry") for m in tester_log) >= 1
    drv.close()
    proxy.restore()
    with Driver.open(proxy.resource, timeout_s=0.3) as again:
        last = again.last_program_id()
        assert last in (5, 6)  # the in-flight program was cut on the way in (5) or its reply was (6)
        for p in progs[last:]:
            again.apply(p)
        expected = np.zeros(16, np.int64)
        for p in progs:
            np.add.at(expected, p.addresses, p.set_counts)
        assert np.array_equal(again.tester_lifetime_pulses(), expected)


# ---------------------------------------------------------------------------- outages under a training run
EMU = ["--rows", "128", "--cols", "128", "--seed", "0"]
TRAIN = ["train", "--data", "digits", "--train-limit", "300", "--set", "network.hidden=[16]", "--set",
         "driver.timeout_s=0.5", "--uncalibrated"]


def _log_pulses(run: Path, n_devices: int) -> np.ndarray:
    from drivers.runlog import RunLogReader

    summary = json.loads((run / "summary.json").read_text())
    with RunLogReader(run / "run.h5") as r:
        return r.pulses_per_device(n_devices, summary.get("unapplied_program_ids") or [])


def _tester_pulses(emu: EmulatorProcess) -> np.ndarray:
    with Driver.open(emu.resource, timeout_s=10) as drv:
        return drv.tester_lifetime_pulses()


def _train(*args: str):
    r = CliRunner().invoke(app, list(args))
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


def test_a_training_run_survives_a_three_second_outage_with_equal_ledgers(tmp_path: Path):
    run = tmp_path / "run"
    with EmulatorProcess(EMU) as emu:
        host, port = emu.address.rsplit(":", 1)
        proxy = Proxy((host, int(port)))
        try:
            outage = proxy.outage_after(40, "refuse", 3.0)
            r = _train(*TRAIN, "--driver", proxy.resource, "--out", str(run))
            outage.join(10)
            assert r.exit_code == 0, r.output
            assert proxy.cuts == 1
        finally:
            proxy.close()
        summary = json.loads((run / "summary.json").read_text())
        assert summary["finished"] and summary["link"]["reconnects"] >= 1
        assert "drained_replies" in summary["link"]
        tester = _tester_pulses(emu)
    assert np.array_equal(tester, _log_pulses(run, tester.size))
    text = (run / "pcm-hil.log").read_text()
    assert "tester not answering, retry 1, " in text and "tester answering again" in text


def test_an_outage_longer_than_the_window_ends_the_run_resumably_and_the_resume_finishes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with EmulatorProcess(EMU) as emu:
        host, port = emu.address.rsplit(":", 1)
        proxy = Proxy((host, int(port)))
        try:
            outage = proxy.outage_after(40, "silent", 8.0)
            t0 = time.monotonic()
            r = _train(*TRAIN, "--driver", proxy.resource, "--out", str(run), "--set", "driver.reconnect_window_s=2")
            assert time.monotonic() - t0 < 60  # hang guard
            assert r.exit_code == 2, r.output
            assert "reconnect window of 2 s" in r.output
            hint = [x for x in r.output.splitlines() if x.startswith("the run is resumable: ")]
            assert hint, r.output
            command = shlex.split(hint[0].removeprefix("the run is resumable: "))
            assert command[:4] == ["pcm-hil", "train", "--resume", str(run)] and proxy.resource in command
            outage.join(20)  # the link is back
            r = _train(*command[1:])
            assert r.exit_code == 0, r.output
        finally:
            proxy.close()
        assert json.loads((run / "summary.json").read_text())["finished"]
        tester = _tester_pulses(emu)
    assert np.array_equal(tester, _log_pulses(run, tester.size))
