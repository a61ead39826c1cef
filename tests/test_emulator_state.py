"""--state as a snapshot plus a ledger of applied programs: crash-exact restores, the connection log, fault counts."""

from __future__ import annotations

import os
import time

import numpy as np

from drivers import MockDriver, PulseProgram
from drivers import TesterDriver as Driver
from drivers import protocol as P
from drivers.emulator_state import Ledger, ledger_path, read_records
from drivers.server import Emulator
from hil.cli_emulator import EmulatorProcess

ROWS, COLS, SEED = 6, 7, 5
ARGS = ["--rows", str(ROWS), "--cols", str(COLS), "--seed", str(SEED)]


def _program(rng: np.random.Generator, pid: int) -> PulseProgram:
    addr = rng.permutation(ROWS * COLS)[:10]
    return PulseProgram(pid, addr, rng.integers(0, 4, addr.size), rng.random(addr.size) < 0.1)


def _session(drv, first_id: int, n: int) -> list[np.ndarray]:
    """Reads between programs (they move the clock and draw read noise), both program commands, and a program
    last: what a restore must reproduce bit for bit."""
    rng = np.random.default_rng(first_id)
    seen = []
    for pid in range(first_id, first_id + n):
        r = drv.read(rng.choice(ROWS * COLS, 5, replace=False))
        p = _program(rng, pid)
        if pid % 2:
            seen += [drv.apply_and_read(p).conductances_us]
        else:
            drv.apply(p)
        seen += [r.conductances_us, np.array([r.t_s])]
    return seen


def _restored(state) -> Emulator:
    return Emulator(MockDriver(ROWS, COLS, seed=SEED), state_path=state)


def test_a_killed_emulator_restores_bit_for_bit_what_one_that_never_crashed_holds(tmp_path):
    """kill -9 after the last acknowledged program: snapshot + ledger give the same chip (RNG included), clock,
    lifetime counts and last id as an emulator that never crashed; and both then answer the same."""
    state = tmp_path / "chip.npz"
    reference = Emulator(MockDriver(ROWS, COLS, seed=SEED))
    ref_chip = reference.driver
    emu = EmulatorProcess([*ARGS, "--state", str(state)])
    try:
        with Driver.open(emu.resource, timeout_s=10) as drv:
            got = _session(drv, 1, 40)
        emu.proc.kill()  # no chance to save on the way out
        emu.proc.wait()
    finally:
        emu.stop()
    # The never-crashed one: the same operations on the same chip, in process (served the same way).
    rng_ops = _session(_InProcess(reference), 1, 40)
    for a, b in zip(got, rng_ops, strict=True):
        assert np.array_equal(a, b)
    restored = _restored(state)
    assert restored.replayed_programs == 40  # nothing but the start-up snapshot was written in full
    d = restored.driver
    assert d.chip.state_equal(ref_chip.chip)
    assert d.now() == ref_chip.now() and restored.last_program_id == 40 == d.last_program_id()
    assert np.array_equal(d.lifetime_pulses, ref_chip.lifetime_pulses)
    assert restored.last_shapes == reference.last_shapes
    # And they go on alike.
    assert all(np.array_equal(a, b) for a, b in zip(_session(_InProcess(restored), 41, 5),
                                                     _session(_InProcess(reference), 41, 5), strict=True))


class _InProcess:
    """The driver calls _session makes, answered by an Emulator in process through the wire codec."""

    def __init__(self, emulator: Emulator) -> None:
        self.e = emulator

    def _ask(self, header: str, block: bytes) -> bytes:
        (item,) = P.MessageParser(max_block=self.e.max_block).feed(P.encode_message(header, block=block))
        return self.e.handle(item).data

    def read(self, addresses):
        t, g = P.decode_read_reply(P.decode_block(self._ask("READ?", P.encode_addresses(addresses))[:-1]))
        return _R(g, t)

    def apply(self, p: PulseProgram) -> None:
        assert self._ask("PROG:APPL?", P.encode_program(p)) == f"{p.program_id}\n".encode()

    def apply_and_read(self, p: PulseProgram):
        pid, _, t, g = P.decode_apply_read_reply(P.decode_block(self._ask("PROG:APPL:READ?", P.encode_program(p))[:-1]))
        assert pid == p.program_id
        return _R(g, t)


class _R:
    def __init__(self, g, t) -> None:
        self.conductances_us, self.t_s = g, t


def test_a_program_does_not_rewrite_the_snapshot(tmp_path):
    """The old state file was rewritten (atomically: a new inode) after every program; now only the ledger grows."""
    state = tmp_path / "chip.npz"
    e = _restored(state)
    e.save()
    before = os.stat(state)
    _session(_InProcess(e), 1, 6)
    after = os.stat(state)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    records, _ = read_records(ledger_path(state).read_bytes())
    assert [r.program.program_id for r in records] == list(range(1, 7))


def test_a_record_cut_short_by_a_crash_is_dropped_and_later_records_follow_whole_ones(tmp_path):
    state = tmp_path / "chip.npz"
    e = _restored(state)
    e.save()
    _session(_InProcess(e), 1, 3)
    e.close()
    path = ledger_path(state)
    records, end = read_records(path.read_bytes())
    with open(path, "r+b") as f:  # half of a fourth record, as a kill during its write leaves it
        f.seek(end)
        f.write(path.read_bytes()[:end // 6])
    e2 = _restored(state)
    assert e2.replayed_programs == 3 and e2.last_program_id == 3
    _session(_InProcess(e2), 4, 2)
    e2.close()
    e3 = _restored(state)
    assert e3.last_program_id == 5 and e3.driver.chip.state_equal(e2.driver.chip)


def test_ledger_records_a_snapshot_already_holds_are_skipped(tmp_path):
    """A crash between writing the snapshot and emptying the ledger leaves records of programs it holds."""
    state = tmp_path / "chip.npz"
    e = _restored(state)
    e.save()
    _session(_InProcess(e), 1, 4)
    kept = ledger_path(state).read_bytes()
    e.save()  # the snapshot now holds programs 1..4 and the ledger is empty ...
    e.close()
    ledger_path(state).write_bytes(kept)  # ... unless the crash came first
    e2 = _restored(state)
    assert e2.replayed_programs == 0 and e2.last_program_id == 4 and e2.driver.chip.state_equal(e.driver.chip)
    assert np.array_equal(e2.driver.lifetime_pulses, e.driver.lifetime_pulses)


def test_the_ledger_is_snapshotted_once_it_outgrows_the_snapshot(tmp_path, monkeypatch):
    import drivers.emulator as em

    monkeypatch.setattr(em, "MIN_SNAPSHOT_LEDGER_BYTES", 0)
    state = tmp_path / "chip.npz"
    e = _restored(state)
    e.save()
    _session(_InProcess(e), 1, 60)
    records, _ = read_records(ledger_path(state).read_bytes())
    assert 0 < len(records) < 60 and records[-1].program.program_id == 60
    e.close()
    assert _restored(state).driver.chip.state_equal(e.driver.chip)


def test_ledger_appends_overwrite_zeros_the_file_already_has(tmp_path):
    led = Ledger(tmp_path / "x.ledger")
    led.truncate(0)
    led.append(b"abc")
    data = (tmp_path / "x.ledger").read_bytes()
    assert led.size == 3 and len(data) == Ledger.ZERO_AHEAD and data[:4] == b"abc\0" and not any(data[3:])
    led.close()


def test_append_while_acknowledges_only_a_record_on_disk_and_takes_back_one_whose_program_failed(tmp_path,
                                                                                                 monkeypatch):
    """Ledger.append_while (a program's record goes to disk while the worker applies it): it returns only after
    both the work and the record's fdatasync are done; a work error takes the record back; a write error is
    returned beside the work's result (the program ran, the emulator says it was not saved)."""
    import threading

    import drivers.emulator_state as st

    order: list[str] = []
    real_sync = st._datasync
    monkeypatch.setattr(st, "_datasync", lambda fd: (real_sync(fd), order.append("synced")))
    led = Ledger(tmp_path / "x.ledger")
    led.truncate(0)
    order.clear()

    def work() -> str:
        order.append(f"work in {threading.current_thread().name}")
        return "reply"

    assert led.append_while(b"abc", work) == ("reply", None)
    assert sorted(order) == ["synced", "work in ledger x.ledger"] and led.size == 3

    def fails() -> None:
        raise ZeroDivisionError("the chip failed")

    try:
        led.append_while(b"defg", fails)
    except ZeroDivisionError:
        pass
    else:
        raise AssertionError("the work's error must propagate")
    data = (tmp_path / "x.ledger").read_bytes()
    assert led.size == 3 and data[:3] == b"abc" and not any(data[3:])  # the failed program's record is gone

    def no_disk(fd: int, view: memoryview, at: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st.os, "pwrite", no_disk)
    result, failed = led.append_while(b"hij", work)
    monkeypatch.undo()
    assert result == "reply" and isinstance(failed, OSError) and led.size == 3
    led.append_while(b"klm", work)
    assert (tmp_path / "x.ledger").read_bytes()[:6] == b"abcklm"
    led.close()


def test_a_program_the_chip_fails_on_leaves_no_record(tmp_path, monkeypatch):
    """The record is written before the program runs: if applying it fails, no restore may apply it."""
    state = tmp_path / "chip.npz"
    e = _restored(state)
    e.save()
    _session(_InProcess(e), 1, 2)

    def broken(*a, **k):
        raise FloatingPointError("chip model failed")

    monkeypatch.setattr(e.driver.chip, "apply", broken)
    rng = np.random.default_rng(3)
    reply = _InProcess(e)._ask("PROG:APPL?", P.encode_program(_program(rng, 3)))
    assert b"chip model failed" in reply and e.last_program_id == 2, reply  # refused: nothing acknowledged
    monkeypatch.undo()
    _session(_InProcess(e), 4, 1)
    records, _ = read_records(ledger_path(state).read_bytes())
    assert [r.program.program_id for r in records] == [1, 2, 4]
    e.close()
    assert _restored(state).driver.chip.state_equal(e.driver.chip)


def test_verbose_emulator_logs_each_connection_on_stderr():
    for args in (["-v", "emulator", *ARGS], ["emulator", "-v", *ARGS]):
        with _emulator_with_root_args(args) as emu:
            with Driver.open(emu.resource, timeout_s=10) as drv:
                drv.read([1, 2])
            for _ in range(200):  # the server notices the close within its 0.2 s poll; stopping first would win
                if "disconnected after" in emu.stderr_text():
                    break
                time.sleep(0.05)
        err = emu.stderr_text()
        assert "drivers.server: client 127.0.0.1:" in err and " connected" in err
        assert "disconnected after" in err and " 5 messages" in err  # *IDN? GEOM? LIM? LIFE:ALL? READ?


def _emulator_with_root_args(args: list[str]) -> EmulatorProcess:
    """EmulatorProcess with options before the sub-command (pcm-hil -v emulator ...)."""
    import subprocess
    import sys

    class _P(EmulatorProcess):
        def __init__(self) -> None:  # noqa: D107 - as EmulatorProcess, with args before and after "emulator"
            import tempfile
            from pathlib import Path

            self.kind = "tcp"
            self._stderr = tempfile.TemporaryFile("w+")
            self._stderr_final = ""
            self.proc = subprocess.Popen([sys.executable, "-m", "hil.cli", *args, "--listen", "127.0.0.1:0"],
                                         stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                         cwd=Path(__file__).resolve().parent.parent,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
            self.address = self._wait_ready(60)

    return _P()


def test_injected_faults_are_counted_per_kind_and_reported_at_exit():
    faults = ["--fault-delay", "0.3", "--fault-error", "0.3", "--fault-delay-s", "0.01", "--fault-seed", "2"]
    with EmulatorProcess([*ARGS, *faults]) as emu:
        with Driver.open(emu.resource, timeout_s=5, retries=20) as drv:
            for pid in range(1, 11):
                drv.apply(PulseProgram(pid, np.array([pid]), np.array([1]), np.array([False])))
            errors = drv.stats.retried_errors
    line = [x for x in emu.stderr_text().splitlines() if "injected faults:" in x]
    assert len(line) == 1 and f"error {errors} (of " in line[0] and "lose 0, drop 0" in line[0], line
    delays = int(line[0].split("delay ")[1].split(",")[0])
    assert delays > 0 and f"{delays * 0.01:.1f} s in all" in line[0]


def test_a_clean_restart_keeps_the_state_file_format(tmp_path):
    """SIGTERM saves a snapshot (ledger emptied) that restores as before, read voltage and shapes included."""
    state = tmp_path / "chip.npz"
    with EmulatorProcess([*ARGS, "--state", str(state)]) as emu:
        with Driver.open(emu.resource, timeout_s=10) as drv:
            drv.set_read_voltage(0.3)
            _session(drv, 1, 3)
    assert read_records(ledger_path(state).read_bytes())[0] == []
    with EmulatorProcess([*ARGS, "--state", str(state)]) as emu:
        with Driver.open(emu.resource, timeout_s=10) as drv:
            assert drv.read_voltage() == 0.3 and drv.last_program_id() == 3
