"""The character-level language model (network.kind = "lstm", data.name = "text") and its task.

Embedding (digital: plain SGD beside the array) -> one or two LSTM layers (AnalogLSTM: one block of device
pairs per layer, [x_t, h_{t-1}, 1] -> 4 * hidden gates) -> a linear read-out to the alphabet (AnalogLinear).
A training item is a window of bptt + 1 characters (hil/data.py load_text); each window starts from a zero
state and the backward pass runs through its bptt steps (truncated BPTT). Metric: bits per character on the
validation split (lower is better). See docs/networks.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .tasks import Task, TaskStep

if TYPE_CHECKING:
    from .config import RunConfig
    from .trainer import Trainer

#: Validation windows per forward pass at evaluation.
EVAL_BATCH = 256


class CharLM(nn.Module):
    """codes (batch, time) int64 -> logits (batch, time, n_chars): embedding, LSTM (batch_first), read-out."""

    def __init__(self, n_chars: int, embedding: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_chars, embedding)
        self.lstm = nn.LSTM(embedding, hidden, layers, batch_first=True)
        self.readout = nn.Linear(hidden, n_chars)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(self.embed(codes))
        return self.readout(y)


def charlm_module(cfg: RunConfig, n_chars: int) -> CharLM:
    """The torch model of [network.lstm] for an alphabet of n_chars (initialized by torch's generator)."""
    o = cfg.network.lstm_options
    return CharLM(n_chars, o.embedding, o.hidden, o.layers)


class CharLMTask(Task):
    """Next-character prediction: the cross-entropy summed over the window's characters, mean over the batch; the
    running statistic and the metric in bits per character."""

    name = "text"
    metric = "bits_per_char"
    label = "bits per character"
    higher_is_better = False
    train_metric = "train_bits_per_char"
    running_metric = "running_bits_per_char"
    running_label = "running bits/char"
    running_title = "running bits per character"
    short = "bits/char"

    def step(self, trainer: Trainer, idx: np.ndarray, step: int) -> TaskStep:
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        assert trainer.model is not None
        logits = trainer.model(torch.from_numpy(x))
        nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1), reduction="sum")
        # a window's loss is the sum over its characters (truncated BPTT's loss of the sequence), mean over the
        # batch: the learning rate then stays in the range of the other networks' (x bptt the per-character one)
        (nats / len(idx)).backward()
        # stat: the batch's summed cross-entropy in nats (running() divides by the characters it covers)
        return TaskStep([layer.take_factors() for layer in trainer.net.layers], float(nats.detach()))

    def running(self, stat: float, items: int) -> float:
        return stat / max(items * self.data.x_train.shape[1], 1) / math.log(2)

    def evaluate(self, trainer: Trainer) -> float:
        """Bits per character over every validation window (each from a zero state)."""
        model = trainer.model
        assert model is not None
        x, y = self.data.x_test, self.data.y_test
        nats = 0.0
        model.eval()
        try:
            with torch.no_grad():
                for lo in range(0, len(x), EVAL_BATCH):
                    logits = model(torch.from_numpy(x[lo:lo + EVAL_BATCH]))
                    nats += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                  torch.from_numpy(y[lo:lo + EVAL_BATCH]).reshape(-1), reduction="sum"))
        finally:
            model.train()
        return nats / max(y.size, 1) / math.log(2)
