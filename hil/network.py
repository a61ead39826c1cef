"""The network: analog layers as torch modules (the module path) and a hand-vectorized numpy MLP (the fast path).

Both compute, per layer l, the factors of the weight gradient: grad W_l = A_l^T D_l, where A_l is the
layer's input with the always-on bias column appended (batch, fan_in + 1) and D_l the gradient of
the loss (softmax cross-entropy, mean over the batch) with respect to the layer's output
(batch, fan_out). The update consumes factors, never the dense gradient, so a journal of factors
lets a resume roll chi forward exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

Factors = list[tuple[np.ndarray, np.ndarray]]


def with_bias(a: np.ndarray) -> np.ndarray:
    """a (batch, n) -> (batch, n + 1), last column the always-on bias input (1.0)."""
    out = np.empty((a.shape[0], a.shape[1] + 1), np.float64)
    out[:, :-1] = a
    out[:, -1] = 1.0
    return out


def sigmoid(z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """1 / (1 + exp(-z)) as where(z >= 0, 1 / (1 + e), e / (1 + e)) with e = exp(-|z|) (never overflows).

    Computed as where(z >= 0, 1, e) / (1 + e): the same divisions of the same operands, bit for bit, in
    fewer passes and temporaries. out: where to write it (same shape, float64), else a new array.
    """
    e = np.abs(z)
    np.negative(e, out=e)
    np.exp(e, out=e)
    t = e + 1.0
    np.copyto(e, 1.0, where=z >= 0)
    return np.divide(e, t, out=out)


def softmax(z: np.ndarray) -> np.ndarray:
    """Softmax along axis 1, computed in z's place (z is used up): exp(z - max) / sum."""
    np.subtract(z, z.max(axis=1, keepdims=True), out=z)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def init_weights(sizes: Sequence[int], seed: int, scale: float = 1.0) -> list[np.ndarray]:
    """Glorot-uniform weights (fan_in + 1, fan_out) per layer, bias row zero; float64, seeded."""
    rng = np.random.default_rng([seed, 1])
    out = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        a = scale * np.sqrt(6.0 / (fan_in + fan_out))
        w = np.zeros((fan_in + 1, fan_out))
        w[:-1] = rng.uniform(-a, a, (fan_in, fan_out))
        out.append(w)
    return out


@dataclass
class StepResult:
    """What one forward/backward pass yields: predicted classes and the gradient factors per layer."""

    predicted: np.ndarray
    factors: Factors


def _hidden_with_bias(ab: np.ndarray, w: np.ndarray) -> np.ndarray:
    """with_bias(sigmoid(ab @ w)), the sigmoid written straight into the next layer's input."""
    z = ab @ w
    out = np.empty((z.shape[0], z.shape[1] + 1), np.float64)
    out[:, -1] = 1.0
    sigmoid(z, out=out[:, :-1])
    return out


def fast_forward(weights: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits (batch, classes) of the sigmoid MLP for inputs x (batch, features)."""
    ab = with_bias(x)
    for w in weights[:-1]:
        ab = _hidden_with_bias(ab, w)
    return ab @ weights[-1]


def fast_step(weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> StepResult:
    """Hand-vectorized forward and backward pass of the sigmoid MLP (numpy, float64)."""
    ab = with_bias(x)
    acts = [ab]
    for w in weights[:-1]:
        ab = _hidden_with_bias(ab, w)
        acts.append(ab)
    d = softmax(ab @ weights[-1])
    predicted = d.argmax(axis=1)
    n = len(y)
    if n == 1:
        d[0, y[0]] -= 1.0  # and d /= 1 changes nothing
    else:
        d[np.arange(n), y] -= 1.0
        d /= n
    deltas = [d]
    for i in range(len(weights) - 1, 0, -1):
        h = acts[i][:, :-1]
        d = d @ weights[i][:-1].T
        d *= h
        d *= 1.0 - h
        deltas.append(d)
    deltas.reverse()
    return StepResult(predicted, list(zip(acts, deltas, strict=True)))


# ---------------------------------------------------------------------------------------------- module path

class WeightSource:
    """Where an analog layer's products come from: a host matrix (fresh from reads) or the chip's analog multiply."""

    def product(self, a: np.ndarray) -> np.ndarray:
        """a (batch, fan_in + 1) -> a @ W (batch, fan_out)."""
        raise NotImplementedError

    def product_t(self, d: np.ndarray) -> np.ndarray:
        """d (batch, fan_out) -> d @ W^T (batch, fan_in + 1)."""
        raise NotImplementedError


class HostWeights(WeightSource):
    """Products from a float64 host matrix that the caller keeps current (updated in place)."""

    def __init__(self, w: np.ndarray) -> None:
        self.w = w

    def product(self, a: np.ndarray) -> np.ndarray:
        return a @ self.w

    def product_t(self, d: np.ndarray) -> np.ndarray:
        return d @ self.w.T


class _AnalogMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, layer: AnalogLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        ctx.save_for_backward(a)
        return torch.from_numpy(layer.source.product(a.detach().numpy()))

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        (a,) = ctx.saved_tensors
        layer: AnalogLinear = ctx.layer
        d = gy.detach().numpy().astype(np.float64, copy=True)
        layer.factors = (a.detach().numpy().astype(np.float64, copy=True), d)
        return torch.from_numpy(layer.source.product_t(d)), None


class AnalogLinear(nn.Module):
    """A linear layer whose weights live on the array as device pairs, bias as an always-on input row.

    Its gradient is not a parameter: backward leaves the factors (A, D) of grad W = A^T D in
    self.factors, for the mixed-precision update. Later conv / LSTM layers follow the same shape:
    a WeightSource for products, factors out.
    """

    def __init__(self, fan_in: int, fan_out: int, source: WeightSource) -> None:
        super().__init__()
        self.fan_in, self.fan_out, self.source = fan_in, fan_out, source
        self.factors: tuple[np.ndarray, np.ndarray] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        return _AnalogMatmul.apply(a, self)


class AnalogMLP(nn.Module):
    """The paper's MLP out of AnalogLinear layers: sigmoid hidden layers, logits out."""

    def __init__(self, sizes: Sequence[int], sources: Sequence[WeightSource]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(AnalogLinear(i, o, s) for i, o, s in zip(sizes[:-1], sizes[1:], sources, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.sigmoid(layer(x))
        return self.layers[-1](x)


def module_step(model: AnalogMLP, x: np.ndarray, y: np.ndarray) -> StepResult:
    """Forward and backward through the torch modules; the same result as fast_step."""
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float64)).requires_grad_(True)
    logits = model(xt)
    loss = nn.functional.cross_entropy(logits, torch.from_numpy(y))
    loss.backward()
    factors = []
    for layer in model.layers:
        assert layer.factors is not None
        factors.append(layer.factors)
        layer.factors = None
    return StepResult(logits.detach().numpy().argmax(axis=1), factors)


def module_forward(model: AnalogMLP, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x, np.float64))).numpy()


def accumulate(target: np.ndarray, a: np.ndarray, d: np.ndarray, lr: float) -> np.ndarray:
    """target -= lr * a^T d, touching only rows where some input is nonzero; returns those rows (int64).

    One function for chi (PCM run), weights (baseline) and the resume's roll-forward, so all three
    do the same float operations in the same order.
    """
    return accumulate_rows(target, a, d, lr)[0]


def accumulate_rows(target: np.ndarray, a: np.ndarray, d: np.ndarray, lr: float) -> tuple[np.ndarray, np.ndarray]:
    """accumulate(), also returning the touched rows' new values (a copy), so a caller can scan them without a second gather."""
    if a.shape[0] == 1:
        # Batch 1: a^T d is an outer product, each element one rounded product as the matmul makes it (the
        # matmul may differ only in the sign of a zero product, and adding a zero of either sign to chi or a
        # weight gives the same value: neither is ever -0.0). np.multiply.outer is 2x faster than BLAS here.
        a0 = a[0]
        rows = (a0 != 0.0).nonzero()[0]
        x = a0[rows]
        x *= -lr
        sub = target[rows]
        sub += np.multiply.outer(x, d[0])
        target[rows] = sub
        return rows, sub
    rows = np.flatnonzero(np.any(a != 0.0, axis=0))
    sub = target[rows]
    sub += (-lr * a[:, rows]).T @ d
    target[rows] = sub
    return rows, sub


Stepper = Callable[[np.ndarray, np.ndarray], StepResult]
