"""ReplayDriver: a logged run re-served read for read; any departure from the log is named."""

from __future__ import annotations

import numpy as np
import pytest

from drivers import LoggedDriver, MockDriver, PulseProgram, PulseShape, PulseShapes, RunLogError, RunLogWriter
from drivers.program import Geometry
from drivers.replay import ReplayDriver, ReplayMismatch


def _session(d, rng: np.random.Generator, steps: int) -> list:
    """A small training-like sequence; returns what the driver answered (reads and now())."""
    out = []
    with d.reading("initial") if hasattr(d, "reading") else _null():
        out.append(d.read())
    for step in range(steps):
        if hasattr(d, "step"):
            d.step = step
        a = np.sort(rng.choice(d.geometry.n_devices, 12, replace=False))
        out.append(d.read(a))
        out.append(d.now())
        d.apply(PulseProgram(step + 1, a[:3], np.array([1, 2, 3]), np.array([False, True, False])))
        out.append(d.read(a[:3]))
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return None


def _record(tmp_path, steps: int = 20):
    path = tmp_path / "run.h5"
    with RunLogWriter(path) as w:
        live = _session(LoggedDriver(MockDriver(8, 10, seed=3), w), np.random.default_rng(9), steps)
    return path, live


def test_replay_re_serves_every_read_and_time(tmp_path):
    path, live = _record(tmp_path)
    with ReplayDriver(path) as r:
        assert r.geometry == Geometry(8, 10) and "MockDriver" in r.identity
        again = _session(r, np.random.default_rng(9), 20)
        assert r.remaining == 0 and r.last_program_id() == 20
    assert len(again) == len(live)
    for x, y in zip(live, again, strict=True):
        if isinstance(x, float):
            assert x == y
        else:
            assert np.array_equal(x.addresses, y.addresses) and x.t_s == y.t_s
            assert np.array_equal(x.conductances_us, y.conductances_us) and y.conductances_us.dtype == np.float32


def test_a_read_of_other_addresses_is_named(tmp_path):
    path, _ = _record(tmp_path, steps=2)
    with ReplayDriver(path) as r:
        r.read()
        with pytest.raises(ReplayMismatch, match="read 1 of the log .*step 0.*logged address"):
            r.read(np.arange(12))
        with pytest.raises(ReplayMismatch, match="this request has 5"):
            r.read(np.arange(5))


def test_order_and_program_contents_are_checked(tmp_path):
    path, _ = _record(tmp_path, steps=2)
    with ReplayDriver(path) as r:
        with pytest.raises(ReplayMismatch, match="next operation .* is a read .*reason 'initial'"):
            r.apply(PulseProgram(1, np.array([0]), np.array([1]), np.zeros(1, bool)))
    with ReplayDriver(path) as r:
        r.read()
        a = np.sort(np.random.default_rng(9).choice(80, 12, replace=False))
        r.read(a)
        with pytest.raises(ReplayMismatch, match="SET count of device"):
            r.apply(PulseProgram(1, a[:3], np.array([1, 2, 4]), np.array([False, True, False])))
        with pytest.raises(ReplayMismatch, match="logged id 1"):
            r.apply(PulseProgram(2, a[:3], np.array([1, 2, 3]), np.array([False, True, False])))
        other = PulseShapes(set=PulseShape(amplitude_ua=90.0, width_ns=50.0))
        with pytest.raises(ReplayMismatch, match="pulse shapes"):
            r.apply(PulseProgram(1, a[:3], np.array([1, 2, 3]), np.array([False, True, False]), other))
        r.apply(PulseProgram(1, a[:3], np.array([1, 2, 3]), np.array([False, True, False])))
        assert r.last_program_id() == 1
        with pytest.raises(ReplayMismatch, match="next operation .* is a read"):
            r.apply(PulseProgram(2, a[:3], np.array([1, 2, 3]), np.array([False, True, False])))


def test_past_the_end_and_logs_without_geometry(tmp_path):
    path = tmp_path / "run.h5"
    with RunLogWriter(path) as w:
        w.log_reads(0, 0.5, np.array([1, 2]), np.array([3.0, 4.0], np.float32), "periodic")
    with pytest.raises(RunLogError, match="geometry"):
        ReplayDriver(path)
    with ReplayDriver(path, geometry=Geometry(2, 2)) as r:
        assert r.now() == 0.5
        assert np.array_equal(r.read(np.array([1, 2])).conductances_us, [3.0, 4.0])
        with pytest.raises(ReplayMismatch, match="all 1 logged operations"):
            r.read(np.array([1, 2]))


def test_a_replay_logged_again_gives_the_same_log(tmp_path):
    path, _ = _record(tmp_path, steps=6)
    again = tmp_path / "again.h5"
    with ReplayDriver(path) as r, RunLogWriter(again) as w:
        _session(LoggedDriver(r, w), np.random.default_rng(9), 6)
    from drivers import RunLogReader
    with RunLogReader(path) as a, RunLogReader(again) as b:
        for key in ("step", "t_s", "address", "conductance_us", "reason"):
            assert np.array_equal(a.reads()[key], b.reads()[key])
        assert [(s, t, p.program_id) for s, t, p in a.programs()] == [(s, t, p.program_id) for s, t, p in b.programs()]
        assert b.attrs["driver_identity"].startswith("replay of pcm-hil,MockDriver")
