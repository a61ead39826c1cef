"""TesterDriver, message-exact: a mocked transport expects exact command bytes and gives exact replies."""

from __future__ import annotations

from unittest.mock import call

import numpy as np
import pytest

from drivers import Disconnected, DriverError, DriverTimeout, InstrumentError, ProtocolError, PulseProgram, SafetyLimits, \
    SafetyViolation
from drivers import TesterDriver as Driver
from drivers import protocol as P
from drivers.transport import Transport, is_serial_url

LIMITS = SafetyLimits()


def blk(payload: bytes) -> bytes:
    return P.encode_block(payload) + b"\n"


HANDSHAKE = [
    (b"*IDN?\n", b"ACME,PCM-1,42,1.0\n"),
    (b"GEOM?\n", b"2,3\n"),
    (b"LIM?\n", LIMITS.model_dump_json().encode() + b"\n"),
    (b"LIFE:ALL?\n", blk(P.encode_counts([0, 1, 2, 3, 4, 5]))),
]


class Script:
    """Drives a create_autospec(Transport): each write must equal the next expected bytes."""

    def __init__(self, mocker, pairs):
        self.pairs = list(pairs)
        self.buf = b""
        self.pending: Exception | None = None
        self.stale = b""
        self.syncs = 0
        t = mocker.create_autospec(Transport, instance=True)
        t.timeout_s = 1.0
        t.write.side_effect = self._write
        t.read_line.side_effect = self._read_line
        t.read_exact.side_effect = self._read_exact
        self.t = t

    def expect(self, *pairs):
        self.pairs += pairs

    def _write(self, data: bytes) -> None:
        if data.startswith(b"SYNC? "):  # recovery: echo the (random) token after whatever is stale
            self.pending = None
            self.buf += self.stale + data.split(b" ", 1)[1]
            self.syncs += 1
            return
        assert self.pairs, f"unexpected write {data!r}"
        expected, reply = self.pairs.pop(0)
        if callable(expected):
            assert expected(data), data
        else:
            assert data == expected
        if isinstance(reply, Exception):
            self.buf, self.pending = b"", reply
        elif reply is not None:
            self.buf += reply

    def _take_pending(self) -> None:
        if self.pending is not None:
            e, self.pending = self.pending, None
            raise e

    def _read_line(self) -> bytes:
        self._take_pending()
        i = self.buf.find(b"\n")
        if i < 0:
            raise DriverTimeout("no line")
        line, self.buf = self.buf[:i + 1], self.buf[i + 1:]
        return line

    def _read_exact(self, n: int) -> bytes:
        self._take_pending()
        if len(self.buf) < n:
            raise DriverTimeout("short")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def writes(self):
        return [c.args[0] for c in self.t.write.call_args_list]


@pytest.fixture
def script(mocker):
    return Script(mocker, HANDSHAKE)


def connect(script) -> Driver:
    drv = Driver(script.t, retries=2)
    assert not script.pairs
    return drv


def test_handshake_learns_identity_geometry_limits_and_lifetime(script):
    drv = connect(script)
    assert drv.identity == "ACME,PCM-1,42,1.0"
    assert (drv.geometry.rows, drv.geometry.cols) == (2, 3)
    assert drv.limits == LIMITS
    assert drv.lifetime_pulses.tolist() == [0, 1, 2, 3, 4, 5]
    assert script.writes() == [p[0] for p in HANDSHAKE]


def test_read_is_one_exact_round_trip(script):
    drv = connect(script)
    addr = np.array([5, 0])
    req = P.encode_message("READ?", block=P.encode_addresses(addr))
    assert req == b"READ? #216" + b"\x02\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00" + req[-5:-1] + b"\n"
    script.expect((req, blk(P.encode_read_reply(2.5, [10.0, 11.0]))))
    r = drv.read(addr)
    assert r.t_s == 2.5 and r.conductances_us.tolist() == [10.0, 11.0] and r.addresses.tolist() == [5, 0]
    script.expect((b"READ:ALL?\n", blk(P.encode_read_reply(3.0, np.arange(6)))))
    assert drv.read().conductances_us.tolist() == list(range(6))
    assert drv.stats.round_trips == 4 + 2


def test_program_is_one_round_trip_and_updates_the_ledger(script):
    drv = connect(script)
    prog = PulseProgram(9, np.array([1, 4]), np.array([2, 0]), np.array([False, True]))
    script.expect((P.encode_message("PROG:APPL?", block=P.encode_program(prog)), b"9\n"))
    drv.apply(prog)
    assert drv.lifetime_pulses.tolist() == [0, 3, 2, 3, 5, 5]
    assert drv.stats.round_trips == 5 and drv.stats.resends == 0


def test_instrument_errors_come_back_typed(script):
    drv = connect(script)
    script.expect((P.encode_message("READ?", block=P.encode_addresses([1])), b'!-222,"address 1 is bad"\n'))
    with pytest.raises(InstrumentError) as e:
        drv.read([1])
    assert (e.value.code, e.value.message, e.value.command) == (-222, "address 1 is bad", "READ?")
    script.expect((b"SYST:ERR?\n", b'-113,"undefined header"\n'), (b"SYST:ERR?\n", b'0,"No error"\n'))
    assert drv.errors() == [(-113, "undefined header")]


def test_malformed_replies_are_protocol_errors_after_retries(script):
    drv = connect(script)
    for _ in range(3):  # first try + 2 retries, each failure followed by reconnect + sync
        script.expect((b"PROG:LAST?\n", b"banana\n"))
    with pytest.raises(ProtocolError, match="banana"):
        drv.last_program_id()
    script.expect(*[(b"TIME?\n", b"#13abc\n")] * 3)
    with pytest.raises(ProtocolError):
        drv.now()


def test_lost_reply_after_apply_is_not_resent(script):
    """The link dies after the program went out; PROG:LAST? says it landed: no second send."""
    drv = connect(script)
    prog = PulseProgram(7, np.array([2]), np.array([1]), np.array([False]))
    msg = P.encode_message("PROG:APPL?", block=P.encode_program(prog))
    script.expect((msg, Disconnected("link dropped")), (b"PROG:LAST?\n", b"7\n"), (b"PROG:LAST?\n", b"7\n"))
    drv.apply(prog)
    assert script.writes().count(msg) == 1
    assert script.t.reconnect.call_count == 1 and script.syncs == 1
    assert drv.lifetime_pulses[2] == 3
    assert drv.stats.resends == 0


def test_program_not_applied_before_the_drop_is_sent_again_once(script):
    drv = connect(script)
    prog = PulseProgram(8, np.array([0]), np.array([2]), np.array([False]))
    msg = P.encode_message("PROG:APPL?", block=P.encode_program(prog))
    script.stale = b"a late reply\n#14\n\n\n\n\n"
    script.expect((msg, DriverTimeout("no reply")), (b"PROG:LAST?\n", b"6\n"), (b"PROG:LAST?\n", b"6\n"),
                  (msg, b"8\n"))
    drv.apply(prog)
    assert script.writes().count(msg) == 2 and drv.stats.resends == 1
    assert drv.lifetime_pulses[0] == 2
    assert not script.pairs


def test_disagreeing_prog_last_answers_are_asked_again(script):
    drv = connect(script)
    prog = PulseProgram(8, np.array([0]), np.array([2]), np.array([False]))
    msg = P.encode_message("PROG:APPL?", block=P.encode_program(prog))
    script.expect((msg, b"x\n"),  # a corrupted id reply
                  (b"PROG:LAST?\n", b"6\n"), (b"PROG:LAST?\n", b"8\n"),  # disagree: ask again
                  (b"PROG:LAST?\n", b"8\n"))  # two in a row agree
    drv.apply(prog)
    assert script.writes().count(msg) == 1 and script.syncs == 1 and not script.pairs


def test_prog_last_answers_that_never_settle_are_asked_after_a_new_recovery(script):
    drv = connect(script)
    prog = PulseProgram(8, np.array([0]), np.array([2]), np.array([False]))
    msg = P.encode_message("PROG:APPL?", block=P.encode_program(prog))
    script.expect((msg, DriverTimeout("lost")), *[(b"PROG:LAST?\n", x) for x in (b"6\n", b"8\n", b"6\n", b"8\n")],
                  (b"PROG:LAST?\n", b"7\n"), (b"PROG:LAST?\n", b"7\n"), (msg, b"8\n"))
    drv.apply(prog)
    assert script.writes().count(msg) == 2 and script.syncs == 2 and not script.pairs


def test_unconfirmable_program_raises_without_sending_twice(script):
    drv = connect(script)
    prog = PulseProgram(8, np.array([0]), np.array([2]), np.array([False]))
    msg = P.encode_message("PROG:APPL?", block=P.encode_program(prog))
    script.expect((msg, DriverTimeout("x")), *[(b"PROG:LAST?\n", DriverTimeout("x"))] * 3)
    with pytest.raises(Disconnected, match="cannot learn"):
        drv.apply(prog)
    assert script.writes().count(msg) == 1
    assert drv.lifetime_pulses[0] == 0


def test_refused_program_sends_nothing(script):
    drv = connect(script)
    n_before = script.t.write.call_count
    bad = PulseProgram(1, np.array([0]), np.array([65]), np.array([False]))
    with pytest.raises(SafetyViolation) as e:
        drv.apply(bad)
    assert e.value.limit == "max_set_pulses_per_device" and e.value.device == 0
    assert script.t.write.call_count == n_before


def test_host_limits_can_be_stricter_than_the_testers(mocker):
    s = Script(mocker, HANDSHAKE)
    strict = SafetyLimits(max_devices_per_program=1)
    drv = Driver(s.t, limits=strict)
    assert drv.limits == strict and drv.tester_limits == LIMITS
    with pytest.raises(SafetyViolation, match="max_devices_per_program"):
        drv.apply(PulseProgram(1, np.array([0, 1]), np.array([1, 1]), np.array([False, False])))
    assert s.t.write.call_count == len(HANDSHAKE)


def test_set_read_voltage_checks_the_error_queue(script):
    drv = connect(script)
    script.expect((b"READ:VOLT 0.3\n", None), (b"SYST:ERR?\n", b'0,"No error"\n'))
    drv.set_read_voltage(0.3)
    script.expect((b"READ:VOLT 5.0\n", None), (b"SYST:ERR?\n", b'-222,"too high"\n'))
    with pytest.raises(InstrumentError, match="too high"):
        drv.set_read_voltage(5.0)


def test_close_closes_the_transport(script):
    drv = connect(script)
    drv.close()
    assert script.t.close.call_args_list == [call()]


@pytest.mark.parametrize("resource,serial", [("TCPIP::1.2.3.4::5025::SOCKET", True and False),
                                             ("GPIB0::5::INSTR", False), ("ASRL/dev/ttyS0::INSTR", False),
                                             ("socket://127.0.0.1:5025", True), ("/dev/pts/3", True),
                                             ("COM3", True), ("loop://", True)])
def test_open_picks_the_transport_by_resource(resource, serial):
    assert is_serial_url(resource) is serial


def test_a_corrupted_read_reply_is_read_again_after_a_sync(script):
    drv = connect(script)
    req = P.encode_message("READ?", block=P.encode_addresses([1]))
    good = blk(P.encode_read_reply(1.0, [4.0]))
    bad = bytearray(good)
    bad[-3] ^= 0x40  # inside the CRC
    script.expect((req, bytes(bad)), (req, good))
    assert drv.read([1]).conductances_us.tolist() == [4.0]
    assert script.t.reconnect.call_count == 1 and script.syncs == 1 and drv.stats.retried_queries == 1


def test_a_tester_without_lim_needs_host_limits(mocker):
    no_lim = [HANDSHAKE[0], HANDSHAKE[1], (b"LIM?\n", b'!-113,"undefined header"\n')]
    s = Script(mocker, no_lim)
    with pytest.raises(DriverError, match="pass limits="):
        Driver(s.t)
    assert s.t.close.called
    s = Script(mocker, [*no_lim, HANDSHAKE[3]])
    strict = SafetyLimits(max_set_pulses_per_device=3)
    assert Driver(s.t, limits=strict).tester_limits == strict


def test_a_program_garbled_on_the_way_in_is_sent_again(script):
    drv = connect(script)
    prog = PulseProgram(4, np.array([5]), np.array([1]), np.array([False]))
    msg = P.encode_message("PROG:APPL?", block=P.encode_program(prog))
    script.expect((msg, b'!-160,"program payload fails its CRC32 check (corrupted in transit)"\n'), (msg, b"4\n"))
    drv.apply(prog)
    assert script.writes().count(msg) == 2 and drv.stats.resends == 1 and drv.lifetime_pulses[5] == 6


# ---------------------------------------------------------------------------- issue 8
def test_last_program_id_is_believed_only_when_two_answers_in_a_row_agree(script):
    """A resume settles programs by this answer: one corrupted reply ('314' read as '324') must not count."""
    drv = connect(script)
    script.expect((b"PROG:LAST?\n", b"324\n"), (b"PROG:LAST?\n", b"314\n"), (b"PROG:LAST?\n", b"314\n"))
    assert drv.last_program_id() == 314
    assert not script.pairs
    script.expect((b"PROG:LAST?\n", b"0\n"), (b"PROG:LAST?\n", b"0\n"))
    assert drv.last_program_id() is None


def test_last_program_id_that_never_settles_raises(script):
    drv = connect(script)  # retries=2: at most 6 answers
    script.expect(*[(b"PROG:LAST?\n", b"%d\n" % (5 + i % 2)) for i in range(6)])
    with pytest.raises(ProtocolError, match="no two agreeing answers"):
        drv.last_program_id()
    assert not script.pairs


def test_a_resend_refused_as_old_counts_as_landed_only_if_prog_last_is_its_id(script):
    drv = connect(script)
    prog = PulseProgram(8, np.array([0]), np.array([2]), np.array([False]))
    msg = P.encode_message("PROG:APPL?", block=P.encode_program(prog))
    refused = b'!102,"program 8 is not after the last applied program 8; not applied"\n'
    # The tester answered PROG:LAST? 6 (twice, from a stale state), then refused the re-send: it has 8 now.
    script.expect((msg, DriverTimeout("lost")), (b"PROG:LAST?\n", b"6\n"), (b"PROG:LAST?\n", b"6\n"),
                  (msg, refused), (b"PROG:LAST?\n", b"8\n"), (b"PROG:LAST?\n", b"8\n"))
    drv.apply(prog)
    assert drv.lifetime_pulses[0] == 2 and not script.pairs


def test_a_resend_refused_as_old_with_another_last_id_raises(script):
    drv = connect(script)
    prog = PulseProgram(8, np.array([0]), np.array([2]), np.array([False]))
    msg = P.encode_message("PROG:APPL?", block=P.encode_program(prog))
    refused = b'!102,"program 8 is not after the last applied program 9; not applied"\n'
    script.expect((msg, DriverTimeout("lost")), (b"PROG:LAST?\n", b"6\n"), (b"PROG:LAST?\n", b"6\n"),
                  (msg, refused), (b"PROG:LAST?\n", b"9\n"), (b"PROG:LAST?\n", b"9\n"))
    with pytest.raises(InstrumentError, match="last applied program is 9, not 8") as e:
        drv.apply(prog)
    assert e.value.code == 102
    assert drv.lifetime_pulses[0] == 0  # not booked: the tester never applied program 8 for us


def test_a_program_refused_as_old_on_the_first_send_raises(script):
    drv = connect(script)
    prog = PulseProgram(3, np.array([0]), np.array([2]), np.array([False]))
    msg = P.encode_message("PROG:APPL?", block=P.encode_program(prog))
    script.expect((msg, b'!102,"program 3 is not after the last applied program 9; not applied"\n'))
    with pytest.raises(InstrumentError, match="last applied program 9"):
        drv.apply(prog)
    assert script.writes().count(msg) == 1 and drv.lifetime_pulses[0] == 0


def test_error_200_on_a_query_is_asked_again_on_the_same_link(script):
    """200: the tester did not run the command; an idempotent query is simply asked again."""
    drv = connect(script)
    req = P.encode_message("READ?", block=P.encode_addresses([1]))
    script.expect((req, b'!200,"injected fault"\n'), (req, blk(P.encode_read_reply(1.0, [4.0]))))
    assert drv.read([1]).conductances_us.tolist() == [4.0]
    script.expect((b"TIME?\n", b'!200,"injected fault"\n'), (b"TIME?\n", b"2.5\n"))
    assert drv.now() == 2.5
    assert script.t.reconnect.call_count == 0 and drv.stats.retried_errors == 2


def test_error_200_on_every_try_raises_it(script):
    drv = connect(script)
    script.expect(*[(b"TIME?\n", b'!200,"injected fault"\n')] * 3)
    with pytest.raises(InstrumentError) as e:
        drv.now()
    assert e.value.code == 200 and not script.pairs


def test_a_program_refused_with_200_is_sent_again(script):
    drv = connect(script)
    prog = PulseProgram(4, np.array([5]), np.array([1]), np.array([False]))
    msg = P.encode_message("PROG:APPL?", block=P.encode_program(prog))
    script.expect((msg, b'!200,"injected fault"\n'), (msg, b"4\n"))
    drv.apply(prog)
    assert script.writes().count(msg) == 2 and drv.stats.resends == 1 and drv.lifetime_pulses[5] == 6
    assert script.t.reconnect.call_count == 0


def test_limits_in_force_are_the_intersection_of_host_and_tester(mocker):
    from drivers import Range

    tester = SafetyLimits(set_amplitude_ua=Range(min=20, max=150), max_set_pulses_per_device=8, address_max=4)
    pairs = [HANDSHAKE[0], HANDSHAKE[1], (b"LIM?\n", tester.model_dump_json().encode() + b"\n"), HANDSHAKE[3]]
    s = Script(mocker, pairs)
    host = SafetyLimits(set_amplitude_ua=Range(min=10, max=5000), max_set_pulses_per_device=64,
                        max_devices_per_program=1)
    drv = Driver(s.t, limits=host)
    lim = drv.limits
    assert (lim.set_amplitude_ua.min, lim.set_amplitude_ua.max) == (20, 150)  # the tester's, not the host's 5000
    assert lim.max_set_pulses_per_device == 8 and lim.address_max == 4 and lim.max_devices_per_program == 1
    assert drv.tester_limits == tester
    from drivers import PulseShape, PulseShapes

    hot = PulseProgram(1, np.array([0]), np.array([1]), np.array([False]),
                       PulseShapes(set=PulseShape(amplitude_ua=4000, width_ns=50)))
    with pytest.raises(SafetyViolation, match="set_amplitude_ua"):
        drv.apply(hot)
    with pytest.raises(SafetyViolation, match="max_set_pulses_per_device"):
        drv.apply(PulseProgram(1, np.array([0]), np.array([9]), np.array([False])))
    assert s.t.write.call_count == len(pairs)


def test_limits_that_do_not_overlap_refuse_the_connection(mocker):
    from drivers import Range

    s = Script(mocker, HANDSHAKE[:3])
    with pytest.raises(SafetyViolation, match="do not overlap"):
        Driver(s.t, limits=SafetyLimits(set_amplitude_ua=Range(min=500, max=600)))
    assert s.t.close.called


def test_a_sync_refused_with_200_is_sent_again_with_a_new_token(script):
    """Without this, recovery waited its whole sync timeout for an echo that could never come."""
    drv = connect(script)
    req = P.encode_message("READ?", block=P.encode_addresses([1]))
    script.expect((req, DriverTimeout("lost")))
    refuse_first = {"n": 0}
    write = script.t.write.side_effect

    def sync_refused_once(data: bytes) -> None:
        if data.startswith(b"SYNC? ") and refuse_first["n"] == 0:
            refuse_first["n"] = 1
            script.pending = None
            script.buf += b'!200,"injected fault"\n'
            return
        write(data)

    script.t.write.side_effect = sync_refused_once
    script.expect((req, blk(P.encode_read_reply(1.0, [4.0]))))
    assert drv.read([1]).conductances_us.tolist() == [4.0]
    syncs = [w for w in script.writes() if w.startswith(b"SYNC? ")]
    assert len(syncs) == 2 and syncs[0] != syncs[1] and drv.stats.retried_errors == 1
    assert drv.stats.timeouts == 1  # the lost reply only, none waiting for the echo


def test_a_corrupted_sync_echo_is_followed_by_another_sync_not_a_long_wait(script):
    drv = connect(script)
    req = P.encode_message("READ?", block=P.encode_addresses([1]))
    script.expect((req, DriverTimeout("lost")))
    write = script.t.write.side_effect
    seen = {"n": 0}

    def first_echo_corrupted(data: bytes) -> None:
        write(data)
        if data.startswith(b"SYNC? ") and seen["n"] == 0:
            seen["n"] = 1
            script.buf = script.buf[:-1] + b"\xff\n"  # one flipped byte of the echo

    script.t.write.side_effect = first_echo_corrupted
    script.expect((req, blk(P.encode_read_reply(1.0, [4.0]))))
    assert drv.read([1]).conductances_us.tolist() == [4.0]
    assert sum(w.startswith(b"SYNC? ") for w in script.writes()) == 2
    assert drv.stats.timeouts == 1  # the lost reply only


# ---------------------------------------------------------------------------- issue 9: bounded waits
def test_stale_replies_skipped_by_the_sync_are_counted_as_drained(script):
    drv = connect(script)
    req = P.encode_message("READ?", block=P.encode_addresses([1]))
    script.expect((req, DriverTimeout("late")))
    write = script.t.write.side_effect
    first = {"sync": True}

    def late_reply_before_the_first_echo(data: bytes) -> None:
        if data.startswith(b"SYNC? ") and first["sync"]:
            first["sync"] = False
            script.buf += blk(P.encode_read_reply(0.5, [3.0]))  # the timed-out reply, arriving late
        write(data)

    script.t.write.side_effect = late_reply_before_the_first_echo
    script.expect((req, blk(P.encode_read_reply(1.0, [4.0]))))
    assert drv.read([1]).conductances_us.tolist() == [4.0]
    assert drv.stats.drained_replies == 1 and drv.stats.reconnects == 1


def test_a_tester_silent_at_connect_gets_one_reconnect_then_link_lost(mocker):
    from drivers.errors import LinkLost

    s = Script(mocker, [(b"*IDN?\n", DriverTimeout("no answer"))])
    s.t.write.side_effect = lambda data: s._write(data) if not data.startswith(b"SYNC? ") else None  # no echo
    with pytest.raises(LinkLost, match=r"no answer from .* to \*IDN\? within 1 s, nor to SYNC\? after reconnecting"):
        Driver(s.t, retries=5)
    assert s.t.reconnect.call_count == 1 and s.t.close.called


def test_a_tester_silent_mid_run_is_retried_with_backoff_for_the_window_then_link_lost(script, monkeypatch):
    from drivers import tester
    from drivers.errors import LinkLost

    clock = {"t": 0.0}
    monkeypatch.setattr(tester.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(tester.time, "sleep", lambda s: clock.__setitem__("t", clock["t"] + s))
    drv = Driver(script.t, retries=2, reconnect_window_s=10)

    def silent(data: bytes) -> None:
        clock["t"] += 1.0  # each unanswered message costs the 1 s timeout
        script.pending = DriverTimeout("no answer")

    script.t.write.side_effect = silent
    with pytest.raises(LinkLost, match="reconnect window of 10 s") as e:
        drv.now()
    assert "TIME? unanswered" in str(e.value)
    # 1 s per try plus pauses 0, 0.5, 1, 2, 4: the window runs out after 6 tries, not after retries (2)
    assert script.t.reconnect.call_count == 6 and clock["t"] < 10 + 2 * 1.0 + 1.0
