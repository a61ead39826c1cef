"""Before a resume touches anything: does the chip behind the driver hold what this run's records say?

A tester remembers its last applied program id (PROG:LAST?) and counts every device's pulses
(LIFE?); the run's checkpoint records both as they were at the checkpoint, and the journal holds
every program sent since. Pulses are not idempotent and a chip is not replaceable, so a resume that
cannot reconcile the two refuses, saying what differs and what the user can do (docs/checkpoint.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from drivers import ArrayDriver, PulseProgram

from .journal import JournalError


class ReconcileError(RuntimeError):
    """The chip's state disagrees with the run's checkpoint and journal; nothing was changed."""


def journaled_program_ids(records: list[tuple[dict[str, Any], dict[str, np.ndarray]]]) -> list[int]:
    """Program ids of the journal's records, in order (JournalError unless strictly increasing)."""
    ids = [int(m["program_id"]) for m, _ in records if "program_id" in m]
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise JournalError(f"journal program ids are not increasing: {ids[:10]}")
    return ids


def check_program_ids(tester_last: int, checkpoint_last: int | None, journaled: list[int], resource: str) -> None:
    """Refuse unless the tester's last applied id is one the records allow.

    Every journaled program but the last was confirmed applied before the next was journaled, so the
    tester must report the last confirmed id (the checkpoint's, or the second-to-last journaled) or
    the last journaled one (it landed before the crash). Lower: the tester forgot programs the run
    knows it applied (another chip, or a reset one). Higher: the tester applied programs the journal
    lost (a host crash before the journal reached the disk).
    """
    last_journaled = journaled[-1] if journaled else checkpoint_last
    confirmed = journaled[-2] if len(journaled) > 1 else checkpoint_last
    if confirmed is not None and tester_last < confirmed:
        raise ReconcileError(
            f"the tester at {resource} says its last applied program is {tester_last}, but this run's records show "
            f"program {confirmed} was applied: the tester holds another chip, or the chip's state was reset. "
            f"Mount the chip this run was made on (with its tester state), or start a new run")
    if last_journaled is not None and tester_last > last_journaled:
        raise ReconcileError(
            f"the tester at {resource} has applied programs up to {tester_last}, but this run's journal ends at "
            f"program {last_journaled}: the records of programs {last_journaled + 1}..{tester_last} were lost "
            f"(a host crash before the journal reached the disk?), or another host programmed the chip. "
            f"The run cannot be resumed exactly; start a new run (checkpoint.journal_fsync = \"always\" prevents this)")


def expected_ledger(ledger: np.ndarray, addresses: np.ndarray, n_devices: int,
                    applied: list[PulseProgram]) -> np.ndarray:
    """Lifetime pulses (SET + RESET) the mapped devices must have: the checkpoint's plus the programs since."""
    full = np.zeros(n_devices, np.int64)
    full[addresses] = ledger
    for p in applied:
        full[p.addresses] += p.set_counts + p.reset
    return full[addresses]


def check_ledger(driver: ArrayDriver, addresses: np.ndarray, expected: np.ndarray, resource: str) -> None:
    """Refuse unless the tester's own lifetime counts of the mapped devices equal the run's (one LIFE? query)."""
    counts = getattr(driver, "tester_lifetime_pulses", None)
    if counts is None:
        return  # the driver cannot ask its chip; the program-id check is all there is
    actual = np.asarray(counts(addresses), np.int64)
    bad = np.flatnonzero(actual != expected)
    if bad.size == 0:
        return
    examples = ", ".join(f"device {int(addresses[i])}: tester {int(actual[i])}, run {int(expected[i])}"
                         for i in bad[:3])
    raise ReconcileError(
        f"the tester at {resource} counts other lifetime pulses than this run's records on {bad.size} of "
        f"{addresses.size} mapped devices ({examples}; tester total {int(actual.sum())}, run total "
        f"{int(expected.sum())}): this is not the chip, or not the state of the chip, this run left. Mount the "
        f"chip this run was made on, or start a new run")
