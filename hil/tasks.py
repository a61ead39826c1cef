"""What a run learns (the task): how a batch of training items becomes a forward and backward pass through the
torch model, the evaluation metric, and the running statistic of an epoch. See docs/networks.md, "Tasks".

The trainer (hil/trainer.py) owns the loop, the data order (epoch_order over range(task.n_items())), the
mixed-precision update of the analog layers, the plain-SGD step of the digital parameters (after task.step,
with the epoch's learning rate, from their .grad), reads, refresh, journal and checkpoints. A task owns only:

* step(trainer, idx, step) -> TaskStep: forward and backward on the training items idx; the factors (A, D) of
  every analog layer in trainer.net.layers order (layer.take_factors()), the digital parameters' .grad left set,
  and the step's contribution to the running statistic. It must be deterministic given the weights (the host
  copy or HostWeights), the digital parameters and (cfg.seed, step): a resume recomputes it from the journal.
  Draw any randomness from step_rng / step_torch_generator.
* running(stat, items): the running statistic from the summed stats and the items they came from.
* evaluate(trainer) -> float: the metric on the evaluation split (the trainer has read the array before, when
  the read policy says so); under torch.no_grad, leaving no factors behind.
* epoch_extras(trainer) -> dict: further per-epoch metrics (floats) logged beside the metric (default none).

"classify" is the behaviour of every network before tasks existed (softmax cross-entropy, test accuracy),
bit for bit; the MLP fast path keeps its numpy step. "text" (hil/charlm.py) is the character-level language
model; "gan" (hil/gan.py) the MNIST GAN.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .network import Factors

if TYPE_CHECKING:
    from .config import RunConfig
    from .data import Dataset
    from .networks import Network
    from .trainer import Trainer


@dataclass
class TaskStep:
    """One training step's outcome: the analog layers' factors (in trainer.net.layers order) and stat, the step's
    part of the running statistic (classify: the samples classified right before their update, an int)."""

    factors: Factors
    stat: float | int


class Task:
    """A training task (see the module docstring). Subclasses set the class attributes and the methods.

    metric: the per-epoch metric's key in the metrics rows and the summary ("test_accuracy", "bits_per_char");
    label: the same for people ("test accuracy"); higher_is_better: its direction. train_metric: the running
    statistic's key at an epoch's end ("train_accuracy"); running_metric: its key in the run log's running
    metrics (every RUNNING_METRICS_EVERY steps); running_label: for the progress bar ("running acc");
    running_title: for pcm-hil watch ("running accuracy"); short: the metric in a table cell ("test").
    """

    name = "task"
    metric = "metric"
    label = "metric"
    higher_is_better = True
    train_metric = "train_metric"
    running_metric = "running_metric"
    running_label = "running"
    running_title = "running statistic"
    short = "metric"

    def __init__(self, cfg: RunConfig, data: Dataset, net: Network) -> None:
        self.cfg, self.data, self.net = cfg, data, net

    def n_items(self) -> int:
        """Training items per epoch: an epoch visits range(n_items) in epoch_order(seed, epoch, n_items)."""
        return len(self.data.y_train)

    def step(self, trainer: Trainer, idx: np.ndarray, step: int) -> TaskStep:
        """Forward and backward on the training items idx at global step `step` (1-based)."""
        raise NotImplementedError

    def running(self, stat: float, items: int) -> float:
        """The running statistic of stat summed over steps that trained `items` items."""
        return stat / max(items, 1)

    def evaluate(self, trainer: Trainer) -> float:
        """The metric on the evaluation split."""
        raise NotImplementedError

    def epoch_extras(self, trainer: Trainer) -> dict[str, float]:
        """Further metrics of an epoch's end, logged in its row (called right after evaluate)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The metric's names for readers of the run log (attribute task_metric_json; analysis/taskmetric.py)."""
        return {"task": self.name, "name": self.metric, "label": self.label, "higher_is_better": self.higher_is_better,
                "train": self.train_metric, "running": self.running_metric, "running_title": self.running_title,
                "short": self.short}


class ClassifyTask(Task):
    """Softmax cross-entropy classification (mean over the batch), test accuracy: every network before tasks."""

    name = "classify"
    metric = "test_accuracy"
    label = "test accuracy"
    higher_is_better = True
    train_metric = "train_accuracy"
    running_metric = "running_accuracy"
    running_label = "running acc"
    running_title = "running accuracy"
    short = "test"

    def step(self, trainer: Trainer, idx: np.ndarray, step: int) -> TaskStep:
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        res = trainer.forward_backward(x, y, step)
        return TaskStep(res.factors, int(np.sum(res.predicted == y)))

    def evaluate(self, trainer: Trainer) -> float:
        return trainer.accuracy()


def step_seed(seed: int, step: int, stream: int = 0) -> list[int]:
    """The seed sequence of a step's randomness ([seed, step, stream]: the same at a resume's recomputation)."""
    return [int(seed), int(step), int(stream)]


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """A numpy generator fixed by (seed, step, stream): a task's randomness of one step (a GAN's noise)."""
    return np.random.default_rng(step_seed(seed, step, stream))


def step_torch_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A torch CPU generator fixed by (seed, step, stream)."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence(step_seed(seed, step, stream)).generate_state(1, np.uint64)[0] >> 1))
    return g


#: network.kind -> task name; any other kind classifies.
KIND_TASK = {"lstm": "text", "gan": "gan"}
#: task name -> "module:Class" (imported when first used, so hil.gan is loaded only by a GAN run).
TASKS = {"classify": "hil.tasks:ClassifyTask", "text": "hil.charlm:CharLMTask", "gan": "hil.gan:GanTask"}


def task_name(cfg: RunConfig) -> str:
    """The task of a run config: by network.kind."""
    return KIND_TASK.get(cfg.network.kind, "classify")


def task_class(name: str) -> type[Task]:
    """The Task class of a task name."""
    mod, _, attr = TASKS[name].partition(":")
    cls: Any = getattr(importlib.import_module(mod), attr)
    return cls


def make_task(cfg: RunConfig, data: Dataset, net: Network) -> Task:
    """The task of cfg, over data and the built network."""
    return task_class(task_name(cfg))(cfg, data, net)
