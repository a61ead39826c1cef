"""The paper's MLP as hand-vectorized numpy (the batch-1 fast path), and the update arithmetic every path shares.

The torch module path (any network) is hil/analog.py and hil/networks.py.

Both compute, per layer l, the factors of the weight gradient: grad W_l = A_l^T D_l, where A_l is the
layer's input with the always-on bias column appended (batch, fan_in + 1) and D_l the gradient of
the loss (softmax cross-entropy, mean over the batch) with respect to the layer's output
(batch, fan_out). The update consumes factors, never the dense gradient, so a journal of factors
lets a resume roll chi forward exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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


