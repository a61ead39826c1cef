"""Models for tests/test_networks.py, given to runs as network.module = "netmodels:NAME"."""

from __future__ import annotations

from torch import nn


def conv_with_digital_head(input_shape: tuple[int, int, int], n_classes: int, width: int = 12) -> nn.Module:
    """A conv layer on the array, a dropout, and two linear layers: 'head' is meant to be kept digital."""
    c, h, w = input_shape
    return nn.Sequential(nn.Unflatten(1, input_shape), nn.Conv2d(c, 6, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Dropout(0.1), nn.Linear(6 * (h // 2) * (w // 2), width), nn.Tanh(),
                         nn.Sequential(nn.Linear(width, n_classes)))


def with_lstm() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4))


def not_a_module() -> int:
    return 3
