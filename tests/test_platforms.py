"""pcm-hil without the Linux-only pieces, as on Windows and macOS (issue 15), checked on Linux.

Each test runs the commands in subprocesses whose interpreter a sitecustomize (on PYTHONPATH) makes look like
the other system, before any of our code is imported:

- "windows": importing fcntl, termios, tty or pty fails (an import hook on sys.meta_path), os has no openpty,
  ttyname, pwrite, pread, fork, posix_fallocate or fdatasync, os.open refuses folders (as Windows does), and
  /proc does not exist (open, os.open, os.stat, os.listdir, ... raise FileNotFoundError under it);
- "macos": fcntl without F_OFD_SETLK / F_OFD_GETLK, no posix_fallocate or fdatasync, no /proc;
- both: a text file opened by our code without naming its encoding is an error (on Windows the default is
  the ANSI code page, so a UTF-8 config or summary with non-ASCII text would be misread).

The commands: `pcm-hil train` on digits with its run log, kill -9 and `--resume`, `pcm-hil report`, the
emulator over TCP (with --state) and a train against it, `pcm-hil replay` of that run; all in folders whose
names have spaces and non-ASCII letters, from a working directory that must stay empty. And the one-writer
rule: a second writer of a live log is refused, in another process and in the same one, and after the
writer's kill -9 the log reopens for writing with no outside tool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SITECUSTOMIZE = textwrap.dedent(r'''
    """Makes this Linux interpreter look like Windows or macOS to pcm-hil (tests/test_platforms.py)."""
    import builtins
    import io
    import os
    import sys

    MODE = os.environ.get("PCM_HIL_AS_PLATFORM", "")

    if MODE:
        import warnings
        # Windows' default text encoding is the ANSI code page, not UTF-8: our code must name its encoding
        # (PYTHONWARNDEFAULTENCODING=1 makes Python warn at every open() or read_text() without one).
        warnings.filterwarnings("error", category=EncodingWarning,
                                module=r"(hil|drivers|sim|calibration|analysis)(\.|$)")

    def _under_proc(p):
        try:
            s = os.fsdecode(p)
        except TypeError:
            return False
        return s == "/proc" or s.startswith("/proc/")

    def _no_proc(fn):
        def wrapper(p, *a, **k):
            if _under_proc(p):
                raise FileNotFoundError(2, "No such file or directory (this system has no /proc)", os.fsdecode(p))
            return fn(p, *a, **k)
        return wrapper

    if MODE in ("windows", "macos"):
        builtins.open = io.open = _no_proc(io.open)
        for name in ("open", "stat", "lstat", "listdir", "scandir", "access", "readlink"):
            setattr(os, name, _no_proc(getattr(os, name)))
        for name in ("posix_fallocate", "fdatasync"):
            if hasattr(os, name):
                delattr(os, name)

    if MODE == "windows":
        REFUSED = {"fcntl", "termios", "tty", "pty"}

        class RefuseUnixModules:
            def find_spec(self, name, path=None, target=None):
                if name in REFUSED:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, RefuseUnixModules())
        for name in REFUSED:
            sys.modules.pop(name, None)
        for name in ("openpty", "ttyname", "pwrite", "pread", "fork", "forkpty"):
            if hasattr(os, name):
                delattr(os, name)
        _open = os.open

        def _open_no_folders(p, flags, *a, **k):
            if os.path.isdir(p):
                raise PermissionError(13, "Permission denied", os.fsdecode(p))
            return _open(p, flags, *a, **k)

        os.open = _open_no_folders

    if MODE == "macos":
        import fcntl
        for name in ("F_OFD_SETLK", "F_OFD_SETLKW", "F_OFD_GETLK"):
            if hasattr(fcntl, name):
                delattr(fcntl, name)
''')

# What the simulation must hold in the child, checked before anything else (else the tests prove nothing).
CHECK_SIMULATION = textwrap.dedent('''
    import importlib, os, sys
    mode = os.environ["PCM_HIL_AS_PLATFORM"]
    try:
        open("/proc/self/maps")
        sys.exit("/proc is readable")
    except FileNotFoundError:
        pass
    assert not hasattr(os, "posix_fallocate") and not hasattr(os, "fdatasync")
    if mode == "windows":
        for name in ("fcntl", "termios", "tty", "pty"):
            try:
                importlib.import_module(name)
                sys.exit(f"{name} imports")
            except ImportError:
                pass
        assert not hasattr(os, "openpty") and not hasattr(os, "pwrite")
    else:
        import fcntl
        assert hasattr(fcntl, "flock") and not hasattr(fcntl, "F_OFD_SETLK") and not hasattr(fcntl, "F_OFD_GETLK")
    assert sys.flags.warn_default_encoding
    print("simulated", mode)
''')

# argv: log path, "hold" | "probe" | "after". hold: a writer that logs, flushes and waits to be killed.
LOCK_CHILD = textwrap.dedent('''
    import json, sys, time
    import numpy as np
    from analysis.runs import writer_alive
    from drivers.runlog import RunLogError, RunLogReader, RunLogWriter
    path, what = sys.argv[1], sys.argv[2]
    out = {}
    if what == "hold":
        w = RunLogWriter(path)
        w.log_reads(0, 0.0, np.arange(4), np.ones(4, np.float32), "initial")
        w.flush()
        print("READY", flush=True)
        time.sleep(600)
    elif what == "probe":
        out["alive"] = writer_alive(path)
        try:
            RunLogWriter(path, append=True)
            out["second"] = "accepted"
        except RunLogError as e:
            out["second"] = str(e)
    else:
        out["alive"] = writer_alive(path)
        with RunLogWriter(path, append=True) as w:        # no h5clear: the dead writer's marks are cleared here
            out["alive_while_open"] = writer_alive(path)
            try:
                RunLogWriter(path, append=True)
                out["same_process"] = "accepted"
            except RunLogError as e:
                out["same_process"] = str(e)
            w.log_reads(1, 0.0, np.arange(4), np.ones(4, np.float32), "periodic")
        import h5py
        with h5py.File(path, "r") as f:                    # plain, non-SWMR h5py opens it again
            out["events"] = int(f["reads/events"].shape[0])
        with RunLogReader(path) as r:
            out["problems"] = r.verify()
    print(json.dumps(out), flush=True)
''')

MODES = ["windows", "macos"]


@pytest.fixture
def sim(tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment of a child that looks like request.param's system."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PCM_HIL_AS_PLATFORM=request.param, COLUMNS="120", PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8",
               PYTHONWARNDEFAULTENCODING="1")
    out = subprocess.run([sys.executable, "-c", CHECK_SIMULATION], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "simulated" in out.stdout, out.stdout + out.stderr
    return env


def _cwd(tmp_path: Path) -> Path:
    cwd = tmp_path / "working folder"
    cwd.mkdir(exist_ok=True)
    return cwd


def _pcm(env: dict[str, str], cwd: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hil.cli", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout)


def _ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, f"rc {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p.stdout


CONFIG = """
seed = 4
[network]
hidden = [16]
[data]
name = "digits"
train_limit = 900
test_limit = 200
[update]
epochs = 3
lr = 0.1
[refresh]
check_every_steps = 25
threshold_us = 6.0
[checkpoint]
every_steps = 60
[logging]
flush_interval_s = 0.2
"""


@pytest.mark.parametrize("sim", MODES, indirect=True)
def test_one_writer_and_kill9_reopen_without_unix_locks(tmp_path: Path, sim: dict[str, str]) -> None:
    log = tmp_path / "lög ü 測試" / "run.h5"
    log.parent.mkdir()
    hold = subprocess.Popen([sys.executable, "-c", LOCK_CHILD, str(log), "hold"], env=sim, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8")
    try:
        assert hold.stdout is not None and hold.stdout.readline().strip() == "READY", hold.stderr.read()
        probe = subprocess.run([sys.executable, "-c", LOCK_CHILD, str(log), "probe"], env=sim, capture_output=True,
                               text=True, encoding="utf-8", timeout=120)
        got = json.loads(probe.stdout.strip().splitlines()[-1])
        assert got["alive"] is True
        assert "another writer" in got["second"], got
    finally:
        hold.kill()   # SIGKILL: no handler, no atexit, libhdf5 leaves its "open for writing" marks
        hold.wait()
    after = subprocess.run([sys.executable, "-c", LOCK_CHILD, str(log), "after"], env=sim, capture_output=True,
                           text=True, encoding="utf-8", timeout=120)
    assert after.returncode == 0, after.stderr[-3000:]
    got = json.loads(after.stdout.strip().splitlines()[-1])
    assert got == {"alive": False, "alive_while_open": True, "same_process": got["same_process"], "events": 2,
                   "problems": []}, got
    assert "another writer" in got["same_process"]


def _kill_after_checkpoint(proc: subprocess.Popen[str], run: Path) -> None:
    deadline = time.monotonic() + 180
    while not (run / "checkpoint.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()
    proc.wait()


def _emulator(env: dict[str, str], cwd: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "hil.cli", "emulator", "--listen", "127.0.0.1:0", *args], env=env,
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("LISTENING tcp "):
        proc.kill()
        raise AssertionError(f"emulator: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc, line.removeprefix("LISTENING tcp ")


@pytest.mark.slow
@pytest.mark.parametrize("sim", MODES, indirect=True)
def test_main_commands_without_unix_pieces(tmp_path: Path, sim: dict[str, str]) -> None:
    cwd = _cwd(tmp_path)
    home = tmp_path / "Läufe mit Leerzeichen 測試"
    home.mkdir()
    cfg = home / "run config.toml"
    cfg.write_text(CONFIG, encoding="utf-8")
    run = home / "Digits Run é"

    # train, kill -9 after the first checkpoint, resume to the end
    train = subprocess.Popen([sys.executable, "-m", "hil.cli", "train", "--config", str(cfg), "--out", str(run)],
                             env=sim, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             encoding="utf-8")
    _kill_after_checkpoint(train, run)
    _ok(_pcm(sim, cwd, "train", "--resume", str(run)))
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert summary["finished"] and summary["samples_trained"] == 3 * 900
    with_resume = _ok(_pcm(sim, cwd, "report", str(run)))
    assert "finished" in with_resume and (run / "report" / "report.html").is_file()

    # the emulator over TCP (its --state ledger written without os.pwrite on "windows"), a run against it
    state = home / "chip state" / "chip.npz"
    state.parent.mkdir()
    emu, address = _emulator(sim, cwd, "--rows", "65", "--cols", "52", "--state", str(state))
    try:
        host, port = address.rsplit(":", 1)
        run2 = home / "Über den Tester"
        _ok(_pcm(sim, cwd, "train", "--data", "digits", "--train-limit", "150", "--test-limit", "100", "--epochs", "1",
                 "--set", "network.hidden=[16]", "--driver", f"TCPIP::{host}::{port}::SOCKET",
                 "--set", "driver.uncalibrated_ok=true", "--out", str(run2)))
    finally:
        emu.terminate()
        emu.wait(timeout=60)
    assert json.loads((run2 / "summary.json").read_text(encoding="utf-8"))["finished"]
    assert state.is_file() and state.with_name(state.name + ".ledger").is_file()

    # the run replayed against its own log, program for program
    replayed = _ok(_pcm(sim, cwd, "replay", str(run2), "--out", str(home / "Wiederholung ü")))
    assert "reproduced" in replayed

    # nothing was written where the commands were started
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("sim", ["windows"], indirect=True)
def test_pty_mode_is_refused_with_the_tcp_alternative_on_windows(tmp_path: Path, sim: dict[str, str]) -> None:
    p = _pcm(sim, _cwd(tmp_path), "emulator", "--pty", "--rows", "4", "--cols", "4", timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "pseudo-terminal" in lines[0] and "--listen 127.0.0.1:5025" in lines[0], p.stderr
    assert "socket://127.0.0.1:5025" in lines[0] and "Traceback" not in p.stderr


KILLED_SWMR_WRITER = textwrap.dedent('''
    import os, signal, sys
    import h5py, numpy as np
    f = h5py.File(sys.argv[1], "w", libver=("v110", "v110"))
    d = f.create_dataset("x", shape=(0,), maxshape=(None,), dtype="i8", chunks=(16,))
    f.swmr_mode = True
    d.resize((5,))
    d[:] = np.arange(5)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
''')


def test_clearing_a_dead_writers_marks_writes_what_libhdf5_writes(tmp_path: Path) -> None:
    """superblock.clear_status_flags (plain Python) against libhdf5's own clearing (what h5clear -s sets)."""
    import ctypes

    import h5py

    from drivers.runlog.hdf5lib import hdf5_library
    from drivers.runlog.superblock import SuperblockError, clear_status_flags, lookup3, superblock

    # Bob Jenkins' published lookup3 (hashlittle) values
    assert lookup3(b"") == 0xDEADBEEF
    assert lookup3(b"Four score and seven years ago") == 0x17770551
    assert lookup3(b"Four score and seven years ago", 1) == 0xCD628161

    killed = tmp_path / "killed.h5"
    subprocess.run([sys.executable, "-c", KILLED_SWMR_WRITER, str(killed)], timeout=60)
    assert superblock(killed)[1] != 0
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(killed, "r+")
    ours, theirs = tmp_path / "ours.h5", tmp_path / "theirs.h5"
    ours.write_bytes(killed.read_bytes())
    theirs.write_bytes(killed.read_bytes())

    assert clear_status_flags(ours) is True
    assert superblock(ours)[1] == 0 and clear_status_flags(ours) is False

    lib = hdf5_library()
    assert lib is not None           # on Linux: through h5py's own extension module, no /proc needed
    lib.H5Pset.argtypes = [ctypes.c_int64, ctypes.c_char_p, ctypes.c_void_p]
    lib.H5Pset.restype = ctypes.c_int
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_V110, h5py.h5f.LIBVER_V110)
    flag = (ctypes.c_uint8 * 4)(1, 1, 1, 1)
    assert lib.H5Pset(fapl.id, b"clear_status_flags", ctypes.byref(flag)) >= 0
    h5py.h5f.open(os.fsencode(theirs), h5py.h5f.ACC_RDWR, fapl=fapl).close()
    assert ours.read_bytes() == theirs.read_bytes()
    with h5py.File(ours, "r") as f:
        assert f["x"][:].tolist() == [0, 1, 2, 3, 4]

    # a superblock whose checksum does not match is refused, never rewritten
    bad = tmp_path / "bad.h5"
    data = bytearray(killed.read_bytes())
    data[30] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(SuperblockError, match="checksum"):
        clear_status_flags(bad)
    assert bad.read_bytes() == bytes(data)


def test_memory_figures_degrade_without_proc_or_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """sim/platform_memory.py: /proc/meminfo on Linux, sysconf where there is no /proc, None (no check, no
    crash) where neither nor Windows' GlobalMemoryStatusEx answers."""
    import builtins

    from sim import platform_memory as pm

    with_proc = pm.available_memory_bytes()
    total = pm.physical_memory_bytes()
    assert with_proc is not None and total is not None and 0 < with_proc <= total
    real_open = builtins.open

    def no_proc(path, *a, **k):  # type: ignore[no-untyped-def]
        if str(path).startswith("/proc"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert pm.available_memory_bytes() == total          # macOS: the total stands in
    monkeypatch.setattr(pm.sys, "platform", "win32")      # ctypes.windll does not exist here: no figure, no crash
    assert pm.available_memory_bytes() is None and pm.physical_memory_bytes() is None


def test_durable_writes_without_posix_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sim/platform_fs.py: pwrite without os.pwrite, a folder that cannot be opened, Windows' replace of a held file."""
    from sim import platform_fs as fs

    f = tmp_path / "f.bin"
    fd = os.open(f, os.O_RDWR | os.O_CREAT | fs.O_BINARY)
    try:
        monkeypatch.delattr(os, "pwrite")
        assert fs.pwrite(fd, b"abcd", 0) == 4 and fs.pwrite(fd, b"XY", 1) == 2
        monkeypatch.delattr(os, "fdatasync")
        fs.datasync(fd)
    finally:
        os.close(fd)
    assert f.read_bytes() == b"aXYd"

    def no_folders(path, flags, *a):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied", str(path))

    with monkeypatch.context() as m:
        m.setattr(os, "open", no_folders)
        fs.sync_folder(tmp_path)                          # Windows: nothing to do, no error

    real_replace, calls = os.replace, []

    def held_twice(src, dst):  # type: ignore[no-untyped-def]
        calls.append(dst)
        if len(calls) <= 2:
            raise PermissionError(13, "The process cannot access the file because it is being used", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(fs.sys, "platform", "win32")
    monkeypatch.setattr(os, "replace", held_twice)
    (tmp_path / "new").write_bytes(b"new")
    fs.replace(tmp_path / "new", f)
    assert f.read_bytes() == b"new" and len(calls) == 3
    monkeypatch.setattr(fs, "REPLACE_RETRY_S", 0.05)
    monkeypatch.setattr(os, "replace", lambda s, d: no_folders(d, 0))
    with pytest.raises(PermissionError):
        fs.replace(tmp_path / "x", f)
