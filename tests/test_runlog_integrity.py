"""The run log as evidence: checksums over every flushed row, what verify, replay and append do with a
changed, a torn or a schema-1 log."""

from __future__ import annotations

import hashlib
import zlib

import h5py
import numpy as np
import pytest

from drivers import LoggedDriver, MockDriver, PulseProgram
from drivers.replay import ReplayDriver
from drivers.runlog.schema import READ_EVENT
from drivers.runlog import (CHECKSUMS, DATASETS, SCHEMA_VERSION, RunLogError, RunLogReader, RunLogWarning,
                            RunLogWriter, verify_log)


def _record(path, steps: int = 30, flush_every: int = 0) -> None:
    """A small logged run on a mock chip: reads, programs, metrics, an array; flushes every few steps."""
    rng = np.random.default_rng(5)
    with RunLogWriter(path) as w:
        d = LoggedDriver(MockDriver(8, 10, seed=3), w)
        w.write_array("mapping/table", np.arange(12).reshape(3, 4))
        with d.reading("initial"):
            d.read()
        for step in range(steps):
            d.step = step
            a = np.sort(rng.choice(80, 12, replace=False))
            d.read(a)
            d.apply(PulseProgram(step + 1, a[:4], np.array([1, 2, 3, 1]), np.array([False, True, False, False])))
            if step % 10 == 9:
                w.log_metrics(step, loss=1.0 / (step + 1))
            if flush_every and step % flush_every == flush_every - 1:
                w.flush()


def _flip(path, name: str, rows: np.ndarray | slice) -> None:
    """Change rows of a dataset the way bit rot or an edit would: one bit of each row's first byte."""
    with h5py.File(path, "r+") as f:
        ds = f[name]
        data = ds[:]
        sel = data[rows]
        b = sel.view(np.uint8).reshape(len(sel), -1)
        b[:, 0] ^= 1
        data[rows] = sel
        ds[:] = data


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_finished_log_verifies(tmp_path):
    path = tmp_path / "run.h5"
    _record(path, flush_every=7)
    with RunLogReader(path) as r:
        assert r.schema_version == SCHEMA_VERSION == 3 and r.has_checksums
        assert r.verify() == [] and r.torn_tail == {}
    assert "verified" in verify_log(path)
    with ReplayDriver(path) as rep:                     # replays without a word
        assert rep.remaining > 0


def test_twenty_flipped_set_counts_are_refused_by_replay_verify_and_append(tmp_path):
    path = tmp_path / "run.h5"
    _record(path)
    _flip(path, "programs/set_count", slice(40, 60))    # the audit's case: 20 SET counts changed
    before = _digest(path)
    with RunLogReader(path) as r:
        problems = r.verify()
    assert len(problems) == 1 and problems[0].startswith("/programs/set_count rows 0..119: CRC-32")
    with pytest.raises(RunLogError, match=r"fails its integrity check, refusing to replay it: /programs/set_count "
                                          r"rows 0\.\.119"):
        ReplayDriver(path)
    with pytest.raises(RunLogError, match="/programs/set_count rows 0..119"):
        verify_log(path)
    with pytest.raises(RunLogError, match="refusing to append to it: /programs/set_count rows 0..119"):
        RunLogWriter(path, append=True)
    assert _digest(path) == before                      # a refused append changes nothing


def test_the_problem_names_the_block_the_change_is_in(tmp_path):
    path = tmp_path / "run.h5"
    _record(path, flush_every=5)                        # one block per dataset per flush
    with h5py.File(path, "r") as f:
        code = list(DATASETS).index("reads/conductance_us")
        t = f[CHECKSUMS][:]
        blocks = t[t["dataset"] == code]
        assert len(blocks) >= 6
        start, stop = int(blocks[3]["start"]), int(blocks[3]["stop"])
    _flip(path, "reads/conductance_us", np.array([start + 1]))
    with RunLogReader(path) as r:
        assert r.verify() == [r.verify()[0]] and r.verify()[0].startswith(
            f"/reads/conductance_us rows {start}..{stop - 1}: CRC-32")


@pytest.mark.parametrize("name", list(DATASETS) + ["arrays/mapping/table"])
def test_every_dataset_and_array_is_covered(tmp_path, name):
    path = tmp_path / "run.h5"
    _record(path)
    _flip(path, name, np.array([0]))
    with RunLogReader(path) as r:
        problems = r.verify()
    assert len(problems) == 1 and problems[0].startswith(f"/{name}")


def test_plain_h5py_and_zlib_can_check_a_block(tmp_path):
    """The layout docs/run-log.md gives is enough to check a log without the project."""
    path = tmp_path / "run.h5"
    _record(path)
    with h5py.File(path, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f["checksums"].attrs["datasets"]]
        assert names == list(DATASETS)
        checked = 0
        for row in f["checksums"][:]:
            ds = f[names[row["dataset"]]]
            assert zlib.crc32(ds[row["start"]:row["stop"]].tobytes()) == row["crc32"]
            checked += 1
        assert checked >= len(DATASETS) - 1
        arr = f["arrays/mapping/table"]
        assert zlib.crc32(arr[()].tobytes()) == arr.attrs["crc32"]


def test_rows_past_the_last_checksum_are_a_torn_tail_not_served_and_dropped_on_append(tmp_path):
    path = tmp_path / "run.h5"
    _record(path, steps=10)
    with RunLogReader(path) as r:
        counts = r.counts
        programs = [p.program_id for _, _, p in r.programs()]
    # What a writer killed between writing rows and writing their checksums leaves.
    with h5py.File(path, "r+") as f:
        ev = f["programs/events"]
        last = ev[-1]
        n = ev.shape[0]
        ev.resize((n + 1,))
        last["program_id"] += 1
        last["start"] += last["count"]
        ev[n] = last
        for c in ("address", "set_count", "reset"):
            ds = f[f"programs/{c}"]
            ds.resize((ds.shape[0] + int(last["count"]),))
    with RunLogReader(path) as r:
        assert r.verify() == []
        assert r.torn_tail == {"programs/events": 1, "programs/address": 4, "programs/set_count": 4,
                               "programs/reset": 4}
        assert r.counts == counts and [p.program_id for _, _, p in r.programs()] == programs
    assert "5 rows past the last checksums" not in verify_log(path) and "13 rows past" in verify_log(path)
    with RunLogWriter(path, append=True) as w:
        assert w.counts == counts
        w.log_program(11, PulseProgram(99, np.arange(2), np.ones(2, np.int64), np.zeros(2, bool)))
    with RunLogReader(path) as r:
        assert r.verify() == [] and r.torn_tail == {}
        assert [p.program_id for _, _, p in r.programs()] == programs + [99]


def test_a_checksum_past_the_end_of_its_rows_is_a_problem(tmp_path):
    path = tmp_path / "run.h5"
    _record(path, steps=10)
    with h5py.File(path, "r+") as f:
        ds = f["reads/conductance_us"]
        ds.resize((ds.shape[0] - 3,))                   # a log cut short by hand
    with RunLogReader(path) as r:
        problems = r.verify()
    assert len(problems) == 1 and "/reads/conductance_us rows 0.." in problems[0] and "cut short" in problems[0]
    with pytest.raises(RunLogError, match="cut short"):
        RunLogWriter(path, append=True)


def _as_schema_1(path) -> None:
    """What a version-1 writer left: the same datasets without /checksums or array CRCs, the read reason a
    plain uint16 code (schema 3 made it an enum)."""
    with h5py.File(path, "r+") as f:
        ev = f["reads/events"]
        rows, chunks = ev[:], ev.chunks
        del f["reads/events"]
        f.create_dataset("reads/events", data=rows.astype(READ_EVENT), maxshape=(None,), chunks=chunks)
        del f[CHECKSUMS]
        del f["arrays/mapping/table"].attrs["crc32"]
        f.attrs["schema_version"] = np.int64(1)


def test_a_schema_1_log_reads_replays_with_a_warning_and_is_not_appended_to(tmp_path):
    path = tmp_path / "run.h5"
    _record(path, steps=8)
    with RunLogReader(path) as r:
        want = r.reads()["conductance_us"], [p.program_id for _, _, p in r.programs()]
    _as_schema_1(path)
    with RunLogReader(path) as r:
        assert r.schema_version == 1 and not r.has_checksums and r.verify() == []
        assert np.array_equal(r.reads()["conductance_us"], want[0])
        assert [p.program_id for _, _, p in r.programs()] == want[1]
    assert verify_log(path).endswith("no checksums (schema 1), nothing verified")
    with pytest.warns(RunLogWarning, match="no checksums .schema 1.: replaying it unverified"):
        rep = ReplayDriver(path)
    with rep:
        assert rep.remaining == 1 + 8 * 2
    before = _digest(path)
    with pytest.raises(RunLogError, match="schema version 1 .no checksums.*; this version appends only to schema 3"):
        RunLogWriter(path, append=True)
    assert _digest(path) == before


def test_append_continues_the_checksums(tmp_path):
    path = tmp_path / "run.h5"
    _record(path, steps=5)
    for k in range(3):
        with RunLogWriter(path, append=True) as w:
            w.log_reads(100 + k, 1.0, np.arange(7), np.full(7, k, np.float32), "resume")
            w.flush()
            w.log_reads(100 + k, 2.0, np.arange(3), np.full(3, k, np.float32), "resume")
    with RunLogReader(path) as r:
        assert r.verify() == [] and r.torn_tail == {}
        assert r.counts["read_events"] == 1 + 5 + 6


def test_append_cuts_a_checksum_block_to_the_rows_it_keeps(tmp_path):
    """Device rows whose own block is missing take their event with them; the other columns' blocks that
    reach into the dropped event are cut and get the CRC of the rows kept."""
    path = tmp_path / "run.h5"
    with RunLogWriter(path) as w:
        for pid in range(1, 4):
            w.log_program(0, PulseProgram(pid, np.arange(3) + pid, np.full(3, pid), np.zeros(3, bool)))
            w.flush()
    names = list(DATASETS)
    with h5py.File(path, "r+") as f:
        t = f[CHECKSUMS][:]
        # The last block of /programs/address never made it ...
        t = np.delete(t, np.flatnonzero(t["dataset"] == names.index("programs/address"))[-1])
        # ... and /programs/set_count has one block for programs 2 and 3 (rows 3..8), as a writer that
        # flushed less often would have left.
        sc = np.flatnonzero(t["dataset"] == names.index("programs/set_count"))
        assert t["start"][sc].tolist() == [0, 3, 6]
        t[sc[1]]["stop"] = 9
        t[sc[1]]["crc32"] = zlib.crc32(f["programs/set_count"][3:9].tobytes())
        t = np.delete(t, sc[2])
        f[CHECKSUMS].resize((len(t),))
        f[CHECKSUMS][:] = t
    with RunLogReader(path) as r:
        assert r.verify() == [] and [p.program_id for _, _, p in r.programs()] == [1, 2]
    with RunLogWriter(path, append=True) as w:
        assert w.counts["programs"] == 2 and w.counts["program_devices"] == 6
        w.log_program(1, PulseProgram(9, np.arange(2), np.ones(2, np.int64), np.zeros(2, bool)))
    with RunLogReader(path) as r:
        assert r.verify() == [] and r.torn_tail == {}
        assert [p.program_id for _, _, p in r.programs()] == [1, 2, 9]
        assert np.array_equal(r.programs()[1][2].set_counts, [2, 2, 2])
    with h5py.File(path, "r") as f:                     # the cut block: rows 3..5 with their own CRC
        t = f[CHECKSUMS][:]
        sc = t[t["dataset"] == names.index("programs/set_count")]
        assert [(int(a), int(b)) for a, b in zip(sc["start"], sc["stop"], strict=True)] == [(0, 3), (3, 6), (6, 8)]
