"""Resume: load a checkpoint, put its state into a fresh trainer, and roll the journal forward after it.

The trainer (hil/trainer.py) writes checkpoints and journal records; hil/run.py resume_run verifies the
chip and the files, then calls these. See docs/checkpoint.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drivers import PulseProgram
from sim.files import read_npz

from .array import UPDATE, ProgramRecord
from .journal import JournalError, journaled_program, read_journal
from .tasks import TaskStep
from .trainer import CHECKPOINT, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, Position, Trainer


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The checkpoint's meta and arrays; CheckpointError names what is wrong."""
    path = run_dir / CHECKPOINT
    try:
        meta, arrays = read_npz(path)
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir} has no checkpoint ({CHECKPOINT}); the run never finished its "
                              "initial programming and cannot be resumed") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated: {e}") from None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is not a pcm-hil checkpoint of version {CHECKPOINT_VERSION}")
    return meta, arrays


def restore(trainer: Trainer, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Put the checkpoint's state into a freshly built trainer (same config, mapping and driver)."""
    aw = trainer.array
    assert aw is not None
    if meta["config_digest"] != trainer.cfg.digest():
        raise CheckpointError("the checkpoint was written with another config; resume with the run's own config.toml")
    if meta["identity"] != aw.driver.identity:
        raise CheckpointError(f"the checkpoint was written on {meta['identity']!r}, this driver is "
                              f"{aw.driver.identity!r}: refusing to resume on another chip")
    try:
        aw.g[:] = arrays["g"]
        for i in range(len(aw.chi)):
            aw.chi[i][:] = arrays[f"chi{i}"]
            aw.net_pulses[i][:] = arrays[f"net{i}"]
            if aw.total_update is not None:
                aw.total_update[i][:] = arrays[f"total{i}"]
        with torch.no_grad():
            for name, p in trainer.net.digital.items():
                p.copy_(torch.from_numpy(arrays[f"digital.{name}"]))
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint arrays do not fit this network: {e}") from None
    aw.weights_from_g()
    trainer.at = Position(**meta["position"])
    aw.next_program_id = int(meta["next_program_id"])
    for k, v in meta["counters"].items():
        setattr(aw.counters, k, int(v))
    trainer.metrics = list(meta["metrics"])
    trainer.checkpoint_seq = int(meta["seq"])
    trainer.unapplied_program_ids = list(meta.get("unapplied_program_ids", []))
    if "tester_last_program_id" in meta:
        aw.last_applied_id = int(meta["tester_last_program_id"])
    _restore_response(trainer, meta, arrays)


def _restore_response(trainer: Trainer, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """The eps in force, the measured response and the pulse counts since RESET (a checkpoint without them,
    from before they existed, keeps the session's)."""
    aw = trainer.array
    assert aw is not None
    if "eps" not in meta:
        return
    try:
        aw.eps = [float(e) for e in meta["eps"]]
        aw.auto = meta.get("response_auto")
        trainer.response_warned = bool(meta.get("response_warned", False))
        aw.since_reset[:] = arrays["since_reset"]
        aw.mean_response_us = np.array(arrays["mean_response_us"], np.float64)
        aw.response.load(meta["response"], arrays)
        if aw.total_update is not None and "epsoff0" in arrays:
            aw.eps_offset = [np.array(arrays[f"epsoff{i}"]) for i in range(len(aw.chi))]
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint's response state does not fit this run: {e}") from None


def _journaled_input(arrays: dict[str, np.ndarray], layer: int, fan_in: int) -> np.ndarray:
    """Layer input A of a journal record, (batch, fan_in + 1); records may hold only its nonzero columns.

    The zeros put back are columns the live step skipped too, so accumulate() does the same arithmetic.
    """
    a = arrays[f"a{layer}"]
    cols = arrays.get(f"a{layer}_cols")
    if cols is None:
        return a
    dense = np.zeros((a.shape[0], fan_in), a.dtype)
    dense[:, cols] = a
    return dense


def _recompute_step(trainer: Trainer, meta: dict[str, Any], arr: dict[str, np.ndarray],
                    previous_program: np.ndarray | None) -> TaskStep:
    """A "recompute" record's step again: the host copy takes the conductances the record holds (at g_addr, or
    without it at the previous record's program addresses), then the same forward and backward pass on the same
    samples (digital parameters step too) gives the same factors."""
    aw = trainer.array
    assert aw is not None
    if "g_addr" in arr:
        addr = arr["g_addr"].astype(np.int64)
    elif previous_program is not None:
        addr = previous_program
    else:
        raise JournalError("a recompute record refers to the previous record's program, and there is none")
    if addr.size:
        aw.g[addr] = arr["g_val"]
        aw.weights_from_g(addr)
    return trainer.task_step(arr["idx"], int(meta["step"]), trainer.lr_for(int(meta["epoch"])))


@dataclass
class RollForward:
    """What a resume found in the journal."""

    records: int
    programs_applied: list[tuple[int, PulseProgram]]  # (step it was sent at, program)
    unapplied_program_id: int | None


JournalRecords = list[tuple[dict[str, Any], dict[str, np.ndarray]]]


def roll_forward(trainer: Trainer, journal: Path | JournalRecords, reapply: bool,
                 last_applied: int | None = None) -> RollForward:
    """Replay the journal after the checkpoint: chi accumulates each step's factors exactly as it did live;
    each journaled program is settled as applied, except the last one, which counts only if the chip
    applied it (last_applied, else the driver's last_program_id(), >= its id). reapply=True sends them
    again (an in-process mock chip that died with the trainer and was restored from the checkpoint's chip
    state). journal: the segment's path, or its records as read_journal() returned them.
    """
    aw = trainer.array
    assert aw is not None
    records = read_journal(journal) if isinstance(journal, Path) else journal
    if trainer.task.name != "classify":
        # the recomputed steps with the threads the live ones had (classify's roll-forward stays as it was)
        with trainer.compute_threads():
            return _roll(trainer, records, reapply, last_applied)
    return _roll(trainer, records, reapply, last_applied)


def _roll(trainer: Trainer, records: JournalRecords, reapply: bool, last_applied: int | None) -> RollForward:
    aw = trainer.array
    assert aw is not None
    if not reapply and last_applied is None:
        last_applied = aw.driver.last_program_id()
    applied: list[tuple[int, PulseProgram]] = []
    unapplied = None
    previous_program: np.ndarray | None = None
    for i, (meta, arr) in enumerate(records):
        kind = meta["kind"]
        if kind == UPDATE:
            n_layers = len(aw.chi)
            aw.lr = trainer.lr_for(int(meta["epoch"]))
            if "idx" in arr:
                aw.accumulate(_recompute_step(trainer, meta, arr, previous_program).factors)
            else:
                aw.accumulate([(_journaled_input(arr, j, aw.chi[j].shape[0]), arr[f"d{j}"]) for j in range(n_layers)])
            at = trainer.at
            at.step, at.epoch, at.pos = int(meta["step"]), int(meta["epoch"]), int(meta["pos"])
            at.seen += int(meta["n"])
            at.samples_trained += int(meta["n"])
            # classify's count is an int, another task's statistic a float: both as the live step added them
            at.correct += meta["correct"]
        if "program_id" not in meta:
            continue
        prog = journaled_program(meta, arr, aw.shapes)
        previous_program = prog.addresses
        aw.next_program_id = prog.program_id + 1
        is_last = i == len(records) - 1
        if reapply:
            inner = getattr(aw.driver, "inner", aw.driver)
            inner.apply(prog)
        elif is_last and (last_applied is None or last_applied < prog.program_id):
            unapplied = prog.program_id
            continue
        # (A refresh cut short counts the pairs of its applied programs; the rest are checked again later.)
        aw.account(ProgramRecord(kind, prog))
        applied.append((int(meta["step"]), prog))
    return RollForward(len(records), applied, unapplied)
