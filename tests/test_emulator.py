"""The emulated tester end to end: real sockets, real pyvisa-py, real pyserial, a real pty."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from drivers import MockDriver, PulseProgram, SafetyLimits, SafetyViolation
from drivers import protocol as P
from drivers import TesterDriver as Driver
from drivers.server import Emulator, Endpoint, FaultPlan, Server
from hil.cli_emulator import EmulatorProcess

ROWS, COLS, SEED = 6, 7, 5


def operations(drv, first_id: int = 1, n_programs: int = 5) -> list[np.ndarray]:
    """A seeded mix of programs and reads; everything observed, for bit-exact comparison."""
    rng = np.random.default_rng(11 + first_id)
    n = drv.geometry.n_devices
    out: list[np.ndarray] = []
    for pid in range(first_id, first_id + n_programs):
        addr = rng.permutation(n)[: n // 3]
        drv.apply(PulseProgram(pid, addr, rng.integers(0, 4, addr.size), rng.random(addr.size) < 0.1))
        r = drv.read(addr[:10])
        out += [r.addresses, r.conductances_us, np.array([r.t_s])]
    r = drv.read()
    out += [r.conductances_us, np.array([r.t_s]), np.array([drv.now(), drv.last_program_id()]), drv.lifetime_pulses.copy()]
    return out


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), (x, y)


@pytest.fixture(scope="module")
def reference() -> list[np.ndarray]:
    return operations(MockDriver(ROWS, COLS, seed=SEED))


ARGS = ["--rows", str(ROWS), "--cols", str(COLS), "--seed", str(SEED)]


def test_pyvisa_over_tcp_matches_the_in_process_mock(reference):
    with EmulatorProcess(ARGS) as emu:
        with Driver.open(emu.resource, timeout_s=10) as drv:
            assert drv.identity.startswith("pcm-hil,emulator,")
            got = operations(drv)
            assert drv.stats.round_trips == 4 + 5 * 2 + 1 + 3  # handshake, program+read each, full read, now, last (twice)
            assert np.array_equal(drv.tester_lifetime_pulses(), drv.lifetime_pulses)
    assert_same(got, reference)


def test_pyserial_socket_url_matches_the_in_process_mock(reference):
    with EmulatorProcess(ARGS) as emu:
        with Driver.open(emu.serial_url, timeout_s=10) as drv:
            got = operations(drv)
    assert_same(got, reference)


def test_pyserial_over_a_pty_matches_the_in_process_mock(reference):
    with EmulatorProcess(["--pty", *ARGS]) as emu:
        assert emu.address.startswith("/dev/")
        with Driver.open(emu.serial_url, timeout_s=10, baudrate=9600, parity="E") as drv:
            got = operations(drv)
    assert_same(got, reference)


def test_state_file_keeps_chip_program_id_and_lifetime_across_restarts(tmp_path):
    state = tmp_path / "chip.npz"
    ref = MockDriver(ROWS, COLS, seed=SEED)
    expected = operations(ref) + operations(ref, first_id=6)
    with EmulatorProcess([*ARGS, "--state", str(state)]) as emu:
        with Driver.open(emu.resource, timeout_s=10) as drv:
            first = operations(drv)
    with EmulatorProcess([*ARGS, "--state", str(state)]) as emu:  # saved on SIGTERM, restored here
        with Driver.open(emu.resource, timeout_s=10) as drv:
            assert drv.last_program_id() == 5
            assert np.array_equal(drv.lifetime_pulses, expected[len(first) - 1])
            second = operations(drv, first_id=6)
    assert_same(first + second, expected)


def test_state_is_on_disk_before_a_program_is_acknowledged(tmp_path):
    state = tmp_path / "chip.npz"
    emu = EmulatorProcess([*ARGS, "--state", str(state)])
    try:
        with Driver.open(emu.resource, timeout_s=10) as drv:
            drv.apply(PulseProgram(41, np.arange(5), np.full(5, 2), np.zeros(5, bool)))
            lifetime = drv.lifetime_pulses.copy()
        emu.proc.kill()  # no chance to save on the way out
        emu.proc.wait()
    finally:
        emu.stop()
    with EmulatorProcess([*ARGS, "--state", str(state)]) as emu2:
        with Driver.open(emu2.resource, timeout_s=10) as drv:
            assert drv.last_program_id() == 41
            assert np.array_equal(drv.lifetime_pulses, lifetime)


def test_the_emulator_enforces_its_own_limits(tmp_path):
    limits = tmp_path / "limits.toml"
    limits.write_text("max_set_pulses_per_device = 2\n")
    with EmulatorProcess([*ARGS, "--limits", str(limits)]) as emu:
        with Driver.open(emu.resource, timeout_s=10, limits=SafetyLimits()) as drv:
            # The host's defaults allow 64; the limits in force are the stricter tester's.
            assert drv.tester_limits.max_set_pulses_per_device == 2 and drv.limits.max_set_pulses_per_device == 2
            bad = PulseProgram(1, np.array([4, 9]), np.array([1, 3]), np.zeros(2, bool))
            with pytest.raises(SafetyViolation, match="max_set_pulses_per_device"):
                drv.apply(bad)
            # A host that skipped its check still meets the tester's own.
            drv.transport.write(P.encode_message("PROG:APPL?", block=P.encode_program(bad)))
            reply = drv.transport.read_line()
            assert reply.startswith(b"!101,") and b"max_set_pulses_per_device" in reply and b"device 9" in reply
            assert drv.last_program_id() is None and drv.tester_lifetime_pulses().sum() == 0


def test_garbage_over_a_real_socket_only_fills_the_error_queue():
    with EmulatorProcess(ARGS) as emu:
        host, port = emu.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            f = s.makefile("rb")  # closed below too: the server serves one connection at a time
            s.sendall(b"\x00\xff\xfe garbage\nFOO:BAR?\nREAD? #14ab\n\n\ncd\nREAD? #9999999999\n*IDN?\n")
            assert f.readline().startswith(b"!-113,")  # FOO:BAR? is a query: it answers, with an error
            assert f.readline().startswith(b"!-160,")  # READ? with a 4-byte block: no room for a CRC
            assert f.readline().startswith(b"pcm-hil,emulator,")
            s.sendall(b"SYST:ERR?\nSYST:ERR?\nSYST:ERR?\nSYST:ERR?\n")
            errs = [f.readline() for _ in range(4)]
            f.close()
        assert errs[0].startswith(b"-100,") and errs[1].startswith(b"-113,") and errs[2].startswith(b"-100,")
        assert errs[3] == b'0,"No error"\n'
        with Driver.open(emu.resource, timeout_s=10) as drv:  # still serving
            assert drv.geometry.n_devices == ROWS * COLS


def test_the_emulator_refuses_every_program_id_not_after_its_last_over_a_raw_socket():
    """ids 50, 50, 40, 50: only the first applies (the old rule refused only an equal id, so 40 applied)."""
    with EmulatorProcess(ARGS) as emu:
        host, port = emu.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s, s.makefile("rb") as f:
            replies = []
            for pid in (50, 50, 40, 50):
                prog = PulseProgram(pid, np.array([pid % 42]), np.array([1]), np.array([False]))
                s.sendall(P.encode_message("PROG:APPL?", block=P.encode_program(prog)))
                replies.append(f.readline())
            s.sendall(b"LIFE:ALL?\n")
            head = f.read(2)
            d = int(head[1:2])
            counts = P.decode_counts(f.read(int(f.read(d)) + 1)[:-1])
        assert replies[0] == b"50\n"
        for r in replies[1:]:
            assert r.startswith(b'!102,"program ') and b"not after the last applied program 50" in r, r
        assert counts.sum() == 1 and counts[50 % 42] == 1


# ---------------------------------------------------------------------------- faults
def _program_stream(n_programs: int, n_devices: int, seed: int):
    rng = np.random.default_rng(seed)
    for pid in range(1, n_programs + 1):
        k = int(rng.integers(1, 6))
        addr = rng.choice(n_devices, k, replace=False)
        yield PulseProgram(pid, addr, rng.integers(0, 3, k), rng.random(k) < 0.05)


def _programs_under_faults(endpoint: Endpoint, url, n_programs: int, plan: FaultPlan) -> Driver:
    """Apply a seeded program stream through injected faults; assert the chip ends as without faults."""
    rows, cols = 4, 4
    reference = MockDriver(rows, cols, seed=SEED)
    for prog in _program_stream(n_programs, rows * cols, 99):
        reference.apply(prog)

    emulator = Emulator(MockDriver(rows, cols, seed=SEED))
    server = Server(emulator, endpoint, quiet_abandon_s=0.5)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        drv = Driver.open(url(server), timeout_s=0.05, retries=20)
        emulator.set_faults(plan)
        for prog in _program_stream(n_programs, rows * cols, 99):
            drv.apply(prog)  # injected refusals (200: nothing ran) are sent again by the driver itself
        emulator.set_faults(FaultPlan())
        assert drv.last_program_id() == n_programs
        assert np.array_equal(drv.tester_lifetime_pulses(), reference.lifetime_pulses)
        assert np.array_equal(drv.lifetime_pulses, reference.lifetime_pulses)
        drv.close()
    finally:
        server.stop()
        thread.join(10)
    assert emulator.driver.chip.state_equal(reference.chip)
    assert emulator.driver.now() == reference.now()
    assert drv.stats.retried_errors > 0
    return drv


@pytest.mark.slow
def test_ten_thousand_programs_with_faults_end_in_the_fault_free_state():
    plan = FaultPlan(lose=0.01, drop=0.01, delay=0.01, corrupt=0.01, error=0.01, delay_s=0.1, seed=7)
    drv = _programs_under_faults(Endpoint("tcp", "127.0.0.1", 0), lambda s: s.visa_resource, 10_000, plan)
    # Every kind of fault happened and was survived.
    assert drv.stats.reconnects > 150 and drv.stats.resends > 0


# pyserial's socket:// close() sleeps 0.3 s, so that link gets fewer programs.
@pytest.mark.parametrize("endpoint,url,n", [(Endpoint("tcp", "127.0.0.1", 0), lambda s: f"socket://{s.address}", 150),
                                            (Endpoint("pty"), lambda s: s.address, 500)], ids=["socket-url", "pty"])
def test_serial_links_survive_faults_too(endpoint, url, n):
    plan = FaultPlan(lose=0.03, drop=0.03, delay=0.03, corrupt=0.03, error=0.03, delay_s=0.1, seed=8)
    drv = _programs_under_faults(endpoint, url, n, plan)
    assert drv.stats.reconnects > 10 and drv.stats.resends > 0


def test_reads_under_faults_never_take_a_stale_reply_for_an_answer():
    """Noise-free chip: every read, retried through drops, delays and corruption, returns exactly the truth."""
    from sim import PCMParams

    quiet = PCMParams(read_noise_rel=0.0, read_noise_abs_us=0.0)
    emulator = Emulator(MockDriver(8, 8, seed=SEED, params=quiet))
    server = Server(emulator, Endpoint("tcp", "127.0.0.1", 0), quiet_abandon_s=0.5)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    rng = np.random.default_rng(3)
    try:
        drv = Driver.open(server.visa_resource, timeout_s=0.05, retries=20)
        drv.apply(PulseProgram(1, np.arange(64), rng.integers(0, 20, 64), np.zeros(64, bool)))
        truth = emulator.driver.chip.conductance(None, 0.0)  # before the drift law's t0: no drift yet
        emulator.set_faults(FaultPlan(lose=0.04, drop=0.04, delay=0.04, corrupt=0.04, error=0.04, delay_s=0.1, seed=9))
        for i in range(200):
            addr = None if i % 10 == 0 else rng.choice(64, int(rng.integers(1, 65)), replace=False)
            r = drv.read(addr)  # injected 200s are asked again by the driver
            expected = truth if addr is None else truth[addr]
            assert np.array_equal(r.conductances_us, expected)
        assert drv.stats.reconnects > 20
        drv.close()
    finally:
        server.stop()
        thread.join(10)


def test_serve_wraps_any_driver_and_stops_cleanly():
    from drivers import DryRunDriver
    from drivers.server import serve

    inner = MockDriver(2, 2, seed=1)
    dry = DryRunDriver(inner)
    ready: list[Server] = []
    thread = threading.Thread(target=serve, args=(dry, "127.0.0.1:0"), kwargs={"on_ready": ready.append}, daemon=True)
    thread.start()
    for _ in range(200):
        if ready:
            break
        threading.Event().wait(0.01)
    server = ready[0]
    try:
        with Driver.open(f"socket://{server.address}", timeout_s=10) as drv:
            assert drv.identity.endswith("(dry-run of pcm-hil;MockDriver;2x2;seed=1)")
            drv.apply(PulseProgram(3, np.array([1]), np.array([2]), np.array([False])))
            assert drv.last_program_id() == 3
    finally:
        server.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert [p.program_id for p in dry.programs] == [3] and inner.last_program_id() is None


def test_a_state_file_of_another_geometry_is_refused_clearly(tmp_path):
    state = tmp_path / "chip.npz"
    with EmulatorProcess([*ARGS, "--state", str(state)]):
        pass
    assert state.exists()
    with pytest.raises(RuntimeError, match="holds 42 devices, the emulator has 4"):
        EmulatorProcess(["--rows", "2", "--cols", "2", "--state", str(state)])


@pytest.fixture(scope="module")
def fuzz_target():
    with EmulatorProcess(ARGS) as emu:
        yield emu


@settings(max_examples=25)
@given(st.lists(st.binary(max_size=60) | st.sampled_from(
    [b"\n", b"READ? #", b"PROG:APPL? #3", b"*IDN?", b"READ:VOLT ", b"SYST:ERR?\n", b"#9", b"\r\n"]), max_size=10))
def test_fuzzed_bytes_over_a_real_socket_leave_the_emulator_serving(fuzz_target, chunks):
    host, port = fuzz_target.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"".join(chunks))
    with socket.create_connection((host, int(port)), timeout=10) as s:
        with s.makefile("rb") as f:
            s.sendall(b"*CLS\n*IDN?\n")
            assert f.readline().startswith(b"pcm-hil,emulator,")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("resource", ["TCPIP::127.0.0.1::{port}::SOCKET", "socket://127.0.0.1:{port}"])
def test_nobody_listening_is_disconnected(resource):
    from drivers import Disconnected

    with pytest.raises(Disconnected):  # pyvisa-py only notices on the first write
        Driver.open(resource.format(port=_closed_port()), timeout_s=1)


def test_a_silent_tester_times_out():
    from drivers import DriverTimeout

    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts (backlog) but never answers
        port = listener.getsockname()[1]
        with pytest.raises(DriverTimeout):
            Driver.open(f"TCPIP::127.0.0.1::{port}::SOCKET", timeout_s=0.05, retries=1)


def test_cli_params_and_fault_options_take_effect(tmp_path):
    params = tmp_path / "quiet.toml"
    params.write_text("read_noise_rel = 0.0\nread_noise_abs_us = 0.0\n")
    faults = ["--fault-lose", "0.1", "--fault-drop", "0.1", "--fault-corrupt", "0.1", "--fault-delay", "0.1",
              "--fault-delay-s", "0.1", "--fault-seed", "3"]
    with EmulatorProcess([*ARGS, "--params", str(params), *faults]) as emu:
        with Driver.open(emu.resource, timeout_s=0.05, retries=20) as drv:
            for pid in range(1, 21):
                drv.apply(PulseProgram(pid, np.array([pid % 42]), np.array([1]), np.array([False])))
            first, second = drv.read(), drv.read()
            assert np.array_equal(first.conductances_us, second.conductances_us)  # no read noise
            assert drv.last_program_id() == 20 and drv.stats.reconnects > 0
            assert drv.tester_lifetime_pulses().sum() == 20


# Fault seeds whose first draw corrupts "314\n" into another number: 60 -> "364", 83 -> "318", 156 -> "114".
@pytest.mark.parametrize("seed", [60, 83])
def test_last_program_id_through_corrupted_replies_is_always_the_truth(seed):
    """--fault-corrupt flips one byte of a reply; a flipped digit of PROG:LAST? must never be believed."""
    emulator = Emulator(MockDriver(2, 2, seed=SEED))
    server = Server(emulator, Endpoint("tcp", "127.0.0.1", 0), quiet_abandon_s=0.5)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with Driver.open(server.visa_resource, timeout_s=0.05, retries=20) as drv:
            drv.apply(PulseProgram(314, np.array([1]), np.array([1]), np.array([False])))
            emulator.set_faults(FaultPlan(corrupt=0.5, seed=seed))
            answers = [drv.last_program_id() for _ in range(6)]
            emulator.set_faults(FaultPlan())
        assert set(answers) == {314}
    finally:
        server.stop()
        thread.join(10)


# ---------------------------------------------------------------------------- a closed link costs no timeout
def _one_shot_server(reply: bytes) -> tuple[socket.socket, threading.Thread]:
    """Accept one connection, read one message, send reply (maybe b''), then close the connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1 << 16)
            conn.sendall(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("reply", [b"", b"half a li", b"#3100abc"], ids=["nothing", "half-line", "half-block"])
def test_a_tester_closing_the_link_is_disconnected_not_a_timeout(reply):
    """pyvisa-py polls an end of stream until its timeout; the transport must say Disconnected at once."""
    from drivers import Disconnected
    from drivers.transport import VisaTransport

    listener, thread = _one_shot_server(reply)
    with listener:
        t = VisaTransport(f"TCPIP::127.0.0.1::{listener.getsockname()[1]}::SOCKET", timeout_s=30)
        try:
            t.write(b"READ:ALL?\n" if reply.startswith(b"#") else b"*IDN?\n")
            with pytest.raises(Disconnected, match="closed the connection"):
                t.read_exact(100) if reply.startswith(b"#") else t.read_line()
        finally:
            t.close()
        thread.join(10)


def test_lost_and_dropped_links_are_recovered_without_waiting_a_timeout():
    emulator = Emulator(MockDriver(4, 4, seed=SEED))
    server = Server(emulator, Endpoint("tcp", "127.0.0.1", 0))
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with Driver.open(server.visa_resource, timeout_s=30, retries=20) as drv:
            emulator.set_faults(FaultPlan(lose=0.1, drop=0.1, error=0.1, seed=4))
            for prog in _program_stream(100, 16, 5):
                drv.apply(prog)
                drv.read(prog.addresses)
            emulator.set_faults(FaultPlan())
            assert drv.last_program_id() == 100
            assert np.array_equal(drv.tester_lifetime_pulses(), drv.lifetime_pulses)
            s = drv.stats
        assert s.reconnects > 10 and s.resends > 0 and s.retried_errors > 0
        assert s.timeouts == 0  # each closed link was noticed at once, not after the 30 s timeout
    finally:
        server.stop()
        thread.join(10)
