"""The run log on a full disk and in folders it may not write: one RunLogError naming the file and the
cause, no traceback, no crash, and the rows flushed before stay readable.

A full disk is reproduced without root: the writer runs in a child process whose file size limit
(RLIMIT_FSIZE) is small and which ignores SIGXFSZ, so a write past the limit fails with EFBIG just
as one on a full disk fails with ENOSPC.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from drivers import LoggedDriver, MockDriver, PulseProgram
from drivers.runlog import RunLogError, RunLogReader, RunLogWriter, verify_log
from drivers.runlog.files import NoSpace

ROOT = Path(__file__).resolve().parents[1]

# argv: path, file size limit in bytes, "reserve" or "no-reserve" (the latter lets libhdf5 meet the
# failure itself, to check the last line of defence). Logs a training-like run through LoggedDriver
# until the log fails, then tries once more; prints what it saw.
CHILD = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from drivers import LoggedDriver, MockDriver, PulseProgram
    from drivers.runlog import RunLogError, RunLogWriter
    from drivers.runlog import files
    path, limit, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode == "no-reserve":
        files.SpaceReserve.need = lambda self, nbytes: None
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    chip = MockDriver(50, 100, seed=1)
    try:
        w = RunLogWriter(path, flush_interval_s=0.001)
    except RunLogError as e:
        print("CREATE", e, flush=True)
        sys.exit(3)
    d = LoggedDriver(chip, w)
    pid, phase = 0, "read"
    try:
        for step in range(1_000_000):
            d.step = step
            phase = "read"
            d.read(np.arange(step % 200, step % 200 + 300))
            pid, phase = pid + 1, "program"
            d.apply(PulseProgram(pid, np.arange(5) + step % 100, np.ones(5, np.int64), np.zeros(5, bool)))
    except RunLogError as e:
        # The id of the last program whose logging was attempted, and whether a read or that program failed.
        print("FAILED", pid, phase, e, flush=True)
    print("APPLIED", chip.last_program_id(), flush=True)
    try:
        d.apply(PulseProgram(pid + 1, np.arange(2), np.ones(2, np.int64), np.zeros(2, bool)))
    except RunLogError as e:
        print("AGAIN", e, flush=True)
    try:
        d.read(np.arange(3))
    except RunLogError as e:
        print("READ", e, flush=True)
    w.close()
    print("APPLIED", chip.last_program_id(), flush=True)
    sys.exit(3)
""")


def _child(path: Path, limit: int, mode: str = "reserve") -> tuple[int, dict[str, list[str]], str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", CHILD, str(path), str(limit), mode], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300)
    lines: dict[str, list[str]] = {}
    for line in p.stdout.splitlines():
        key, _, rest = line.partition(" ")
        lines.setdefault(key, []).append(rest)
    return p.returncode, lines, p.stderr


def _no_noise(rc: int, stderr: str) -> None:
    assert rc == 3, f"rc {rc} (-11: libhdf5 crashed), stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and "HDF5-DIAG" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]


def test_a_full_disk_mid_run_is_one_error_and_the_flushed_rows_stay(tmp_path):
    path = tmp_path / "run.h5"
    rc, out, err = _child(path, 12_000_000)
    _no_noise(rc, err)
    failed_pid, phase, message = out["FAILED"][0].split(" ", 2)
    assert message.startswith(f"run log {path}: ") and "file too large" in message
    assert "rows flushed before stay readable" in message
    # A program whose logging failed was not sent, and nothing after the failure was.
    sent = int(failed_pid) - 1 if phase == "program" else int(failed_pid)
    assert out["APPLIED"] == [str(sent)] * 2
    assert "was closed when" in out["AGAIN"][0] and "file too large" in out["AGAIN"][0]
    assert "was closed when" in out["READ"][0]
    # Every flushed row is readable and verifies; the log's programs are what the chip got, in order.
    assert "verified" in verify_log(path)
    with RunLogReader(path) as r:
        ids = [p.program_id for _, _, p in r.programs()]
        assert len(ids) > 1000 and ids == list(range(1, len(ids) + 1)) and ids[-1] <= sent
        assert r.counts["reads"] == 300 * r.counts["read_events"]
    # Once there is room again the run's log continues.
    with RunLogWriter(path, append=True) as w:
        assert w.counts["programs"] == len(ids)
        w.log_program(0, PulseProgram(sent + 1, np.arange(2), np.ones(2, np.int64), np.zeros(2, bool)))
    assert "verified" in verify_log(path)


def test_a_disk_too_full_to_start_a_log_is_refused_and_leaves_no_file(tmp_path):
    path = tmp_path / "run.h5"
    rc, out, err = _child(path, 100_000)
    _no_noise(rc, err)
    assert out["CREATE"] == [f"cannot create run log {path}: file too large"]
    assert not path.exists()


def test_a_write_failing_inside_libhdf5_is_one_error_not_a_crash(tmp_path):
    """The last line of defence: with no space reserved, libhdf5 itself meets the failed write."""
    path = tmp_path / "run.h5"
    rc, out, err = _child(path, 4_000_000, mode="no-reserve")
    _no_noise(rc, err)
    message = out["FAILED"][0].split(" ", 2)[2]
    assert message.startswith(f"run log {path}: ") and "file too large" in message
    assert "libhdf5 was stopped from writing to it again" in message
    assert "was closed when" in out["AGAIN"][0]
    # The superblock counted chunks that never reached the disk: the file is shorter than it says.
    # Appending restores the end and lets the checksums decide; every flushed row is kept.
    with pytest.raises(RunLogError, match="truncated.*RunLogWriter.path, append=True. restores the end"):
        verify_log(path)
    with RunLogWriter(path, append=True) as w:
        kept = w.counts["programs"]
        w.log_program(0, PulseProgram(kept + 1, np.arange(2), np.ones(2, np.int64), np.zeros(2, bool)))
    assert "verified" in verify_log(path)
    with RunLogReader(path) as r:
        ids = [p.program_id for _, _, p in r.programs()]
    assert kept > 100 and ids == list(range(1, kept + 2)) and kept <= int(out["APPLIED"][0])


def test_a_refused_append_to_a_short_file_leaves_it_as_it_was(tmp_path):
    path = tmp_path / "run.h5"
    with RunLogWriter(path) as w:
        for i in range(2000):
            w.log_reads(i, 0.0, np.arange(100), np.full(100, i, np.float32), "periodic")
            if i % 100 == 0:
                w.flush()
    with h5py.File(path, "r") as f:
        ds = f["reads/conductance_us"].id
        last = ds.get_chunk_info(ds.get_num_chunks() - 1).byte_offset
    cut = path.read_bytes()[:last + 100]                # checksummed rows lost: the checksums must refuse it
    path.write_bytes(cut)
    with pytest.raises(RunLogError, match="integrity check, refusing to append to it: /reads/"):
        RunLogWriter(path, append=True)
    assert path.read_bytes() == cut


def test_running_out_of_space_in_process_closes_the_log_and_keeps_it_readable(tmp_path, mocker):
    path = tmp_path / "run.h5"
    w = RunLogWriter(path)
    w.log_reads(0, 0.0, np.arange(5), np.ones(5, np.float32), "initial")
    w.flush()
    w.log_reads(1, 0.0, np.arange(5), np.ones(5, np.float32), "periodic")
    mocker.patch.object(w._space, "_grow", side_effect=NoSpace(errno.ENOSPC, "No space left on device"))
    w._space.reserved_to = 0                            # the next write needs more room than the disk has
    with pytest.raises(RunLogError, match=f"run log {path}: flushing failed: no space left on device"):
        w.flush()
    assert w.closed and w.failure == "flushing failed: no space left on device"
    with pytest.raises(RunLogError, match="was closed when flushing failed: no space left on device"):
        w.log_reads(2, 0.0, np.arange(5), np.ones(5, np.float32), "periodic")
    w.close()                                           # the failure was raised once; close does nothing more
    with RunLogReader(path) as r:
        assert r.counts["read_events"] == 1 and r.verify() == []


def test_a_folder_that_is_a_file_is_named(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(RunLogError, match=r"cannot create run log .*runs/run.h5: folder .*runs is not a folder$"):
        RunLogWriter(tmp_path / "runs" / "run.h5")


def _read_only_folder(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    # Root writes through chmod; /sys refuses even root.
    if os.path.isdir("/sys") and not os.access("/sys", os.W_OK | os.X_OK) or _sys_refuses():
        return Path("/sys")
    pytest.skip("no folder here refuses the writer (running as root, /sys writable)")


def _sys_refuses() -> bool:
    try:
        os.close(os.open("/sys/pcm-hil-probe.h5", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except OSError:
        return True
    os.unlink("/sys/pcm-hil-probe.h5")
    return False


def test_a_read_only_folder_is_one_clear_line(tmp_path):
    folder = _read_only_folder(tmp_path)
    with pytest.raises(RunLogError) as e:
        RunLogWriter(folder / "run.h5")
    assert str(e.value) in (f"cannot create run log {folder / 'run.h5'}: permission denied",
                            f"cannot create run log {folder / 'run.h5'}: read-only file system")
    assert not (folder / "run.h5").exists()


def test_logged_driver_sends_no_program_the_log_could_not_take(tmp_path, mocker):
    inner = MockDriver(4, 4)
    w = RunLogWriter(tmp_path / "run.h5", flush_interval_s=1e-9)   # every log call flushes
    d = LoggedDriver(inner, w)
    d.apply(PulseProgram(1, np.array([1, 2]), np.array([1, 1]), np.zeros(2, bool)))
    mocker.patch.object(w._space, "_grow", side_effect=NoSpace(errno.ENOSPC, "No space left on device"))
    w._space.reserved_to = 0
    with pytest.raises(RunLogError, match="writing program 2 failed: no space left on device"):
        d.apply(PulseProgram(2, np.array([3]), np.array([2]), np.zeros(1, bool)))
    assert inner.last_program_id() == 1
    with pytest.raises(RunLogError, match="was closed when"):
        d.read(np.array([0]))
    with RunLogReader(tmp_path / "run.h5") as r:
        assert [p.program_id for _, _, p in r.programs()] == [1]


@pytest.mark.parametrize("refusal", [OSError(errno.EOPNOTSUPP, "Operation not supported"), AttributeError()])
def test_a_file_system_that_cannot_reserve_space_is_not_a_full_one(tmp_path, mocker, refusal):
    mocker.patch("drivers.runlog.files.os.posix_fallocate", side_effect=refusal)
    path = tmp_path / "run.h5"
    with RunLogWriter(path) as w:
        for i in range(300):
            w.log_reads(i, 0.0, np.arange(500), np.ones(500, np.float32), "periodic")
    assert "verified" in verify_log(path)
