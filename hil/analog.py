"""Analog layers as torch modules, and convert(): any torch model whose chosen layers live on the array.

An analog layer is a weight matrix W of shape (fan_in + 1, fan_out) on the array as device pairs,
W = beta * (G+ - G-), its last row the bias (an always-on input). Its products come from a
WeightSource: the host copy of conductances (kept fresh by the read policy) or the chip's analog
multiply. Its gradient is never a torch parameter: each use in a step leaves the factors (A, D) of
grad W = A^T D, A the inputs with the bias column (rows: samples, or image patches, or time steps),
D the gradient of the loss with respect to the outputs; the mixed-precision update consumes them.
A layer used several times in one step (an LSTM's matrices over time, a GAN's generator seen by two
losses) stacks the factors of every use. See docs/networks.md.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class ConvertError(ValueError):
    """A model holds a layer that cannot be placed on the array (and was not named digital)."""


class WeightSource:
    """Where an analog layer's products come from: a host matrix (fresh from reads) or the chip's analog multiply."""

    def product(self, a: np.ndarray) -> np.ndarray:
        """a (n, fan_in + 1) -> a @ W (n, fan_out)."""
        raise NotImplementedError

    def product_t(self, d: np.ndarray) -> np.ndarray:
        """d (n, fan_out) -> d @ W^T (n, fan_in + 1)."""
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
    def forward(ctx, a: torch.Tensor, anchor: torch.Tensor, layer: AnalogLayer) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        ctx.save_for_backward(a)
        return torch.from_numpy(layer.source.product(a.detach().numpy()))

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        (a,) = ctx.saved_tensors
        layer: AnalogLayer = ctx.layer
        # gy may be a broadcast view (stride 0): the factor must own its memory
        d = np.ascontiguousarray(gy.detach().numpy(), np.float64)
        layer.uses.append((a.detach().numpy(), d))
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return torch.from_numpy(layer.source.product_t(d)), None, None


def _with_ones(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)


class AnalogLayer(nn.Module):
    """A weight matrix (fan_in + 1, fan_out) on the array; subclasses say how inputs become its rows.

    initial: the weights it starts from (float64, bias row last), from the torch layer it replaced.
    source: set by the trainer (HostWeights over the array's host copy, or the chip's multiply);
    until then products come from a private copy of initial.
    """

    kind = "analog"

    def __init__(self, fan_in: int, fan_out: int, initial: np.ndarray | None = None) -> None:
        super().__init__()
        self.fan_in, self.fan_out = int(fan_in), int(fan_out)
        if initial is None:
            initial = np.zeros((self.fan_in + 1, self.fan_out))
        if initial.shape != (self.fan_in + 1, self.fan_out):
            raise ValueError(f"initial weights {initial.shape}, the layer is {(self.fan_in + 1, self.fan_out)}")
        self.initial = np.array(initial, np.float64)
        self.source: WeightSource = HostWeights(self.initial.copy())
        self.uses: list[tuple[np.ndarray, np.ndarray]] = []
        # The weights are no torch parameter, so nothing would ask for the backward pass of a first layer
        # whose input needs no gradient: this empty tensor does (it is not a parameter and gets no gradient).
        self._anchor = torch.zeros(0, dtype=torch.float64, requires_grad=True)

    @property
    def shape(self) -> tuple[int, int]:
        """(fan_in + 1, fan_out): the matrix on the array, bias row included."""
        return (self.fan_in + 1, self.fan_out)

    def matmul(self, a: torch.Tensor) -> torch.Tensor:
        """a (n, fan_in) -> a @ W[:-1] + W[-1] (n, fan_out), through the weight source."""
        return _AnalogMatmul.apply(_with_ones(a), self._anchor, self)

    def take_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """The step's factors (A, D) of grad W = A^T D, every use stacked; forgets them."""
        uses, self.uses = self.uses, []
        if not uses:
            # Unused this step (a GAN's other network): a zero update that touches no row.
            return np.zeros((0, self.fan_in + 1)), np.zeros((0, self.fan_out))
        if len(uses) == 1:
            return uses[0]
        return np.concatenate([a for a, _ in uses]), np.concatenate([d for _, d in uses])

    def extra_repr(self) -> str:
        return f"fan_in={self.fan_in}, fan_out={self.fan_out}"


class AnalogLinear(AnalogLayer):
    """nn.Linear on the array: (..., fan_in) -> (..., fan_out)."""

    kind = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.fan_in))
        return y.reshape(*lead, self.fan_out)

    @classmethod
    def from_torch(cls, m: nn.Linear) -> AnalogLinear:
        w = np.zeros((m.in_features + 1, m.out_features))
        w[:-1] = m.weight.detach().double().numpy().T
        if m.bias is not None:
            w[-1] = m.bias.detach().double().numpy()
        return cls(m.in_features, m.out_features, w)


class AnalogConv2d(AnalogLayer):
    """nn.Conv2d on the array: the kernel is a (in_channels * kh * kw + 1) x out_channels matrix, applied to
    every image patch (the rows of A are the patches of all samples; the array multiplies one patch per read)."""

    kind = "conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int] = (1, 1),
                 padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1),
                 initial: np.ndarray | None = None) -> None:
        super().__init__(in_channels * kernel_size[0] * kernel_size[1], out_channels, initial)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        kh, kw = self.kernel_size
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (b, fan_in, L)
        y = self.matmul(cols.transpose(1, 2).reshape(b * ho * wo, self.fan_in))
        return y.reshape(b, ho * wo, self.fan_out).transpose(1, 2).reshape(b, self.fan_out, ho, wo)

    @classmethod
    def from_torch(cls, m: nn.Conv2d, name: str = "") -> AnalogConv2d:
        where = f"layer {name!r} " if name else ""
        if m.groups != 1:
            raise ConvertError(f"{where}(Conv2d, groups={m.groups}) cannot be placed: only groups=1 convolutions map "
                               "onto one array block")
        if m.padding_mode != "zeros":
            raise ConvertError(f"{where}(Conv2d, padding_mode={m.padding_mode!r}) cannot be placed: only zero padding")
        padding = m.padding
        if isinstance(padding, str):
            if padding != "valid":
                raise ConvertError(f"{where}(Conv2d, padding={padding!r}) cannot be placed: give the padding as numbers")
            padding = (0, 0)
        kh, kw = m.kernel_size
        w = np.zeros((m.in_channels * kh * kw + 1, m.out_channels))
        # unfold orders a patch as (channel, row, col): the same as weight.reshape(out, -1)
        w[:-1] = m.weight.detach().double().reshape(m.out_channels, -1).numpy().T
        if m.bias is not None:
            w[-1] = m.bias.detach().double().numpy()
        return cls(m.in_channels, m.out_channels, (kh, kw), tuple(m.stride), tuple(padding), tuple(m.dilation), w)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")


class AnalogLSTMCell(AnalogLayer):
    """One LSTM layer's matrices on the array as one block: [x_t, h_{t-1}, 1] (input_size + hidden_size + 1 rows)
    -> the 4 * hidden_size gate pre-activations (torch's order: input, forget, cell, output gates).

    One block, not an input and a recurrent matrix apart: the crossbar multiplies the concatenated vector in
    one read per time step, the bias is one row (torch's b_ih + b_hh), and every time step is one use whose
    factors stack (A: (time steps x batch) rows of [x_t, h_{t-1}, 1], D: the gates' gradients), so the update
    is the paper's over both matrices at once. The nonlinearities run on the host.
    """

    kind = "lstm"

    def __init__(self, input_size: int, hidden_size: int, initial: np.ndarray | None = None) -> None:
        super().__init__(input_size + hidden_size, 4 * hidden_size, initial)
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One time step: x (batch, input_size), state (h, c) each (batch, hidden_size) -> the new (h, c)."""
        h, c = state
        z = self.matmul(torch.cat([x, h], dim=1))
        i, f, g, o = z.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}"


class AnalogLSTM(nn.Module):
    """nn.LSTM (one or more layers, unidirectional, no projection) on the array: one AnalogLSTMCell per layer.

    forward(x, hx=None) -> (output, (h_n, c_n)) as nn.LSTM's: x (batch, time, input) if batch_first, else
    (time, batch, input); hx None starts from zeros. Backward runs through autograd over the time steps
    (truncated backpropagation through time over the sequence given).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = False,
                 initial: list[np.ndarray] | None = None) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.batch_first = bool(batch_first)
        sizes = [self.input_size] + [self.hidden_size] * (self.num_layers - 1)
        self.cells = nn.ModuleList(AnalogLSTMCell(n, self.hidden_size, None if initial is None else initial[k])
                                   for k, n in enumerate(sizes))

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if self.batch_first:
            x = x.transpose(0, 1)
        t_len, b = x.shape[0], x.shape[1]
        if hx is None:
            zeros = torch.zeros(b, self.hidden_size, dtype=x.dtype)
            state = [(zeros, zeros) for _ in self.cells]
        else:
            state = [(hx[0][k], hx[1][k]) for k in range(self.num_layers)]
        seq = list(x.unbind(0))
        for k, cell in enumerate(self.cells):
            h, c = state[k]
            out = []
            for t in range(t_len):
                h, c = cell(seq[t], (h, c))
                out.append(h)
            state[k] = (h, c)
            seq = out
        y = torch.stack(seq, 0)
        if self.batch_first:
            y = y.transpose(0, 1)
        return y, (torch.stack([h for h, _ in state]), torch.stack([c for _, c in state]))

    @classmethod
    def from_torch(cls, m: nn.LSTM, name: str = "") -> AnalogLSTM:
        """The same LSTM, its weights as the cells' blocks ([W_ih^T; W_hh^T; b_ih + b_hh] per layer)."""
        where = f"layer {name!r} " if name else ""
        for what, bad in (("bidirectional=True", m.bidirectional), (f"proj_size={m.proj_size}", m.proj_size),
                          (f"dropout={m.dropout}", m.dropout)):
            if bad:
                raise ConvertError(f"{where}(LSTM, {what}) cannot be placed: only unidirectional LSTMs without "
                                   "projection or inter-layer dropout map onto the array")
        h = m.hidden_size
        initial = []
        for k in range(m.num_layers):
            w_ih = getattr(m, f"weight_ih_l{k}").detach().double().numpy()
            w_hh = getattr(m, f"weight_hh_l{k}").detach().double().numpy()
            w = np.zeros((w_ih.shape[1] + h + 1, 4 * h))
            w[:w_ih.shape[1]] = w_ih.T
            w[w_ih.shape[1]:-1] = w_hh.T
            if m.bias:
                w[-1] = (getattr(m, f"bias_ih_l{k}").detach().double() + getattr(m, f"bias_hh_l{k}").detach().double()).numpy()
            initial.append(w)
        return cls(m.input_size, h, m.num_layers, m.batch_first, initial)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, batch_first={self.batch_first}"


def analog_layers(model: nn.Module) -> list[tuple[str, AnalogLayer]]:
    """(dotted name, layer) of every analog layer, in the model's module order: the order of the mapping."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AnalogLayer)]


def convert(model: nn.Module, digital: Iterable[str] = (), *, inplace: bool = False, lstm: bool = False) -> nn.Module:
    """The model with every nn.Linear / nn.Conv2d (and with lstm=True every nn.LSTM) replaced by analog layers,
    except those named in digital.

    digital: dotted module names (as model.named_modules() gives them) kept off the chip, trained by an
    ordinary optimizer. Other layers with parameters (normalization, embeddings...) cannot be
    placed: ConvertError names them and says how to keep them digital. lstm: place nn.LSTM layers too
    (AnalogLSTM; off by default, so a model's LSTM is never put on the array unasked: network.kind = "lstm"
    asks). The model is copied unless inplace.
    """
    keep = set(digital)
    names = {n for n, _ in model.named_modules()}
    unknown = sorted(keep - names)
    if unknown:
        raise ConvertError(f"digital names {', '.join(map(repr, unknown))} are not modules of the model "
                           f"(its modules: {', '.join(repr(n) for n in sorted(names) if n) or 'none'})")
    out = model if inplace else copy.deepcopy(model)
    _convert_children(out, "", keep, lstm)
    if not analog_layers(out):
        raise ConvertError("the model has no nn.Linear or nn.Conv2d layer left to place on the array (nor an nn.LSTM)")
    return out.double()


def _convert_children(parent: nn.Module, prefix: str, keep: set[str], lstm: bool) -> None:
    for child_name, child in list(parent.named_children()):
        name = f"{prefix}{child_name}"
        if name in keep or isinstance(child, AnalogLayer | AnalogLSTM):
            continue
        if type(child) is nn.Linear:
            setattr(parent, child_name, AnalogLinear.from_torch(child))
        elif type(child) is nn.Conv2d:
            setattr(parent, child_name, AnalogConv2d.from_torch(child, name))
        elif type(child) is nn.LSTM and lstm:
            setattr(parent, child_name, AnalogLSTM.from_torch(child, name))
        else:
            own = [p for p, _ in child.named_parameters(recurse=False)]
            if own:
                raise ConvertError(f"layer {name!r} ({type(child).__name__}, parameters {', '.join(own)}) cannot be "
                                   "placed on the array (analog layers: Linear, Conv2d; LSTM by convert(..., "
                                   "lstm=True)); keep it digital with "
                                   f"network.digital = [\"{name}\"] (convert(..., digital=[{name!r}]))")
            _convert_children(child, f"{name}.", keep, lstm)
