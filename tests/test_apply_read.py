"""One round trip per training step: PROG:APPL:READ? on the wire, apply_and_read in the driver contract."""

from __future__ import annotations

import struct
import threading
import zlib

import numpy as np
import pytest
from test_tester import HANDSHAKE, Script, blk

from drivers import (Disconnected, DriverTimeout, InstrumentError, LoggedDriver, MockDriver, PulseProgram,
                     RunLogReader, RunLogWriter, SafetyViolation)
from drivers import TesterDriver as Driver
from drivers import protocol as P
from drivers.base import APPLY_READ
from drivers.server import Emulator, Endpoint, FaultPlan, Server

PROG = PulseProgram(9, np.array([1, 4]), np.array([2, 0]), np.array([False, True]))
COMBINED = P.encode_message("PROG:APPL:READ?", block=P.encode_program(PROG))
READ_BACK = P.encode_message("READ?", block=P.encode_addresses(PROG.addresses))


def reply(pid: int = 9, g=(10.0, 0.1), t_prog: float = 1.5, t_s: float = 1.75) -> bytes:
    return blk(P.encode_apply_read_reply(pid, t_prog, t_s, g))


@pytest.fixture
def script(mocker):
    return Script(mocker, HANDSHAKE)


def connect(script, options: bytes = b"PROG:APPL:READ?\n") -> Driver:
    drv = Driver(script.t, retries=2)
    script.expect((b"*OPT?\n", options))
    return drv


# ---------------------------------------------------------------------------- the codec
def test_apply_read_reply_layout_is_id_clocks_then_a_read_reply_with_crc():
    payload = P.encode_apply_read_reply(9, 1.5, 1.75, [10.0, 0.25])
    body = struct.pack("<QddI", 9, 1.5, 1.75, 2) + np.array([10.0, 0.25], "<f4").tobytes()
    assert payload == body + struct.pack("<I", zlib.crc32(body))
    pid, t_prog, t_s, g = P.decode_apply_read_reply(payload)
    assert (pid, t_prog, t_s, g.tolist()) == (9, 1.5, 1.75, [10.0, 0.25])
    with pytest.raises(P.BlockError, match="CRC"):
        P.decode_apply_read_reply(payload[:-5] + bytes([payload[-5] ^ 1]) + payload[-4:])


def test_options_parse_like_ieee_488_2_opt():
    assert P.parse_options("0") == frozenset()
    assert P.parse_options(" prog:appl:read? ,FOO") == {"PROG:APPL:READ?", "FOO"}


# ---------------------------------------------------------------------------- the emulator
def _ask(emulator: Emulator, header: str, block: bytes | None = None) -> bytes:
    (item,) = P.MessageParser(max_block=emulator.max_block).feed(P.encode_message(header, block=block))
    data = emulator.handle(item).data
    assert data is not None
    return data


def test_the_emulator_declares_and_serves_apply_read_as_apply_then_read():
    combined, separate = Emulator(MockDriver(2, 3, seed=0)), Emulator(MockDriver(2, 3, seed=0))
    assert _ask(combined, "*OPT?") == b"PROG:APPL:READ?\n"
    t0 = float(_ask(separate, "TIME?"))
    assert _ask(separate, "PROG:APPL?", P.encode_program(PROG)) == b"9\n"
    t_s, g = P.decode_read_reply(P.decode_block(_ask(separate, "READ?", P.encode_addresses(PROG.addresses))[:-1]))
    pid, t_prog, t_read, g2 = P.decode_apply_read_reply(P.decode_block(_ask(combined, "PROG:APPL:READ?",
                                                                            P.encode_program(PROG))[:-1]))
    assert (pid, t_prog, t_read) == (9, t0, t_s) and np.array_equal(g, g2)
    assert combined.driver.chip.state_equal(separate.driver.chip)
    assert np.array_equal(combined.driver.lifetime_pulses, separate.driver.lifetime_pulses)
    assert _ask(combined, "PROG:LAST?") == b"9\n"


@pytest.mark.parametrize("pid", [9, 3])
def test_the_emulator_refuses_apply_read_of_an_id_not_after_the_last(pid):
    e = Emulator(MockDriver(2, 3, seed=0))
    _ask(e, "PROG:APPL:READ?", P.encode_program(PROG))
    again = PulseProgram(pid, np.array([2]), np.array([1]), np.array([False]))
    r = _ask(e, "PROG:APPL:READ?", P.encode_program(again))
    assert r.startswith(b'!102,"program ') and b"not after the last applied program 9" in r
    assert e.driver.lifetime_pulses.tolist() == [0, 2, 0, 0, 1, 0]


# ---------------------------------------------------------------------------- the driver, message-exact
def test_apply_and_read_is_one_round_trip_on_a_tester_that_declares_it(script):
    drv = connect(script)
    script.expect((COMBINED, reply()))
    r = drv.apply_and_read(PROG)
    assert r.addresses.tolist() == [1, 4] and r.conductances_us.tolist() == [10.0, np.float32(0.1)] and r.t_s == 1.75
    assert drv.lifetime_pulses.tolist() == [0, 3, 2, 3, 5, 5]
    assert drv.stats.round_trips == 4 + 1 + 1 and not script.pairs  # handshake, *OPT? once, the step
    prog2 = PulseProgram(10, np.array([0]), np.array([1]), np.array([False]))
    script.expect((P.encode_message("PROG:APPL:READ?", block=P.encode_program(prog2)), reply(10, [3.0])))
    drv.apply_and_read(prog2)
    assert drv.stats.round_trips == 7  # *OPT? is asked once


@pytest.mark.parametrize("options", [b'!-113,"undefined header \'*OPT?\'"\n', b"0\n"], ids=["no *OPT?", "no option"])
def test_a_tester_without_the_combined_command_gets_apply_then_read(script, options):
    drv = connect(script, options)
    script.expect((P.encode_message("PROG:APPL?", block=P.encode_program(PROG)), b"9\n"),
                  (READ_BACK, blk(P.encode_read_reply(2.0, [10.0, 0.1]))))
    assert drv.apply_and_read(PROG).conductances_us.tolist() == [10.0, np.float32(0.1)]
    assert APPLY_READ not in drv.capabilities and not script.pairs


def test_a_lost_reply_of_a_landed_program_is_not_resent_and_read_plainly(script):
    """The link dies after PROG:APPL:READ? went out; PROG:LAST? (agreed) says it landed: READ?, no second send."""
    drv = connect(script)
    script.expect((COMBINED, Disconnected("link dropped")), (b"PROG:LAST?\n", b"9\n"), (b"PROG:LAST?\n", b"9\n"),
                  (READ_BACK, blk(P.encode_read_reply(2.0, [10.0, 0.1]))))
    r = drv.apply_and_read(PROG)
    assert r.conductances_us.tolist() == [10.0, np.float32(0.1)] and r.t_s == 2.0
    assert script.writes().count(COMBINED) == 1 and drv.stats.resends == 0 and not script.pairs
    assert drv.lifetime_pulses.tolist() == [0, 3, 2, 3, 5, 5]


@pytest.mark.parametrize("failure", [DriverTimeout("no reply"), "corrupt"], ids=["timeout", "bad CRC"])
def test_a_program_that_did_not_land_is_sent_again_once(script, failure):
    drv = connect(script)
    bad = reply()[:-6] + bytes([reply()[-6] ^ 0x40]) + reply()[-5:]  # one flipped conductance byte
    script.expect((COMBINED, bad if failure == "corrupt" else failure), (b"PROG:LAST?\n", b"8\n"),
                  (b"PROG:LAST?\n", b"8\n"), (COMBINED, reply()))
    assert drv.apply_and_read(PROG).conductances_us.tolist() == [10.0, np.float32(0.1)]
    assert script.writes().count(COMBINED) == 2 and drv.stats.resends == 1 and not script.pairs


def test_a_reply_for_another_program_is_not_believed(script):
    drv = connect(script)
    script.expect((COMBINED, reply(pid=8)), (b"PROG:LAST?\n", b"9\n"), (b"PROG:LAST?\n", b"9\n"),
                  (READ_BACK, blk(P.encode_read_reply(2.0, [1.0, 2.0]))))
    assert drv.apply_and_read(PROG).conductances_us.tolist() == [1.0, 2.0]
    assert script.writes().count(COMBINED) == 1


def test_instrument_errors_and_refusals_as_apply(script):
    drv = connect(script)
    script.expect((COMBINED, b'!-222,"address 4 is bad"\n'))
    with pytest.raises(InstrumentError) as e:
        drv.apply_and_read(PROG)
    assert e.value.code == -222 and drv.lifetime_pulses[4] == 4  # not booked
    n = script.t.write.call_count
    with pytest.raises(SafetyViolation):
        drv.apply_and_read(PulseProgram(11, np.array([0]), np.array([65]), np.array([False])))
    assert script.t.write.call_count == n


# ---------------------------------------------------------------------------- logging and the real link
def _serve(emulator: Emulator):
    server = Server(emulator, Endpoint("tcp", "127.0.0.1", 0), quiet_abandon_s=0.5)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def _steps(drv, n_steps: int, combined: bool) -> list:
    rng = np.random.default_rng(5)
    out = []
    for step in range(n_steps):
        drv.step = step
        a = rng.choice(drv.geometry.n_devices, 6, replace=False)
        p = PulseProgram(step + 1, a, rng.integers(0, 4, 6), rng.random(6) < 0.2)
        with drv.reading("after-program"):
            if combined:
                out.append(drv.apply_and_read(p))
            else:
                drv.apply(p)
                out.append(drv.read(p.addresses))
    return out


def _logged_rows(path) -> tuple:
    with RunLogReader(path) as r:
        ev, pe = r.read_events(), r.program_events()
        progs = [(s, t, p.program_id, p.addresses.tolist(), p.set_counts.tolist(), p.reset.tolist())
                 for s, t, p in r.programs()]
        return progs, {k: np.asarray(ev[k]).tolist() for k in ("step", "t_s", "reason", "wall_s")}, \
            r.reads()["conductance_us"].tolist(), np.asarray(pe["wall_s"]).tolist()


@pytest.mark.parametrize("over", ["mock", "tester"])
def test_apply_and_read_logs_the_rows_apply_then_read_logs(tmp_path, over):
    """Same programs (times included), reads, reasons and order; over a tester in one round trip per step."""
    rows = []
    for combined in (False, True):
        servers = []
        if over == "mock":
            inner = MockDriver(4, 5, seed=2)
        else:
            servers.append(_serve(Emulator(MockDriver(4, 5, seed=2))))
            inner = Driver.open(servers[0][0].visa_resource, timeout_s=10)
        try:
            wall = iter(range(1000))
            with RunLogWriter(tmp_path / f"{over}{combined}.h5") as w:
                d = LoggedDriver(inner, w, wall_clock=lambda: float(next(wall)))
                if over == "tester":
                    assert (APPLY_READ in d.capabilities) is True
                    rt0 = inner.stats.round_trips
                _steps(d, 12, combined)
                if over == "tester":
                    assert inner.stats.round_trips - rt0 == (12 if combined else 36)  # (TIME?, PROG, READ) x 12
        finally:
            inner.close()
            for server, thread in servers:
                server.stop()
                thread.join(10)
        rows.append(_logged_rows(tmp_path / f"{over}{combined}.h5"))
    assert rows[0] == rows[1]


def test_a_failed_apply_and_read_is_logged_as_apply_would_log_it(tmp_path):
    emulator = Emulator(MockDriver(4, 5, seed=2))
    server, thread = _serve(emulator)
    try:
        with Driver.open(server.visa_resource, timeout_s=0.05, retries=1) as drv, \
                RunLogWriter(tmp_path / "run.h5") as w:
            d = LoggedDriver(drv, w)
            assert APPLY_READ in d.capabilities
            emulator.set_faults(FaultPlan(error=1.0))  # every query refused without running: gives up
            with pytest.raises(Disconnected, match="not confirmed"):
                d.apply_and_read(PROG)
            emulator.set_faults(FaultPlan())
    finally:
        server.stop()
        thread.join(10)
    with RunLogReader(tmp_path / "run.h5") as r:
        (step, t, p), = r.programs()
        assert p.program_id == 9 and np.isnan(t) and len(r.read_events()["step"]) == 0
