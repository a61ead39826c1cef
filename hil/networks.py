"""The networks a run config names (network.kind): the paper's MLP, a LeNet-style CNN, a user's own module, the
character-level LSTM language model (hil/charlm.py) or the GAN (hil/gan.py).

build_network() returns a Network: the analog layers' shapes and initial weights (what the mapping
and the initial programming need) and, except for the MLP's fast path, the converted torch model.
Initialization is seeded by cfg.seed, so a PCM run and its baseline start from the same weights.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .analog import AnalogLayer, ConvertError, analog_layers, convert
from .config import ConfigError, RunConfig
from .data import Dataset
from .network import init_weights


@dataclass
class Network:
    """What a run trains: names, shapes (fan_in, fan_out) and initial weights of the analog layers, and the model.

    model is None for the MLP on the fast path (hil/network.py fast_step). digital: the parameters
    trained by plain SGD beside the array, by name.
    """

    kind: str
    names: list[str]
    shapes: list[tuple[int, int]]
    w0: list[np.ndarray]
    model: nn.Module | None = None
    layers: list[AnalogLayer] = field(default_factory=list)
    digital: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n_weights(self) -> int:
        """Analog weights, bias rows included (each one device pair)."""
        return sum((i + 1) * o for i, o in self.shapes)

    def describe(self) -> str:
        """One line per analog layer: name, matrix and devices (for messages and the log)."""
        return "; ".join(f"{n} {i + 1}x{o}" for n, (i, o) in zip(self.names, self.shapes, strict=True))


def input_shape(data: Dataset) -> tuple[int, ...]:
    """(channels, height, width) of an image data set, else (features,)."""
    shape = getattr(data, "input_shape", None)
    return tuple(shape) if shape else (data.n_features,)


def mlp_module(sizes: list[int]) -> nn.Sequential:
    """The paper's MLP as torch layers: Linear, sigmoid, ..., Linear (logits)."""
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i:
            mods.append(nn.Sigmoid())
        mods.append(nn.Linear(a, b))
    return nn.Sequential(*mods)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def cnn_module(cfg: RunConfig, shape: tuple[int, ...], n_classes: int) -> nn.Sequential:
    """LeNet-style CNN: [conv, activation, 2x2 max-pool] per network.cnn.channels, then fully connected layers."""
    c = cfg.network.cnn
    if len(shape) != 3:
        raise ConfigError(f"network.kind = \"cnn\" needs image data; the data set gives {shape[0]} features per sample")
    act = _ACTIVATIONS[c.activation]
    mods: list[nn.Module] = [nn.Unflatten(1, shape)]
    ch, h, w = shape
    for out in c.channels:
        mods += [nn.Conv2d(ch, out, c.kernel, padding=c.padding), act()]
        h, w = h + 2 * c.padding - c.kernel + 1, w + 2 * c.padding - c.kernel + 1
        if c.pool:
            mods.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ConfigError(f"network.cnn: a {shape[1]}x{shape[2]} image is used up after {len(mods)} layers "
                              f"(kernel {c.kernel}, padding {c.padding}, pool {c.pool}); use fewer channels entries, "
                              "a smaller kernel or more padding")
        ch = out
    mods.append(nn.Flatten())
    n = ch * h * w
    for width in c.fc:
        mods += [nn.Linear(n, width), act()]
        n = width
    mods.append(nn.Linear(n, n_classes))
    return nn.Sequential(*mods)


def user_module(cfg: RunConfig, shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """network.module = "pkg.mod:build": build(**network.options), given input_shape and n_classes if it takes them.

    The module is imported from the environment or the current folder."""
    spec = cfg.network.module
    assert spec is not None
    mod_name, _, attr = spec.partition(":")
    # like `python -m`, the current folder is importable (the pcm-hil console script would not see it otherwise)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"network.module {spec!r} cannot be imported: {e}") from None
    kwargs = dict(cfg.network.options)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    for k, v in (("input_shape", shape), ("n_classes", n_classes)):
        if k in params and k not in kwargs:
            kwargs[k] = v
    try:
        model = fn(**kwargs)
    except TypeError as e:
        raise ConfigError(f"network.module {spec!r}: calling it with {sorted(kwargs)} failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"network.module {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_network(cfg: RunConfig, data: Dataset, *, torch_model: bool | None = None) -> Network:
    """The network of cfg for data. torch_model: build the torch model for the MLP too (the module path);
    None: only where the MLP does not take the fast path (update.path)."""
    net = cfg.network
    shape = input_shape(data)
    if net.kind == "mlp":
        sizes = [data.n_features, *net.hidden, data.n_classes]
        w0 = init_weights(sizes, cfg.seed, net.init_scale)
        names = [str(2 * i) for i in range(len(sizes) - 1)]
        shapes = list(zip(sizes[:-1], sizes[1:], strict=True))
        if torch_model is None:
            torch_model = cfg.update.path == "module"
        if not torch_model:
            return Network("mlp", names, shapes, w0)
        model = convert(mlp_module(sizes))
        for (_, layer), w in zip(analog_layers(model), w0, strict=True):
            layer.initial[:] = w
        return _network("mlp", model)
    if net.kind == "lstm":
        from .charlm import charlm_module

        if data.alphabet is None:
            raise ConfigError("network.kind = \"lstm\" needs text data (data.name = \"text\")")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            raw_lm = charlm_module(cfg, data.n_classes)
        # the embedding is a lookup, no multiply: it stays digital (network.digital may keep "lstm" or "readout" too)
        try:
            model = convert(raw_lm, ["embed", *(n for n in net.digital if n != "embed")], lstm=True)
        except ConvertError as e:
            raise ConfigError(str(e)) from None
        return _network("lstm", model)
    if net.kind == "gan":
        # the GAN builds its two networks itself (hil/gan.py), imported only by a GAN run
        return importlib.import_module("hil.gan").build_network(cfg, data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        raw = cnn_module(cfg, shape, data.n_classes) if net.kind == "cnn" else user_module(cfg, shape, data.n_classes)
    try:
        model = convert(raw, net.digital)
    except ConvertError as e:
        raise ConfigError(str(e)) from None
    return _network(net.kind, model)


def _network(kind: str, model: nn.Module) -> Network:
    layers = analog_layers(model)
    analog_params = {id(p) for _, m in layers for p in m.parameters()}
    digital = {n: p for n, p in model.named_parameters() if id(p) not in analog_params}
    return Network(kind, [n for n, _ in layers], [(m.fan_in, m.fan_out) for _, m in layers],
                   [m.initial.copy() for _, m in layers], model, [m for _, m in layers], digital)
