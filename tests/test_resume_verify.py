"""A resume verifies the chip before it writes anything (issue: exactly once under every fault).

Each case reproduces a way a resume used to lose or double pulses silently, against the emulated
tester over pyvisa-py, and checks that the resume now refuses with a message naming what differs,
and that no file of the run changed.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from drivers.server import load_state, save_state
from hil.cli_emulator import EmulatorProcess
from hil.config import RunConfig
from hil.reconcile import ReconcileError, check_program_ids
from hil.run import resume_run, start_run

EMU = ["--rows", "65", "--cols", "36", "--seed", "2"]


class Crash(Exception):
    """Stands in for the trainer dying mid-run: no final checkpoint, the journal keeps its records."""


def _crash_at(step: int):
    def progress(trainer) -> None:
        if trainer.at.step >= step:
            raise Crash
    return progress


def _cfg(resource: str) -> RunConfig:
    return RunConfig().with_overrides(**{"data.name": "digits", "network.hidden": [8], "data.train_limit": 200,
                                         "driver.kind": "visa", "driver.resource": resource,
                                         "driver.uncalibrated_ok": True,  # the emulated chip is the default model
                                         "checkpoint.every_steps": 30, "update.lr": 0.2})


def _crashed_run(run: Path, resource: str, step: int = 50) -> None:
    with pytest.raises(Crash):
        start_run(_cfg(resource), run, progress=_crash_at(step), progress_every=1)


def _snapshot(run: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(run.iterdir())}


def _records(path: Path) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each record of a journal segment."""
    data = path.read_bytes()
    out, off = [], 0
    while off + 4 <= len(data):
        (n,) = struct.unpack_from("<I", data, off)
        out.append((off, off + 8 + n))
        off += 8 + n
    return out


def _journal(run: Path) -> Path:
    meta = json.loads(bytes(np.load(run / "checkpoint.npz")["meta"]).decode())
    return run / meta["journal"]


def test_resume_onto_a_reset_chip_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with EmulatorProcess(EMU) as emu:
        _crashed_run(run, emu.resource)
    before = _snapshot(run)
    # The same tester restarted without its state: same *IDN?, a fresh chip, PROG:LAST? 0.
    with EmulatorProcess(EMU) as emu:
        with pytest.raises(ReconcileError, match="last applied program is 0.*another chip, or the chip's state was reset"):
            resume_run(run, driver=emu.resource)
    assert _snapshot(run) == before


def test_lost_journal_tail_is_detected_and_refused(tmp_path: Path) -> None:
    """A power cut without fsync: the tester applied programs whose journal records are gone."""
    run = tmp_path / "run"
    with EmulatorProcess(EMU) as emu:
        _crashed_run(run, emu.resource)
        seg = _journal(run)
        recs = _records(seg)
        assert len(recs) >= 10
        with open(seg, "r+b") as f:
            f.truncate(recs[-5][0])
        before = _snapshot(run)
        with pytest.raises(ReconcileError, match="journal ends at program .* were lost"):
            resume_run(run, driver=emu.resource)
        assert _snapshot(run) == before
        seg.unlink()
        before = _snapshot(run)
        with pytest.raises(ReconcileError, match="were lost"):
            resume_run(run, driver=emu.resource)
        assert _snapshot(run) == before


def test_lifetime_counts_that_differ_from_the_records_are_refused(tmp_path: Path) -> None:
    """PROG:LAST? agrees, but the chip's devices have had other pulses than the run says (a restored backup of
    another chip's state, or pulses sent by someone else): the tester's LIFE? counts give it away."""
    run = tmp_path / "run"
    state = tmp_path / "tester.npz"
    with EmulatorProcess([*EMU, "--state", str(state)]) as emu:
        _crashed_run(run, emu.resource)
    s = load_state(state)
    s.lifetime[5] += 3  # device 5 is mapped (layer 0, G+ of weight 5)
    save_state(state, s)
    before = _snapshot(run)
    with EmulatorProcess([*EMU, "--state", str(state)]) as emu:
        with pytest.raises(ReconcileError, match=r"on 1 of \d+ mapped devices \(device 5: tester \d+, run \d+"):
            resume_run(run, driver=emu.resource)
    assert _snapshot(run) == before


def test_the_same_chip_resumes_and_finishes(tmp_path: Path) -> None:
    """The control: tester state kept, journal intact: the resume is accepted and the ledgers agree."""
    from drivers.runlog import RunLogReader
    from drivers.tester import TesterDriver

    run = tmp_path / "run"
    state = tmp_path / "tester.npz"
    with EmulatorProcess([*EMU, "--state", str(state)]) as emu:
        _crashed_run(run, emu.resource)
    with EmulatorProcess([*EMU, "--state", str(state)]) as emu:
        summary = resume_run(run, driver=emu.resource)
        with TesterDriver.open(emu.resource) as t:
            counts = t.tester_lifetime_pulses()
    assert summary["finished"]
    with RunLogReader(run / "run.h5") as r:
        logged = r.pulses_per_device(65 * 36, summary["unapplied_program_ids"])
    np.testing.assert_array_equal(counts, logged)


@pytest.mark.parametrize("tester, ck, journaled, ok", [
    (10, 10, [], True), (9, 10, [], False), (11, 10, [], False),
    (10, 10, [11], True), (11, 10, [11], True), (12, 10, [11], False), (9, 10, [11], False),
    (12, 10, [11, 12, 13], True), (13, 10, [11, 12, 13], True), (11, 10, [11, 12, 13], False),
    (14, 10, [11, 12, 13], False),
])
def test_program_id_rule(tester: int, ck: int, journaled: list[int], ok: bool) -> None:
    """Only the last journaled program may be unapplied; every earlier one was confirmed before the next was sent."""
    if ok:
        check_program_ids(tester, ck, journaled, "T")
    else:
        with pytest.raises(ReconcileError):
            check_program_ids(tester, ck, journaled, "T")
