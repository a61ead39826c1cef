"""The step journal: records bit-exact, a torn tail dropped, a bad record in the middle refused;
an in-flight program the tester never applied is settled as unapplied on resume."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hil.journal import Journal, JournalError, decode_body, encode_record, read_journal


def _write(path: Path, n: int) -> list[np.ndarray]:
    j = Journal(path)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((1, 7)) for _ in range(n)]
    for i, a in enumerate(arrays):
        j.append({"step": i, "kind": "update"}, {"a0": a, "ids": np.arange(i, dtype=np.int64)})
    j.close()
    return arrays


def test_records_round_trip_bit_exact(tmp_path: Path) -> None:
    arrays = _write(tmp_path / "j.bin", 5)
    recs = read_journal(tmp_path / "j.bin")
    assert [m["step"] for m, _ in recs] == [0, 1, 2, 3, 4]
    for (_, arr), a in zip(recs, arrays, strict=True):
        assert arr["a0"].tobytes() == a.tobytes() and arr["ids"].dtype == np.int64


@pytest.mark.parametrize("cut", [1, 5, 40])
def test_torn_tail_is_dropped(tmp_path: Path, cut: int) -> None:
    p = tmp_path / "j.bin"
    _write(p, 4)
    p.write_bytes(p.read_bytes()[:-cut])
    assert [m["step"] for m, _ in read_journal(p)] == [0, 1, 2]


def test_corrupt_record_before_the_end_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "j.bin"
    _write(p, 4)
    b = bytearray(p.read_bytes())
    b[30] ^= 0xFF
    p.write_bytes(bytes(b))
    with pytest.raises(JournalError, match="checksum"):
        read_journal(p)


def test_missing_journal_has_no_records(tmp_path: Path) -> None:
    assert read_journal(tmp_path / "none.bin") == []


def test_in_flight_program_never_applied_is_settled_as_unapplied(tmp_path: Path) -> None:
    """A crash after the journal record, before the tester got the program: resume asks PROG:LAST?."""
    from drivers import PulseProgram, tester
    from drivers.runlog import RunLogReader
    from hil.cli_emulator import EmulatorProcess
    from hil.config import RunConfig
    from hil.journal import Journal
    from hil.run import resume_run, start_run

    run = tmp_path / "run"
    with EmulatorProcess(["--rows", "65", "--cols", "36", "--seed", "2"]) as emu:
        cfg = RunConfig().with_overrides(**{"data.name": "digits", "network.hidden": [8], "data.train_limit": 100,
                                            "driver.kind": "visa", "driver.resource": emu.resource,
                                            "driver.uncalibrated_ok": True})
        start_run(cfg, run, stop_after_steps=40)
        meta = json.loads(bytes(np.load(run / "checkpoint.npz")["meta"]).decode())
        pid = meta["next_program_id"]
        ghost = PulseProgram(pid, np.array([0, 1]), np.array([3, 3]), np.array([False, False]))
        j = Journal(run / meta["journal"])  # what a trainer killed right after journaling would leave
        j.append({"kind": "refresh", "step": 40, "epoch": 0, "pos": 40, "program_id": pid},
                 {"addresses": ghost.addresses, "set_counts": ghost.set_counts, "reset": ghost.reset})
        j.close()
        with tester.TesterDriver.open(emu.resource) as t:
            before = t.tester_lifetime_pulses()
            assert t.last_program_id() == pid - 1
        s = resume_run(run)
        with tester.TesterDriver.open(emu.resource) as t:
            after = t.tester_lifetime_pulses()
    assert s["unapplied_program_ids"] == [pid] and s["finished"]
    with RunLogReader(run / "run.h5") as r:
        progs = [p for _, _, p in r.programs()]
    ids = [p.program_id for p in progs]
    assert pid not in ids and max(ids) > pid  # the id is skipped, never reused
    logged = np.zeros(65 * 36, np.int64)
    for p in progs:
        np.add.at(logged, p.addresses, p.set_counts + p.reset)
    np.testing.assert_array_equal(after, logged)
    assert after[0] >= before[0]


_json_value = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@given(meta=st.dictionaries(st.text(max_size=8), _json_value, max_size=6),
       names=st.lists(st.text(max_size=6), max_size=4, unique=True),
       dtypes=st.lists(st.sampled_from(["<f8", "<f4", "<i8", ">i4", "|b1", "<u2"]), min_size=4, max_size=4),
       shapes=st.lists(st.lists(st.integers(0, 3), max_size=3), min_size=4, max_size=4))
def test_record_bytes_are_those_of_plain_json_encoding(meta: dict, names: list[str], dtypes: list[str],
                                                       shapes: list[list[int]]) -> None:
    """The hand-formatted header is byte for byte json.dumps' (the format docs/checkpoint.md describes)."""
    # Hypothesis draws the three lists at any lengths; zip pairs up as many as all three have.
    arrays = {n: (np.arange(int(np.prod(s))) % 3).astype(d).reshape(s)
              for n, d, s in zip(names, dtypes, shapes)}  # noqa: B905
    stored = [np.ascontiguousarray(a) for a in arrays.values()]  # as the format always did: 0-d stored as 1-d
    spec = [[n, a.dtype.str, list(a.shape)] for n, a in zip(arrays, stored, strict=True)]
    header = json.dumps({"meta": meta, "arrays": spec}, separators=(",", ":")).encode()
    body = b"".join([struct.pack("<I", len(header)), header, *(a.tobytes() for a in stored)])
    expected = b"".join([struct.pack("<I", len(body)), body, struct.pack("<I", zlib.crc32(body))])
    for _ in range(2):  # the second encoding comes from the cached header pieces
        assert encode_record(meta, arrays) == expected
    got_meta, got_arrays = decode_body(expected[4:-4])
    assert got_meta == meta and list(got_arrays) == names
