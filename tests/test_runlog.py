"""The run log in one process: round trips, chunk boundaries, append, and refusal of bad input."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import PulseProgram, PulseShape, PulseShapes
from drivers import runlog
from drivers.runlog import schema as runlog_schema
from drivers.runlog import SCHEMA_VERSION, RunLogError, RunLogReader, RunLogWriter


def _program(pid: int, rng: np.random.Generator, n: int = 20, shapes: PulseShapes | None = None) -> PulseProgram:
    addr = rng.choice(10_000, n, replace=False).astype(np.int64)
    return PulseProgram(pid, addr, rng.integers(0, 9, n), rng.random(n) < 0.2, shapes or PulseShapes())


def _fill(w: RunLogWriter, rng: np.random.Generator, steps: int = 50) -> dict:
    """Log a small run; return what was logged, for comparison."""
    reads, progs = [], []
    for step in range(steps):
        a = rng.choice(10_000, 30, replace=False).astype(np.int64)
        g = rng.random(30).astype(np.float32) * 25
        reason = ["periodic", "after-program", "evaluation"][step % 3]
        w.log_reads(step, 0.5 * step, a, g, reason, wall_s=1000.0 + step)
        reads.append((step, 0.5 * step, a, g, reason))
        p = _program(step + 1, rng)
        w.log_program(step, p, t_s=0.5 * step + 0.1, wall_s=1000.5 + step)
        progs.append((step, 0.5 * step + 0.1, p))
    return {"reads": reads, "programs": progs}


def _same_program(a: PulseProgram, b: PulseProgram) -> bool:
    return (a.program_id == b.program_id and np.array_equal(a.addresses, b.addresses)
            and np.array_equal(a.set_counts, b.set_counts) and np.array_equal(a.reset, b.reset)
            and a.shapes == b.shapes)


def test_round_trip_of_reads_programs_metrics_arrays_and_attrs(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "run.h5"
    with RunLogWriter(path, attrs={"config_toml": "lr = 0.1\n", "seed": 3, "eps": 0.25, "baseline": False}) as w:
        logged = _fill(w, rng)
        w.log_metrics(10, epoch=1, test_accuracy=0.9)
        w.log_metrics(20, loss=0.5)
        w.write_array("mapping/fc1_gplus", np.arange(12, dtype=np.int64).reshape(3, 4))
        w.set_attrs(identity="TEST,1", package_version="0.1.0")
        counts = w.counts
    assert counts == {"read_events": 50, "reads": 1500, "programs": 50, "program_devices": 1000, "metrics": 2}
    with RunLogReader(path) as r:
        assert r.counts == counts
        assert r.attrs["schema_version"] == SCHEMA_VERSION
        assert r.attrs["config_toml"] == "lr = 0.1\n" and r.attrs["seed"] == 3 and r.attrs["eps"] == 0.25
        assert r.attrs["baseline"] is False and r.attrs["identity"] == "TEST,1"
        ev = r.read_events()
        assert list(ev["step"]) == [s for s, *_ in logged["reads"]]
        assert list(ev["reason"]) == [x[4] for x in logged["reads"]]
        assert np.array_equal(ev["t_s"], [t for _, t, *_ in logged["reads"]])
        assert np.array_equal(ev["wall_s"], 1000.0 + np.arange(50))
        flat = r.reads()
        assert np.array_equal(flat["address"], np.concatenate([x[2] for x in logged["reads"]]))
        assert np.array_equal(flat["conductance_us"], np.concatenate([x[3] for x in logged["reads"]]))
        assert flat["conductance_us"].dtype == np.float32
        assert np.array_equal(flat["step"], np.repeat(np.arange(50), 30))
        assert list(flat["reason"][28:32]) == ["periodic"] * 2 + ["after-program"] * 2
        progs = r.programs()
        assert len(progs) == 50
        for (step, t, p), (step0, t0, p0) in zip(progs, logged["programs"], strict=True):
            assert step == step0 and t == t0 and _same_program(p, p0)
        m = r.metrics()
        assert list(m["step"]) == [10, 20]
        assert np.array_equal(m["test_accuracy"], [0.9, np.nan], equal_nan=True)
        assert np.array_equal(m["loss"], [np.nan, 0.5], equal_nan=True)
        assert np.array_equal(r.array("mapping/fc1_gplus"), np.arange(12).reshape(3, 4))
        assert r.array_names() == ["mapping/fc1_gplus"]
        with pytest.raises(RunLogError, match="no array"):
            r.array("mapping/nope")


def test_pulse_shapes_are_kept_per_program_and_missing_time_is_nan(tmp_path):
    rng = np.random.default_rng(2)
    other = PulseShapes(set=PulseShape(amplitude_ua=120.0, width_ns=80.0),
                        reset=PulseShape(amplitude_ua=500.0, width_ns=40.0))
    with RunLogWriter(tmp_path / "run.h5") as w:
        w.log_program(0, _program(1, rng))
        w.log_program(1, _program(2, rng, shapes=other))
        w.log_program(2, _program(3, rng, n=0))
    with RunLogReader(tmp_path / "run.h5") as r:
        (s0, t0, p0), (_, _, p1), (_, _, p2) = r.programs()
        assert np.isnan(t0)
        assert p0.shapes == PulseShapes() and p1.shapes == other and p2.n_devices == 0
        assert r.program_events()["shapes"].tolist() == [0, 1, 0]


@settings(max_examples=25)
@given(sizes=st.lists(st.integers(0, 700), min_size=1, max_size=40), flush_every=st.integers(1, 7))
def test_rows_survive_any_mix_of_sizes_flushes_and_chunk_boundaries(tmp_path_factory, monkeypatch_chunks, sizes,
                                                                     flush_every):
    path = tmp_path_factory.mktemp("h") / "run.h5"
    rng = np.random.default_rng(len(sizes))
    addrs, gs = [], []
    with RunLogWriter(path) as w:
        for i, n in enumerate(sizes):
            a = rng.integers(0, 2**32 - 1, n, dtype=np.int64)
            g = rng.standard_normal(n).astype(np.float32)
            w.log_reads(i, float(i), a, g, ["periodic", "after-program", "evaluation"][i % 3])
            addrs.append(a)
            gs.append(g)
            if i % flush_every == 0:
                w.flush()
                with RunLogReader(path) as r:
                    assert r.counts["reads"] == sum(map(len, addrs))
    with RunLogReader(path) as r:
        flat = r.reads()
        assert np.array_equal(flat["address"], np.concatenate(addrs))
        assert np.array_equal(flat["conductance_us"], np.concatenate(gs))
        assert np.array_equal(r.read_events()["count"], sizes)


@pytest.fixture(scope="module")
def monkeypatch_chunks():
    """Small chunks, so a few hundred rows cross many chunk boundaries (the file records its own chunking)."""
    mp = pytest.MonkeyPatch()
    small = {k: (dt, min(ch, 64 if "events" not in k else 16)) for k, (dt, ch) in runlog_schema.DATASETS.items()}
    mp.setattr(runlog_schema, "DATASETS", small)
    yield
    mp.undo()


def test_append_keeps_every_row_and_continues(tmp_path, monkeypatch_chunks):
    path = tmp_path / "run.h5"
    rng = np.random.default_rng(3)
    with RunLogWriter(path, attrs={"seed": 1}) as w:
        first = _fill(w, rng, steps=7)
        w.log_metrics(7, epoch=1)
        w.write_array("mapping/a", np.ones(3))
    with RunLogWriter(path, append=True, attrs={"resumed": True}) as w:
        assert w.counts == {"read_events": 7, "reads": 210, "programs": 7, "program_devices": 140, "metrics": 1}
        second = _fill(w, rng, steps=5)
        w.log_metrics(12, epoch=2)
        w.write_array("mapping/a", np.ones(3))          # the same again: fine
        with pytest.raises(RunLogError, match="other contents"):
            w.write_array("mapping/a", np.zeros(3))
    with RunLogReader(path) as r:
        assert r.attrs["seed"] == 1 and r.attrs["resumed"] is True
        flat = r.reads()
        want = np.concatenate([x[2] for x in first["reads"] + second["reads"]])
        assert np.array_equal(flat["address"], want)
        assert [p.program_id for _, _, p in r.programs()] == list(range(1, 8)) + list(range(1, 6))
        assert list(r.metrics()["epoch"]) == [1.0, 2.0]
        seq = np.concatenate([r.read_events()["seq"], r.program_events()["seq"]])
        assert len(np.unique(seq)) == len(seq)          # one order across reads and programs, even after append
        assert list(r.read_events()["reason"][:3]) == ["periodic", "after-program", "evaluation"]


def test_datasets_have_no_filters_and_fit_hdf5_1_10_readers(tmp_path):
    path = tmp_path / "run.h5"
    with RunLogWriter(path) as w:
        _fill(w, np.random.default_rng(4), steps=3)
        w.write_array("mapping/x", np.arange(4))
    with h5py.File(path, "r") as f:
        seen = []
        f.visititems(lambda n, o: seen.append(o) if isinstance(o, h5py.Dataset) else None)
        assert len(seen) == len(runlog_schema.DATASETS) + 2   # and /checksums
        for ds in seen:
            assert ds.compression is None and not ds.shuffle and not ds.fletcher32 and ds.scaleoffset is None
            assert ds.id.get_create_plist().get_nfilters() == 0
    # Superblock version 3: the SWMR-capable one HDF5 1.10 writes and reads (h5dump 1.10 opens it).
    assert path.read_bytes()[:9] == b"\x89HDF\r\n\x1a\n\x03"


# ------------------------------------------------------------------ bad input
def test_existing_path_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "run.h5"
    path.write_bytes(b"precious")
    with pytest.raises(RunLogError, match="already exists"):
        RunLogWriter(path)
    assert path.read_bytes() == b"precious"


def test_missing_folder_and_missing_file(tmp_path):
    with pytest.raises(RunLogError, match="does not exist"):
        RunLogWriter(tmp_path / "nope" / "run.h5")
    with pytest.raises(RunLogError, match="no run log"):
        RunLogReader(tmp_path / "run.h5")
    with pytest.raises(RunLogError, match="no run log"):
        RunLogWriter(tmp_path / "run.h5", append=True)


def test_other_schema_and_other_version_are_refused(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    with pytest.raises(RunLogError, match="not a pcm-hil run log"):
        RunLogReader(other)
    with pytest.raises(RunLogError, match="not a pcm-hil run log"):
        RunLogWriter(other, append=True)
    newer = tmp_path / "newer.h5"
    RunLogWriter(newer).close()
    with h5py.File(newer, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(RunLogError, match=f"schema version {SCHEMA_VERSION + 1}"):
        RunLogReader(newer)
    with pytest.raises(RunLogError, match="schema version"):
        RunLogWriter(newer, append=True)
    assert h5py.File(newer, "r").attrs["schema_version"] == SCHEMA_VERSION + 1


def test_a_log_missing_a_dataset_is_refused(tmp_path):
    path = tmp_path / "run.h5"
    RunLogWriter(path).close()
    with h5py.File(path, "r+") as f:
        del f["programs/reset"]
    with pytest.raises(RunLogError, match="/programs/reset"):
        RunLogReader(path)


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9])
def test_truncated_file_gives_a_clear_error(tmp_path, keep):
    path = tmp_path / "run.h5"
    with RunLogWriter(path) as w:
        _fill(w, np.random.default_rng(5), steps=40)
    with RunLogReader(path) as r:
        before = r.reads()["conductance_us"], [p.program_id for _, _, p in r.programs()]
    data = path.read_bytes()
    cut = data[:int(len(data) * keep)]
    path.write_bytes(cut)
    with pytest.raises(RunLogError, match="truncated|not an HDF5 file|corrupt"):
        with RunLogReader(path) as r:
            r.reads()
            r.programs()
    # Append gives the file its recorded length back and lets the checksums decide: it refuses (and
    # leaves the file as it was), or every row it keeps verifies and is what was logged.
    try:
        RunLogWriter(path, append=True).close()
    except RunLogError:
        assert path.read_bytes() == cut
    else:
        assert "verified" in runlog.verify_log(path)
        with RunLogReader(path) as r:
            g, ids = r.reads()["conductance_us"], [p.program_id for _, _, p in r.programs()]
        assert np.array_equal(g, before[0][:len(g)]) and ids == before[1][:len(ids)]


def test_not_hdf5_at_all(tmp_path):
    path = tmp_path / "run.h5"
    path.write_text("hello\n" * 100)
    with pytest.raises(RunLogError, match="not an HDF5 file"):
        RunLogReader(path)


@pytest.mark.parametrize("call, match", [
    (lambda w: w.log_reads(0, 0.0, np.arange(3), np.ones(2, np.float32), "periodic"), "one length"),
    (lambda w: w.log_reads(0, 0.0, np.array([-1]), np.ones(1, np.float32), "periodic"), "0 .."),
    (lambda w: w.log_reads(0, 0.0, np.array([2**32]), np.ones(1, np.float32), "periodic"), "0 .."),
    (lambda w: w.log_reads(0, 0.0, np.arange(1), np.ones(1, np.float32), ""), "'' is not one of the reasons"),
    (lambda w: w.log_reads(0, 0.0, np.arange(1), np.ones(1, np.float32), "x"), "'x' is not one of the reasons"),
    (lambda w: w.log_reads(0, 0.0, np.arange(2), np.array(["a", "b"]), "periodic"), "must be numbers"),
    (lambda w: w.log_metrics(0), "at least one"),
    (lambda w: w.log_metrics(0, acc="high"), "must be a number"),
    (lambda w: w.set_attrs(schema="mine"), "set by the run log"),
    (lambda w: w.set_attrs(cfg=[1, 2]), "must be str, int, float or bool"),
    (lambda w: w.write_array("../x", np.ones(2)), "array name"),
    (lambda w: w.write_array("x", np.array(["a"])), "numeric or boolean"),
    (lambda w: w.log_program(0, PulseProgram(1, np.arange(2), np.array([1, 70000]), np.zeros(2, bool))), "SET count"),
])
def test_bad_calls_raise_run_log_errors_and_keep_the_log_usable(tmp_path, call, match):
    path = tmp_path / "run.h5"
    with RunLogWriter(path) as w:
        with pytest.raises(RunLogError, match=match):
            call(w)
        w.log_reads(0, 0.0, np.arange(2), np.ones(2, np.float32), "initial")
    with RunLogReader(path) as r:
        assert r.counts["reads"] == 2


@pytest.mark.parametrize("reasons, match", [([""], "non-empty"), (["x" * 65], "at most 63 printable ASCII"),
                                            ("fine", "a list of read reasons")])
def test_bad_extra_reasons_are_refused_before_the_file_is_made(tmp_path, reasons, match):
    with pytest.raises(RunLogError, match=match):
        RunLogWriter(tmp_path / "run.h5", reasons=reasons)
    assert not (tmp_path / "run.h5").exists()


def test_closed_writer_refuses_and_close_is_idempotent(tmp_path):
    w = RunLogWriter(tmp_path / "run.h5")
    w.close()
    w.close()
    with pytest.raises(RunLogError, match="closed"):
        w.log_reads(0, 0.0, np.arange(1), np.ones(1, np.float32), "periodic")


def test_a_second_writer_on_a_live_log_is_refused(tmp_path):
    path = tmp_path / "run.h5"
    with RunLogWriter(path) as w:
        w.log_reads(0, 0.0, np.arange(2), np.ones(2, np.float32), "periodic")
        w.flush()
        with pytest.raises(RunLogError, match="another writer"):
            RunLogWriter(path, append=True)
        w.log_reads(1, 0.0, np.arange(2), np.ones(2, np.float32), "periodic")
    with RunLogReader(path) as r:
        assert r.counts["read_events"] == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write a read-only file")
def test_a_read_only_log_cannot_be_appended_to(tmp_path):
    path = tmp_path / "run.h5"
    RunLogWriter(path).close()
    path.chmod(0o444)
    with pytest.raises(RunLogError, match="cannot open run log .* for writing"):
        RunLogWriter(path, append=True)
    with RunLogReader(path) as r:
        assert r.counts["reads"] == 0
