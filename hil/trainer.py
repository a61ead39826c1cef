"""The training loop: forward/backward, the mixed-precision update, reads, refresh, evaluation, checkpoints.

One Trainer trains either on an array (ArrayWeights behind a driver) or, for the baseline, on float64
host weights; both share the loop, the data order and the initialization, so the baseline is the
software reference of the same run. See docs/training.md and docs/checkpoint.md.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from drivers import MVM, ArrayDriver
from sim.files import npz_bytes, write_atomic

import torch
from torch.nn import functional as F

from .analog import AnalogLayer, HostWeights
from .array import UPDATE, ArrayProducts, ArrayWeights, ProgramRecord
from .config import RunConfig
from .data import Dataset, epoch_order
from .journal import Journal, encode_update_record, program_arrays
from . import response
from .network import Factors, StepResult, accumulate, fast_forward, fast_step
from .networks import Network, build_network
from .tasks import Task, TaskStep, make_task

CHECKPOINT = "checkpoint.npz"
#: Steps between the running metrics a logged run writes (running accuracy, samples trained, training time),
#: which `pcm-hil watch` shows between two epochs.
RUNNING_METRICS_EVERY = 500
CHECKPOINT_FORMAT = "pcm-hil-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated, or belongs to another run, config or chip."""


@dataclass
class Position:
    """Where the run is: global step, epoch (0-based), sample position in the epoch, running accuracy."""

    step: int = 0
    epoch: int = 0
    pos: int = 0
    seen: int = 0        # samples (training items) of this epoch so far
    correct: int = 0     # the task's running statistic summed over them (classify: classified right before
                         # their update; other tasks a float, e.g. the summed cross-entropy in nats)
    samples_trained: int = 0
    train_seconds: float = 0.0


ProgressFn = Callable[["Trainer"], None]


#: Test samples per forward pass at evaluation on the module path (a conv layer's patches of 2,000 MNIST images
#: would take hundreds of MB).
MODULE_EVAL_BATCH = 250


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to n for the block (None: unchanged). A batch-1 step is a chain of tiny ops
    that extra threads only slow down (6x on 2 cores for the digits CNN)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """numpy's BLAS threads capped at n for the block (threadpoolctl). A recurrent step is hundreds of small
    matrix products; BLAS threads on a loaded 2-core machine made them 20x slower (LSTM, measured)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # declared in pyproject; without it the products are only slower
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def module_step(model: torch.nn.Module, layers: list[AnalogLayer], x: np.ndarray, y: np.ndarray) -> StepResult:
    """Forward and backward through the torch model (softmax cross-entropy, mean over the batch): predicted
    classes and each analog layer's factors; digital parameters keep their .grad for the caller."""
    logits = model(torch.from_numpy(np.ascontiguousarray(x, np.float64)))
    F.cross_entropy(logits, torch.from_numpy(y)).backward()
    return StepResult(logits.detach().numpy().argmax(axis=1), [layer.take_factors() for layer in layers])


def module_forward(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of the torch model for inputs x (batch, features), no gradient."""
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x, np.float64))).numpy()


class Trainer:
    """Mixed-precision training of a network on an array, or (array=None) its float64 baseline.

    network: what build_network(cfg, data) gives (built here if None). The MLP on the fast path is
    numpy (hil/network.py); every other network runs through its torch model (hil/analog.py).
    """

    def __init__(self, cfg: RunConfig, data: Dataset, *, array: ArrayWeights | None = None,
                 journal_dir: Path | None = None, logger: Any = None, network: Network | None = None) -> None:
        self.cfg = cfg
        self.data = data
        use_mvm = array is not None and MVM in array.driver.capabilities
        if network is None:
            network = build_network(cfg, data, torch_model=True if use_mvm else None)
        self.net = network
        self.w0 = network.w0
        self.array = array
        self.logger = logger  # RunLogWriter or None
        self.journal_dir = journal_dir
        self.journal: Journal | None = None
        self.checkpoint_seq = 0
        self.at = Position()
        self.metrics: list[dict[str, float]] = []
        self.unapplied_program_ids: list[int] = []
        # A flag whose .signal a SIGTERM / SIGINT handler sets: run() then returns between two steps.
        self.stop_flag: Any = None
        self.journal_fsync = False
        # Told the warnings of the run (the CLI prints them); the response mismatch is said once.
        self.notify: Callable[[str], None] | None = None
        self.response_warned = False
        self.weights = [w.copy() for w in self.w0] if array is None else array.w
        self._pending: Factors | None = None
        self._pending_cols: list[np.ndarray] = []
        self._pending_meta: dict[str, Any] = {}
        self._pending_idx: np.ndarray | None = None
        self.model = network.model
        self.path = "fast" if self.model is None else "module"
        # What the run learns (hil/tasks.py): classify for the MLP, CNN and modules, text for the LSTM, ...
        self.task: Task = make_task(cfg, data, network)
        # Where a task writes what an evaluation makes besides its metric (a GAN's image grid); None: nowhere.
        self.artifact_dir: Path | None = journal_dir
        if use_mvm and self.model is None:
            raise ValueError("a driver with an analog multiply needs the network's torch model (build_network(..., "
                             "torch_model=True))")
        for i, layer in enumerate(network.layers):
            if use_mvm:
                assert array is not None
                lm = array.mapping.layers[i]
                layer.source = ArrayProducts(array.driver, lm.plus_blocks or (lm.plus_block,),
                                             lm.minus_blocks or (lm.minus_block,), lm.beta)
            else:
                layer.source = HostWeights(self.weights[i])
        # How the journal lets a resume roll chi forward (docs/checkpoint.md): "recompute" stores the step's
        # samples and the conductances that changed since the last record, and the resume recomputes the step
        # (a conv layer's factors are far larger, and the MLP's were 6.8 KB per MNIST step against 0.36 KB of
        # recompute record); "factors" stores each step's (A, D), for the chip's analog multiply, whose
        # products a resume cannot recompute.
        self.journal_mode = "factors" if use_mvm else "recompute"
        self._g_changed: list[np.ndarray] = []
        self._g_all = False
        self._last_program_addresses: np.ndarray | None = None
        self._small_addresses = array is not None and array.mapping.geometry.n_devices < 2**31
        self._seed_each_step = self.model is not None and any(
            isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in self.model.modules())
        if array is not None:
            array.on_program = self._journal_program
            if cfg.checkpoint.audit:
                array.total_update = [np.zeros_like(c) for c in array.chi]

    # ------------------------------------------------------------------ one step
    def lr_for(self, epoch: int) -> float:
        """Learning rate of a (0-based) epoch."""
        u = self.cfg.update
        return u.lr * u.lr_decay ** epoch

    def forward_backward(self, x: np.ndarray, y: np.ndarray, step: int = 0) -> StepResult:
        """Classification's forward and backward: predictions and analog factors (digital .grad left set)."""
        if self.model is None:
            return fast_step(self.weights, x, y)
        return module_step(self.model, self.net.layers, x, y)

    def task_step(self, idx: np.ndarray, step: int, lr: float) -> TaskStep:
        """The task's forward and backward on the training items idx; digital parameters take their SGD step
        (lr) here. Live and at a resume's recomputation alike.

        On the module path torch's generator is seeded by (seed, step), so a stochastic layer (dropout)
        draws the same at a resume's recomputation as it did live.
        """
        if self.model is None:
            x, y = self.data.x_train[idx], self.data.y_train[idx]
            res = fast_step(self.weights, x, y)
            return TaskStep(res.factors, int(np.sum(res.predicted == y)))
        if self._seed_each_step:
            torch.manual_seed((self.cfg.seed * 1_000_003 + step) % 2**63)
        res = self.task.step(self, idx, step)
        with torch.no_grad():
            for p in self.net.digital.values():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
                    p.grad = None
        return res

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.model is not None:
            if self.model.training:
                self.model.eval()
            try:
                return module_forward(self.model, x).argmax(axis=1)
            finally:
                self.model.train()
        return fast_forward(self.weights, x).argmax(axis=1)

    def train_step(self, idx: np.ndarray) -> None:
        """Forward, backward and update on the samples idx; journaled before any pulse is sent."""
        res = self.task_step(idx, self.at.step + 1, self.lr_for(self.at.epoch))
        at = self.at
        at.step += 1
        at.pos += len(idx)
        at.seen += len(idx)
        at.samples_trained += len(idx)
        correct = res.stat
        at.correct += correct
        if self.array is None:
            for w, (a, d) in zip(self.weights, res.factors, strict=True):
                accumulate(w, a, d, self.lr_for(at.epoch))
            return
        aw = self.array
        aw.step = at.step
        aw.lr = self.lr_for(at.epoch)
        if self.logger is not None:
            self.set_log_step(at.step)
        rows = aw.accumulate(res.factors)
        if self.journal_mode == "factors":
            self._pending_cols = [r for r, _ in rows]
        prog = aw.plan_update(rows)
        self._pending = res.factors
        self._pending_idx = idx
        self._pending_meta = {"correct": correct, "n": len(idx)}
        if prog is None:
            self._journal_program(None)
        else:
            aw.send(ProgramRecord(UPDATE, prog))

    def set_log_step(self, step: int) -> None:
        """Reads and programs logged from here on belong to this step (a logged driver records it)."""
        drv = self.array.driver if self.array is not None else None
        if drv is not None and hasattr(drv, "step"):
            drv.step = step

    def _journal_program(self, rec: ProgramRecord | None) -> None:
        if self.journal is None:
            return
        at = self.at
        arrays: dict[str, np.ndarray] = {}
        recompute = self.journal_mode == "recompute"
        update = rec is None or rec.kind == UPDATE
        if update and recompute:
            correct, n = self._pending_meta["correct"], self._pending_meta["n"]
            if type(correct) is int and type(n) is int and type(at.step) is int and type(at.pos) is int \
                    and type(at.epoch) is int:
                # A step's record (every step writes one) through the format string: the bytes encode_record
                # writes for the same meta and arrays.
                assert self._pending is not None
                self._journal_inputs(arrays)
                self._pending = None
                pid = None
                if rec is not None:
                    p = rec.program
                    pid = p.program_id
                    arrays.update(program_arrays(p, self._small_addresses))
                    self._g_changed.append(p.addresses)  # its read-back moves them
                    self._last_program_addresses = p.addresses
                self.journal.append_encoded(encode_update_record(at.step, at.epoch, at.pos, correct, n, pid, arrays))
                return
        meta: dict[str, Any] = {"step": at.step, "epoch": at.epoch, "pos": at.pos}
        if update:
            assert self._pending is not None
            meta["kind"] = UPDATE
            meta.update(self._pending_meta)
            if recompute:
                self._journal_inputs(arrays)
            else:
                for i, ((a, d), cols) in enumerate(zip(self._pending, self._pending_cols, strict=True)):
                    if 2 * cols.size < a.shape[1]:
                        # Only A's nonzero columns (the rows of chi the step touched) matter: store them, and which.
                        arrays[f"a{i}_cols"] = cols
                        arrays[f"a{i}"] = a[:, cols]
                    else:
                        arrays[f"a{i}"] = a
                    arrays[f"d{i}"] = d
            self._pending = None
        else:
            meta["kind"] = rec.kind
        if rec is not None:
            p = rec.program
            meta["program_id"] = p.program_id
            arrays.update(program_arrays(p, self._small_addresses))
            if recompute:
                self._g_changed.append(p.addresses)  # its read-back moves them
                self._last_program_addresses = p.addresses
        self.journal.append(meta, arrays)

    def _journal_inputs(self, arrays: dict[str, np.ndarray]) -> None:
        """What a recomputation of this step needs besides the checkpoint: its samples, and the host copy of
        every conductance read since the previous record (the weights this step's forward pass used)."""
        aw = self.array
        assert aw is not None and self._pending_idx is not None
        arrays["idx"] = np.ascontiguousarray(self._pending_idx, np.int64)
        changed = self._g_changed
        if not self._g_all and len(changed) == 1 and changed[0] is self._last_program_addresses:
            # the usual case, the previous record's program read back: its addresses are in that record
            arrays["g_val"] = aw.g[changed[0]]
        else:
            if self._g_all:
                addr = aw.mapping.addresses
            elif changed:
                addr = np.unique(np.concatenate(changed))
            else:
                addr = np.zeros(0, np.int64)
            arrays["g_addr"] = addr.astype(np.int32 if aw.mapping.geometry.n_devices < 2**31 else np.int64)
            arrays["g_val"] = aw.g[addr]
        self._g_changed, self._g_all = [], False

    # ------------------------------------------------------------------ the loop
    def evaluate(self) -> float:
        """The task's metric (classify: test accuracy, 0..1); on an array, after reading the whole mapped array if
        the read policy says so."""
        if self.array is not None and self.cfg.read_policy.before_evaluation:
            self.array.read(None, "evaluation")
        if self.model is None:
            return self.accuracy()
        return self.task.evaluate(self)

    def accuracy(self) -> float:
        """Test accuracy (0..1) of a classifier at its current weights."""
        x, y = self.data.x_test, self.data.y_test
        correct = 0
        n = 2000 if self.model is None else MODULE_EVAL_BATCH
        for lo in range(0, len(y), n):
            correct += int(np.sum(self.predict(x[lo:lo + n]) == y[lo:lo + n]))
        return correct / max(len(y), 1)

    def run(self, progress: ProgressFn | None = None, progress_every: int = 200,
            stop_after_steps: int | None = None) -> None:
        """Train until cfg.update.epochs are done (or stop_after_steps more steps, for tests and benchmarks)."""
        with self.compute_threads():
            self._run(progress, progress_every, stop_after_steps)

    def compute_threads(self) -> contextlib.AbstractContextManager:
        """The threads a step computes with: torch's set to update.torch_threads on the module path, and for a
        task other than classify (LSTM, GAN) numpy's BLAS too (classify keeps numpy's as they always were).
        The live steps and a resume's recomputation run under the same."""
        n = self.cfg.update.torch_threads
        if self.model is None or self.task.name == "classify":
            return torch_threads(n if self.model is not None else None)
        stack = contextlib.ExitStack()
        stack.enter_context(torch_threads(n))
        stack.enter_context(blas_threads(n))
        return stack

    def _run(self, progress: ProgressFn | None, progress_every: int, stop_after_steps: int | None) -> None:
        cfg = self.cfg
        n = self.task.n_items()
        bs = cfg.update.batch_size
        stop_at = None if stop_after_steps is None else self.at.step + stop_after_steps
        while self.at.epoch < cfg.update.epochs:
            order = epoch_order(cfg.seed, self.at.epoch, n)
            t0 = time.perf_counter()
            while self.at.pos < n:
                if self.stop_requested or (stop_at is not None and self.at.step >= stop_at):
                    self.at.train_seconds += time.perf_counter() - t0
                    return
                self.train_step(order[self.at.pos:self.at.pos + bs])
                if self.array is not None:
                    self._after_step()
                    if self.logger is not None and self.at.step % RUNNING_METRICS_EVERY == 0:
                        self._log_running()
                if progress is not None and self.at.step % progress_every == 0:
                    progress(self)
            self.at.train_seconds += time.perf_counter() - t0
            self._end_epoch()
            if progress is not None:
                progress(self)

    def _log_running(self) -> None:
        at = self.at
        self.logger.log_metrics(at.step, running_epoch=float(at.epoch + 1),
                                **{self.task.running_metric: self.running_value()},
                                samples_trained=float(at.samples_trained))

    def running_value(self) -> float:
        """The task's running statistic of the epoch so far (classify: the running train accuracy)."""
        return self.task.running(self.at.correct, self.at.seen)

    @property
    def stop_requested(self) -> int:
        """The signal number that asked the run to stop (0: none)."""
        return self.stop_flag.signal if self.stop_flag is not None else 0

    def _after_step(self) -> None:
        assert self.array is not None
        s = self.at.step
        every = self.cfg.read_policy.every_steps
        if every and s % every == 0:
            self.array.read(None, "periodic")
            self._g_all = True
        r = self.cfg.refresh
        if r.enabled and s % r.check_every_steps == 0:
            n = self.array.refresh()
            if n and self.logger is not None:
                self.logger.log_metrics(s, refreshed_pairs=float(n))
        ck = self.journal is not None and s % self.cfg.checkpoint.every_steps == 0
        if s % self.cfg.response.check_every_steps == 0:
            self.check_response()
            # eps = "auto" moves only at a checkpoint: ask for one when the measured response moved
            ck = ck or (self.journal is not None and self.array.eps_should_follow(self.cfg.response.min_pulses))
        if ck:
            self.checkpoint()

    # ------------------------------------------------------------------ the measured response (hil/response.py)
    def check_response(self, force: bool = False) -> None:
        """Say once (notify, and metrics in the run log) when the chip's measured response is off the host's.

        Judged once a layer has response.min_pulses SET pulses measured (so the one warning has an increment
        to show beside the from-RESET figure of the initial programming), or when force (an evaluation).
        """
        aw = self.array
        if aw is None or self.response_warned or getattr(self.cfg.driver, "dry_run", False):
            return
        r = self.cfg.response
        if not force and all(f["pulses"] < r.min_pulses for f in aw.response.layer_figures()):
            return
        text, figures = response.mismatch(aw, r.tolerance, r.min_pulses)
        if text is None:
            return
        self.response_warned = True
        if self.notify is not None:
            self.notify(f"warning: {text}")
        if self.logger is not None:
            self.logger.log_metrics(self.at.step, response_mismatch=1.0, **figures)

    def response_summary(self) -> dict[str, Any]:
        """The measured response per layer, bin and from RESET, and the eps in force (docs/training.md)."""
        assert self.array is not None
        return response.summary(self.array, self.cfg.response.tolerance, self.response_warned)

    def _response_at_checkpoint(self) -> None:
        """eps = "auto" follows the measured response here, and only here: a journal segment then holds records
        made with one eps, the one its checkpoint keeps, and the roll-forward needs no read (docs/checkpoint.md)."""
        aw = self.array
        assert aw is not None
        self.check_response()
        if aw.follow_response(self.cfg.response.min_pulses) and self.logger is not None:
            self.logger.log_metrics(self.at.step, **{f"eps_l{i}": e for i, e in enumerate(aw.eps)})

    def _end_epoch(self) -> None:
        self.check_response(force=True)
        value = self.evaluate()
        task = self.task
        row = {"epoch": float(self.at.epoch + 1), task.metric: value, task.train_metric: self.running_value()}
        if self.model is not None:
            row.update(task.epoch_extras(self))
        if self.array is not None:
            c = self.array.counters
            row.update(refreshes=float(c.refreshes), set_pulses=float(c.set_pulses),
                       reset_pulses=float(c.reset_pulses), programs_applied=float(c.programs_applied))
        self.metrics.append(row)
        if self.logger is not None:
            self.logger.log_metrics(self.at.step, **row)
            if self.array is not None:
                self.logger.log_metrics(self.at.step, **response.layer_metrics(self.array))
        self.at.epoch += 1
        self.at.pos = 0
        self.at.seen = self.at.correct = 0
        if self.journal is not None:
            self.checkpoint()

    # ------------------------------------------------------------------ checkpoints
    def _ck_path(self) -> Path:
        assert self.journal_dir is not None
        return self.journal_dir / CHECKPOINT

    def checkpoint(self) -> None:
        """Atomic checkpoint; then a fresh journal segment (the old one is deleted once the checkpoint is durable)."""
        assert self.array is not None and self.journal_dir is not None
        aw = self.array
        d = self.journal_dir
        self._response_at_checkpoint()
        if self.logger is not None:
            self.logger.flush()
        self.checkpoint_seq += 1
        seq = self.checkpoint_seq
        new_journal = f"journal-{seq:06d}.bin"
        chip_file = self._save_chip(seq)
        meta = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "seq": seq,
            "config_digest": self.cfg.digest(), "identity": aw.driver.identity,
            "position": self.at.__dict__, "next_program_id": aw.next_program_id,
            "counters": aw.counters.as_dict(), "metrics": self.metrics, "journal": new_journal,
            "chip": chip_file, "unapplied_program_ids": self.unapplied_program_ids,
            "tester_last_program_id": aw.last_applied_id,
            "eps": aw.eps, "response_auto": aw.auto, "response_warned": self.response_warned,
        }
        # What the chip's own lifetime counters must say of the mapped devices (checked at resume).
        arrays = {"g": aw.g, "ledger": np.asarray(aw.driver.lifetime_pulses)[aw.mapping.addresses]}
        for name, p in self.net.digital.items():
            arrays[f"digital.{name}"] = p.detach().numpy()
        for i in range(len(aw.chi)):
            arrays[f"chi{i}"] = aw.chi[i]
            arrays[f"net{i}"] = aw.net_pulses[i]
            if aw.total_update is not None:
                arrays[f"total{i}"] = aw.total_update[i]
            if aw.eps_offset is not None:
                arrays[f"epsoff{i}"] = aw.eps_offset[i]
        resp_meta, resp_arrays = aw.response.state()
        meta["response"] = resp_meta
        arrays.update(resp_arrays, since_reset=aw.since_reset, mean_response_us=aw.mean_response_us)
        write_atomic(self._ck_path(), npz_bytes(meta, arrays))
        self._g_changed, self._g_all = [], False  # the checkpoint holds g
        old = self.journal
        if old is not None:
            old.close()
        self.journal = Journal(d / new_journal, fsync=self.journal_fsync)
        for f in d.glob("journal-*.bin"):
            if f.name != new_journal:
                f.unlink(missing_ok=True)
        for f in d.glob("chip-*.npz"):
            if f.name != chip_file:
                f.unlink(missing_ok=True)

    def _save_chip(self, seq: int) -> str | None:
        """An in-process mock chip dies with the trainer: save its state with the checkpoint."""
        chip = _mock_chip(self.array.driver) if self.array is not None else None
        if chip is None:
            return None
        name = f"chip-{seq:06d}.npz"
        chip.save(self.journal_dir / name)  # type: ignore[operator]
        return name

    def start_journal(self) -> None:
        """Journal from here on (a new run: after the directory exists, before the first program)."""
        assert self.journal_dir is not None
        self.journal = Journal(self.journal_dir / "journal-000000.bin", fsync=self.journal_fsync)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    def summary(self) -> dict[str, Any]:
        at = self.at
        task = self.task
        value = self.metrics[-1][task.metric] if self.metrics else None
        out: dict[str, Any] = {
            task.metric: value,
            "metric": {"name": task.metric, "value": value, "higher_is_better": task.higher_is_better},
            "epochs": at.epoch,
            "steps": at.step,
            "samples_trained": at.samples_trained,
            "train_seconds": at.train_seconds,
            "us_per_sample": at.train_seconds / at.samples_trained * 1e6 if at.samples_trained else None,
        }
        if self.array is not None:
            c = self.array.counters
            out.update(programs_applied=c.programs_applied, set_pulses=c.set_pulses, reset_pulses=c.reset_pulses,
                       refreshes=c.refreshes, devices_read=c.devices_read, read_calls=c.read_calls)
            out["response"] = self.response_summary()
        return out


def _mock_chip(driver: ArrayDriver) -> Any:
    inner = getattr(driver, "inner", driver)
    return getattr(inner, "chip", None)
