"""The run log across processes: a live reader follows a running writer; a kill -9 keeps every flushed row."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from drivers import PulseProgram
from drivers.runlog import RunLogError, RunLogReader, RunLogWriter, verify_log
from drivers.runlog.files import superblock

ROOT = Path(__file__).resolve().parents[1]

# A writer process driven over stdin: "batch N" logs N read calls (and a program each), "flush",
# "sleep S", "quit" (close). It answers each command with the writer's counts once it is done.
WRITER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from drivers import PulseProgram
    from drivers.runlog import RunLogWriter
    path, interval, append = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "append"
    w = RunLogWriter(path, flush_interval_s=interval, append=append, attrs={} if append else {"who": "child"})
    step = w.counts["read_events"]
    print(json.dumps(w.counts), flush=True)
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "batch":
            for _ in range(int(arg[0])):
                rng = np.random.default_rng(step)
                a = rng.choice(100_000, 40, replace=False)
                w.log_reads(step, float(step), a, rng.random(40).astype(np.float32), "periodic")
                w.log_program(step, PulseProgram(step + 1, a[:4], np.ones(4, np.int64), np.zeros(4, bool)))
                step += 1
        elif cmd == "flush":
            w.flush()
        elif cmd == "attr":
            w.set_attrs(**{arg[0]: arg[1]})
        elif cmd == "array":
            w.write_array(arg[0], np.arange(int(arg[1])))
        elif cmd == "sleep":
            time.sleep(float(arg[0]))
        elif cmd == "quit":
            w.close()
        print(json.dumps(w.counts) if not w.closed else "{}", flush=True)
""")


class Writer:
    """The writer process; every command waits for its answer, so the test knows what was done."""

    def __init__(self, path: Path, interval: float = 3600.0, append: bool = False) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.p = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(interval),
                                   "append" if append else "new"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env, cwd=ROOT)
        self.counts = self._answer()

    def _answer(self) -> dict:
        import json
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"writer process ended (rc {self.p.wait()})")
        return json.loads(line)

    def do(self, cmd: str) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        self.counts = self._answer()
        return self.counts

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self.p.stdin.close()
        self.p.stdout.close()


@pytest.fixture
def writer(tmp_path):
    started: list[Writer] = []

    def start(**kw) -> Writer:
        w = Writer(tmp_path / "run.h5", **kw)
        started.append(w)
        return w
    yield start
    for w in started:
        w.stop()


def _expected_addresses(steps: range) -> np.ndarray:
    return np.concatenate([np.random.default_rng(s).choice(100_000, 40, replace=False) for s in steps])


def test_a_live_reader_follows_the_running_writer(tmp_path, writer):
    w = writer()
    path = tmp_path / "run.h5"
    with RunLogReader(path) as live:                    # opened while the writer runs, before any row
        assert live.counts["read_events"] == 0 and live.attrs["who"] == "child"
        for k in range(1, 4):
            w.do("batch 700")                           # 28,000 devices: the third batch crosses a 65,536-row chunk
            w.do("flush")
            live.refresh()
            assert live.counts["read_events"] == 700 * k
            assert live.counts["programs"] == 700 * k
            flat = live.reads()
            assert np.array_equal(flat["address"], _expected_addresses(range(700 * k)))
        w.do("attr identity TESTER-7")
        w.do("array mapping/x 5")
        live.refresh()
        assert live.attrs["identity"] == "TESTER-7"
        assert np.array_equal(live.array("mapping/x"), np.arange(5))
        w.do("batch 5")                                 # buffered, not flushed: a reader may not see it yet
        live.refresh()
        assert 2100 <= live.counts["read_events"] <= 2105
        # Plain h5py follows too (SWMR read).
        with h5py.File(path, "r", swmr=True) as f:
            assert f["reads/events"].shape[0] >= 2100
        assert w.p.poll() is None                       # all of this while the writer is still open
        w.do("quit")
    with RunLogReader(path) as r:
        assert r.counts["read_events"] == 2105


def test_the_periodic_flush_makes_rows_visible_without_an_explicit_flush(tmp_path, writer):
    w = writer(interval=0.05)
    w.do("batch 3")
    w.do("sleep 0.3")
    w.do("batch 1")                                     # the first log call after the interval flushes
    with RunLogReader(tmp_path / "run.h5") as r:
        assert r.counts["read_events"] == 4
    w.do("quit")


def test_kill_9_keeps_every_flushed_row_and_the_log_reopens(tmp_path, writer):
    path = tmp_path / "run.h5"
    w = writer()
    w.do("batch 300")
    flushed = w.do("flush")
    logged = w.do("batch 7")                            # in the buffers only
    w.kill()
    assert "verified" in verify_log(path)
    with RunLogReader(path) as r:
        seen = r.counts
        assert flushed["read_events"] <= seen["read_events"] <= logged["read_events"]
        assert seen["reads"] == 40 * seen["read_events"]
        assert np.array_equal(r.reads()["address"], _expected_addresses(range(seen["read_events"])))
        assert [p.program_id for _, _, p in r.programs()] == list(range(1, seen["programs"] + 1))
    # A killed writer's file cut short is refused with a clear error, not read as garbage.
    cut = tmp_path / "cut.h5"
    # Half of what the superblock says: the file's length also counts the disk space reserved past it.
    cut.write_bytes(path.read_bytes()[:superblock(path)[2] // 2])
    with pytest.raises(RunLogError, match="truncated"):
        RunLogReader(cut)
    # Append after the crash: the dead writer's marks are cleared, every surviving row is kept.
    w2 = writer(append=True)
    assert w2.counts["read_events"] == seen["read_events"]
    w2.do("batch 10")
    w2.do("quit")
    with h5py.File(path, "r") as f:                     # plain, non-SWMR open works again
        n = f["reads/events"].shape[0]
    assert n == seen["read_events"] + 10
    with RunLogReader(path) as r:
        assert np.array_equal(r.reads()["address"], _expected_addresses(range(n)))
    if shutil.which("h5dump"):
        out = subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True)
        assert out.returncode == 0 and 'DATASET "events"' in out.stdout


def test_append_while_the_writer_lives_is_refused(tmp_path, writer):
    w = writer()
    w.do("batch 2")
    with pytest.raises(RunLogError, match="another writer"):
        RunLogWriter(tmp_path / "run.h5", append=True)
    w.do("quit")
    with RunLogReader(tmp_path / "run.h5") as r:
        assert r.counts["read_events"] == 2


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (Debian hdf5-tools) is not installed")
def test_h5dump_reads_a_finished_log(tmp_path):
    path = tmp_path / "run.h5"
    with RunLogWriter(path, attrs={"config_toml": "seed = 1"}) as w:
        w.log_reads(3, 1.5, np.array([7, 9]), np.array([1.25, 2.5], np.float32), "evaluation")
        w.log_program(3, PulseProgram(1, np.array([7]), np.array([2]), np.array([True])))
        w.log_metrics(3, test_accuracy=0.5)
        w.write_array("mapping/fc1", np.arange(6).reshape(2, 3))
    out = subprocess.run(["h5dump", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for name in ("events", "address", "conductance_us", "reason_names", "set_count", "reset", "shapes", "rows",
                 "names", "fc1"):
        assert f'DATASET "{name}"' in text
    assert '"evaluation"' in text and '"test_accuracy"' in text and "seed = 1" in text
    values = subprocess.run(["h5dump", "-d", "/reads/conductance_us", "-y", "-o", "/dev/stdout", str(path)],
                            capture_output=True, text=True)
    assert "1.25" in values.stdout and "2.5" in values.stdout


# A writer that logs as fast as it can and flushes every 2 ms, so a kill lands mid-write or mid-flush.
BUSY = textwrap.dedent("""
    import sys
    import numpy as np
    from drivers import PulseProgram
    from drivers.runlog import RunLogWriter
    w = RunLogWriter(sys.argv[1], flush_interval_s=0.002, append=sys.argv[2] == "append",
                     reasons=["r%d" % k for k in range(5)])
    i = w.counts["read_events"]
    print("ready", flush=True)
    while True:
        n = 1 + (i * 7919) % 300
        w.log_reads(i, float(i), (np.arange(n) + i) % 100_000, np.full(n, i, np.float32), "r%d" % (i % 5))
        w.log_program(i, PulseProgram(i + 1, np.arange(3), np.full(3, 1 + i % 7), np.zeros(3, bool)))
        if i % 3 == 0:
            w.log_metrics(i, a=i, b=2 * i)
        i += 1
""")


def test_kill_9_at_random_moments_then_append_keeps_a_consistent_log(tmp_path):
    path = tmp_path / "run.h5"
    rng = np.random.default_rng(11)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in range(3):
        p = subprocess.Popen([sys.executable, "-c", BUSY, str(path), "append" if k else "new"],
                             stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        try:
            assert p.stdout.readline() == "ready\n"
            # Not a timing assertion: only where the kill lands varies.
            subprocess.run(["sleep", f"{rng.uniform(0.05, 0.4):.3f}"], check=True)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
            p.stdout.close()
        # Every row the dead writer flushed verifies; anything past its last checksums is a torn tail.
        assert "verified" in verify_log(path)
        with RunLogReader(path) as r:
            ev, flat, progs, m = r.read_events(), r.reads(), r.programs(), r.metrics()
        n = len(ev["step"])
        assert n > 0
        assert np.array_equal(ev["step"], np.arange(n))
        sizes = 1 + (np.arange(n) * 7919) % 300
        assert np.array_equal(ev["count"], sizes)
        assert np.array_equal(flat["conductance_us"], np.repeat(np.arange(n), sizes).astype(np.float32))
        assert np.array_equal(flat["address"], np.concatenate([(np.arange(s) + i) % 100_000
                                                               for i, s in enumerate(sizes)]))
        assert [str(x) for x in ev["reason"][:5]] == ["r0", "r1", "r2", "r3", "r4"][:n]
        for step, _, prog in progs:
            assert prog.program_id == step + 1 and np.all(prog.set_counts == 1 + step % 7)
        # Only the last metrics call may have lost values (its rows can straddle a chunk write).
        whole = ~(np.isnan(m["a"]) | np.isnan(m["b"]))
        assert whole[:-1].all()
        assert np.array_equal(m["b"][whole], 2 * m["a"][whole]) and np.array_equal(m["a"][whole], m["step"][whole])
