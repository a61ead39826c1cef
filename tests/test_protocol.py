"""The wire protocol: block codec, payloads, message framing, server-side parser and emulator core."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, strategies as st

from drivers import MockDriver, ProtocolError, PulseProgram, PulseShape, PulseShapes, SafetyLimits
from drivers import protocol as P
from drivers.errors import InstrumentError, ProgramError
from drivers.server import Emulator, FaultPlan


# ---------------------------------------------------------------------------- block framing
def test_block_framing_is_ieee_488_2_definite_length():
    assert P.encode_block(b"abc") == b"#13abc"
    assert P.encode_block(b"") == b"#10"
    assert P.encode_block(b"x" * 12) == b"#212" + b"x" * 12
    assert P.decode_block(b"#212" + b"\n" * 12) == b"\n" * 12


@pytest.mark.parametrize("bad", [b"", b"#", b"13abc", b"#03abc", b"#a3abc", b"#2x3abc", b"#14abc", b"#13abcd"])
def test_malformed_blocks_are_refused(bad):
    with pytest.raises(P.BlockError):
        P.decode_block(bad)


@given(st.binary(max_size=2000))
def test_block_round_trip(payload):
    assert P.decode_block(P.encode_block(payload)) == payload


@given(st.binary(max_size=300))
def test_block_decoder_only_raises_protocol_errors(data):
    try:
        P.decode_block(data)
    except ProtocolError:
        pass


# ---------------------------------------------------------------------------- payloads
def test_address_payload_bytes_are_little_endian_with_crc():
    payload = P.encode_addresses([1, 258])
    body = struct.pack("<III", 2, 1, 258)
    assert payload == body + struct.pack("<I", zlib.crc32(body))
    assert P.decode_addresses(payload).tolist() == [1, 258]


def test_program_payload_layout():
    prog = PulseProgram(7, np.array([3, 1]), np.array([2, 0]), np.array([False, True]))
    payload = P.encode_program(prog)
    body = struct.pack("<QddddI", 7, 100.0, 50.0, 450.0, 50.0, 2) + struct.pack("<II", 3, 1) \
        + struct.pack("<HH", 2, 0) + bytes([0, 1])
    assert payload == body + struct.pack("<I", zlib.crc32(body))
    back = P.decode_program(payload)
    assert back.program_id == 7 and back.addresses.tolist() == [3, 1]
    assert back.set_counts.tolist() == [2, 0] and back.reset.tolist() == [False, True]
    assert back.shapes == prog.shapes


def test_read_reply_carries_tester_time_and_float32():
    payload = P.encode_read_reply(1.25, np.array([1.5, 2.5], np.float32))
    t, g = P.decode_read_reply(payload)
    assert t == 1.25 and g.dtype == np.float32 and g.tolist() == [1.5, 2.5]


def test_a_flipped_byte_fails_the_crc():
    payload = bytearray(P.encode_addresses(np.arange(100)))
    payload[37] ^= 0x10
    with pytest.raises(P.BlockError, match="CRC"):
        P.decode_addresses(bytes(payload))


def test_wire_limits_on_set_counts():
    prog = PulseProgram(1, np.array([0]), np.array([70000]), np.array([False]))
    with pytest.raises(ProgramError, match="exceeds the wire"):
        P.encode_program(prog)


@st.composite
def programs(draw):
    n = draw(st.integers(0, 40))
    addr = draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n, unique=True))
    counts = draw(st.lists(st.integers(0, 0xFFFF), min_size=n, max_size=n))
    reset = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    f = st.floats(1e-3, 1e4, allow_nan=False)
    shapes = PulseShapes(set=PulseShape(amplitude_ua=draw(f), width_ns=draw(f)),
                         reset=PulseShape(amplitude_ua=draw(f), width_ns=draw(f)))
    return PulseProgram(draw(st.integers(1, 2**63 - 1)), np.array(addr, np.int64), np.array(counts, np.int64),
                        np.array(reset, bool), shapes)


@given(programs())
def test_program_round_trip(prog):
    back = P.decode_program(P.encode_program(prog))
    assert back.program_id == prog.program_id and back.shapes == prog.shapes
    assert np.array_equal(back.addresses, prog.addresses) and np.array_equal(back.set_counts, prog.set_counts)
    assert np.array_equal(back.reset, prog.reset)


@given(st.binary(max_size=400))
def test_payload_decoders_only_raise_protocol_or_program_errors(data):
    for decode in (P.decode_addresses, P.decode_counts, P.decode_read_reply, P.decode_program):
        try:
            decode(data)
        except (ProtocolError, ProgramError):
            pass


@given(st.binary(min_size=4, max_size=200))
def test_payloads_with_a_valid_crc_still_validate_their_lengths(body):
    data = body + struct.pack("<I", zlib.crc32(body))
    for decode in (P.decode_addresses, P.decode_counts, P.decode_read_reply, P.decode_program):
        try:
            decode(data)
        except (ProtocolError, ProgramError):
            pass


# ---------------------------------------------------------------------------- messages
def test_client_messages_come_from_the_table():
    assert P.encode_message("*IDN?") == b"*IDN?\n"
    assert P.encode_message("SYNC?", text="ab12") == b"SYNC? ab12\n"
    assert P.encode_message("READ?", block=b"\n\n") == b"READ? #12\n\n\n"
    with pytest.raises(ProtocolError):
        P.encode_message("FOO?")
    with pytest.raises(ProtocolError):
        P.encode_message("*IDN?", text="x")
    with pytest.raises(ProtocolError):
        P.encode_message("READ?")


def test_error_entries_round_trip_and_quote():
    s = P.format_error(-222, 'bad "x"\nnext')
    assert s == '-222,"bad ""x"" next"'
    assert P.parse_error(s) == (-222, 'bad "x" next')
    with pytest.raises(InstrumentError) as e:
        P.raise_error_reply(b"!" + s.encode() + b"\n", "READ?")
    assert e.value.code == -222 and e.value.command == "READ?"
    with pytest.raises(ProtocolError):
        P.raise_error_reply(b"!garbage\n", "READ?")


def test_parser_splits_messages_with_binary_blocks_across_feeds():
    parser = P.MessageParser()
    stream = b"*IDN?\nREAD? #15a\nb\nc\nSYNC? t1\n"
    out = []
    for i in range(len(stream)):  # one byte at a time
        out += parser.feed(stream[i:i + 1])
    assert out == [P.Message("*IDN?"), P.Message("READ?", block=b"a\nb\nc"), P.Message("SYNC?", text="t1")]
    assert not parser.pending


def test_parser_skips_garbage_to_the_next_newline():
    parser = P.MessageParser(max_block=10)
    out = parser.feed(b"\x00\xff junk\nREAD? #3999" + b"z" * 20 + b"\n*IDN?\nREAD? #13abcX\n*OPC?\n")
    kinds = [type(m).__name__ for m in out]
    assert kinds == ["Malformed", "Malformed", "Message", "Malformed", "Message"]
    assert out[2] == P.Message("*IDN?") and out[4] == P.Message("*OPC?")


def test_parser_abandons_a_partial_block():
    parser = P.MessageParser()
    assert parser.feed(b"PROG:APPL? #3100abc") == []
    assert parser.pending
    assert isinstance(parser.abandon(), P.Malformed)
    assert parser.feed(b"*IDN?\n") == [P.Message("*IDN?")]


# ---------------------------------------------------------------------------- emulator core
def _emulator(**kw) -> Emulator:
    return Emulator(MockDriver(4, 4, seed=1, **kw))


def _ask(emu: Emulator, raw: bytes) -> list[bytes | None]:
    parser = P.MessageParser(max_block=emu.max_block)
    return [emu.handle(m).data for m in parser.feed(raw)]


def test_emulator_answers_the_standard_queries():
    emu = _emulator()
    idn, opc, err, geom, last, volt = _ask(emu, b"*IDN?\n*OPC?\nSYST:ERR?\nGEOM?\nPROG:LAST?\nREAD:VOLT?\n")
    assert idn.startswith(b"pcm-hil,emulator,") and opc == b"1\n"
    assert err == b'0,"No error"\n' and geom == b"4,4\n" and last == b"0\n" and volt == b"0.2\n"
    assert SafetyLimits.model_validate_json(_ask(emu, b"lim?\n")[0]) == SafetyLimits()


def test_emulator_queues_command_errors_and_answers_failed_queries_with_bang():
    emu = _emulator()
    assert _ask(emu, b"READ:VOLT 7\nNOPE\n") == [None, None]
    assert _ask(emu, b"SYST:ERR?\nSYST:ERR?\nSYST:ERR?\n") == [
        b'-222,"read voltage 7.0 V is outside [0.01, 1.0] V"\n', b"-113,\"undefined header 'NOPE'\"\n",
        b'0,"No error"\n']
    reply = _ask(emu, b"READ? " + P.encode_block(P.encode_addresses([99])) + b"\n")[0]
    assert reply.startswith(b"!-222,")


def test_emulator_refuses_unsafe_programs_and_repeated_ids():
    emu = _emulator(limits=SafetyLimits(max_set_pulses_per_device=2))
    prog = PulseProgram(5, np.array([3]), np.array([3]), np.array([False]))
    msg = P.encode_message("PROG:APPL?", block=P.encode_program(prog))
    r = _ask(emu, msg)[0]
    assert r.startswith(b"!101,") and b"max_set_pulses_per_device" in r and b"device 3" in r
    ok = PulseProgram(5, np.array([3]), np.array([2]), np.array([False]))
    msg_ok = P.encode_message("PROG:APPL?", block=P.encode_program(ok))
    assert _ask(emu, msg_ok) == [b"5\n"]
    assert _ask(emu, msg_ok)[0].startswith(b"!102,")
    assert emu.driver.lifetime_pulses[3] == 2


def test_emulator_refuses_every_id_not_after_the_last_applied():
    emu = _emulator()

    def send(pid: int) -> bytes:
        prog = PulseProgram(pid, np.array([pid % 16]), np.array([1]), np.array([False]))
        return _ask(emu, P.encode_message("PROG:APPL?", block=P.encode_program(prog)))[0]

    assert send(50) == b"50\n"
    for pid in (50, 40, 1):
        r = send(pid)
        assert r.startswith(b"!102,") and b"last applied program 50" in r, r
    assert send(51) == b"51\n"
    assert emu.last_program_id == 51 and emu.driver.lifetime_pulses.sum() == 2


def test_emulator_refuses_corrupted_programs_without_applying():
    emu = _emulator()
    prog = PulseProgram(1, np.array([0, 1]), np.array([1, 1]), np.array([False, False]))
    msg = bytearray(P.encode_message("PROG:APPL?", block=P.encode_program(prog)))
    msg[30] ^= 0x01
    assert _ask(emu, bytes(msg))[0].startswith(b"!-160,")
    assert emu.last_program_id is None and emu.driver.lifetime_pulses.sum() == 0


def test_injected_faults_are_seeded():
    def faults(seed):
        emu = Emulator(MockDriver(2, 2), faults=FaultPlan(lose=0.15, drop=0.15, delay=0.15, corrupt=0.15, error=0.15,
                                                         seed=seed))
        out = []
        for _ in range(50):
            r = emu.handle(P.Message("*OPC?"))
            out.append("error" if r.data and r.data.startswith(b"!200,") else r.fault.value if r.fault else None)
        return out
    assert faults(3) == faults(3) and faults(3) != faults(4)
    assert set(faults(3)) == {None, "lose", "drop", "delay", "corrupt", "error"}


@given(st.lists(st.binary(max_size=80) | st.sampled_from(
    [b"\n", b"READ? #", b"PROG:APPL? #", b"#9", b"#15", b"*IDN?", b"READ:VOLT ", b"LIFE? #14abcd", b" ", b"SYNC? "]),
    max_size=12))
def test_fuzzed_input_never_crashes_the_emulator_and_idn_still_answers(chunks):
    emu = _emulator(limits=SafetyLimits(max_set_pulses_per_device=2))
    parser = P.MessageParser(max_block=emu.max_block)
    before = emu.driver.chip.pulses_since_reset().copy()
    for chunk in chunks:
        for item in parser.feed(chunk):
            r = emu.handle(item)
            assert r.data is None or r.data.endswith(b"\n")
    parser.abandon()  # what the server does after a quiet period
    replies = [emu.handle(m).data for m in parser.feed(b"\n*IDN?\n")]
    assert replies[-1] == emu.identity.encode() + b"\n"
    # Random bytes cannot carry a valid CRC: nothing was ever programmed.
    assert np.array_equal(emu.driver.chip.pulses_since_reset(), before)
