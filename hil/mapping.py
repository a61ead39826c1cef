"""Where each layer's weights sit on the array: a device pair (G+, G-) per weight, W = beta * (G+ - G-).

A layer with fan_in inputs and fan_out outputs takes (fan_in + 1) rows (the last is the bias row,
driven by an always-on input) and 2 * fan_out columns: G+ in the left block, G- in the right one.
With N devices per polarity (a multi-memristive synapse, Boybat et al., Nat. Commun. 9, 2514, 2018)
W = beta * sum_k (G+_k - G-_k), and the layer takes 2 * N * fan_out columns: N G+ blocks, then N G- blocks.
Layers sit side by side from (row0, col0); one that does not fit beside the previous ones starts a new
band of rows below them. A conv layer is a (in_channels * kh * kw + 1) x out_channels matrix. Addresses are flat: row * cols + col.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from drivers import Block, Geometry


def shapes_of(sizes: list[int]) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of each layer of an MLP with these sizes (inputs, hidden..., outputs)."""
    return list(zip(sizes[:-1], sizes[1:], strict=True))


class MappingError(ValueError):
    """The network does not fit the array, or a saved mapping disagrees with this one."""


@dataclass(frozen=True)
class LayerMap:
    """One layer's place on the array and its scale; plus[r, c] / minus[r, c] are flat device addresses.

    With copies = N > 1 devices per polarity, plus and minus are (N, fan_in + 1, fan_out) and plus_block /
    minus_block the first copy's blocks (plus_blocks / minus_blocks all of them).
    """

    index: int
    fan_in: int
    fan_out: int
    beta: float
    plus_block: Block
    minus_block: Block
    plus: np.ndarray
    minus: np.ndarray
    copies: int = 1
    plus_blocks: tuple[Block, ...] = ()
    minus_blocks: tuple[Block, ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        """(fan_in + 1, fan_out): the weight matrix with its bias row."""
        return (self.fan_in + 1, self.fan_out)

    @property
    def plus_copies(self) -> np.ndarray:
        """G+ addresses as (copies, weights): copy k of flat weight j at [k, j]."""
        return self.plus.reshape(self.copies, -1)

    @property
    def minus_copies(self) -> np.ndarray:
        """G- addresses as (copies, weights)."""
        return self.minus.reshape(self.copies, -1)


def per_layer(copies: int | list[int], n_layers: int) -> list[int]:
    """Devices per polarity of each layer: one value for all, or one per layer (the last repeats; an empty list
    is 1)."""
    if isinstance(copies, int):
        return [copies] * n_layers
    if not copies:
        return [1] * n_layers
    return [int(copies[min(i, len(copies) - 1)]) for i in range(n_layers)]


def _block_addresses(block: Block, cols: int) -> np.ndarray:
    r = np.arange(block.row0, block.row0 + block.rows, dtype=np.int64)[:, None]
    c = np.arange(block.col0, block.col0 + block.cols, dtype=np.int64)[None, :]
    return r * cols + c


@dataclass(frozen=True)
class Mapping:
    """All layers' places on one array, with the inverse: address -> (layer, weight index, sign)."""

    geometry: Geometry
    layers: tuple[LayerMap, ...]
    layer_of: np.ndarray    # int16 per device: layer index, -1 where unmapped
    weight_of: np.ndarray   # int64 per device: flat index into the layer's weight matrix
    sign_of: np.ndarray     # int8 per device: +1 for G+, -1 for G-, 0 where unmapped

    @cached_property
    def addresses(self) -> np.ndarray:
        """Every mapped address, sorted (int64, read-only: made once, shared by every full read and check)."""
        a = np.flatnonzero(self.layer_of >= 0).astype(np.int64)
        a.flags.writeable = False
        return a

    @property
    def copies(self) -> int:
        """The most devices per polarity of any layer's weights (1: one pair per weight everywhere)."""
        return max((lm.copies for lm in self.layers), default=1)

    @property
    def uniform_copies(self) -> bool:
        """Whether every layer has the same devices per polarity."""
        return len({lm.copies for lm in self.layers}) <= 1

    @staticmethod
    def required_geometry(sizes: list[int], row0: int = 0, col0: int = 0, copies: int | list[int] = 1) -> Geometry:
        """Smallest array that holds a network with these layer sizes (inputs, hidden..., outputs)."""
        return Mapping.geometry_for(shapes_of(sizes), row0, col0, copies)

    @staticmethod
    def geometry_for(shapes: list[tuple[int, int]], row0: int = 0, col0: int = 0,
                     copies: int | list[int] = 1) -> Geometry:
        """Smallest array that holds layers of these (fan_in, fan_out) side by side (a simulated chip's size),
        copies devices per polarity (one for all layers, or one per layer)."""
        n = per_layer(copies, len(shapes))
        rows = row0 + max(i + 1 for i, _ in shapes)
        cols = col0 + sum(2 * k * o for k, (_, o) in zip(n, shapes, strict=True))
        return Geometry(rows, cols)

    @classmethod
    def build(cls, sizes: list[int], betas: list[float], geometry: Geometry, row0: int = 0, col0: int = 0) -> Mapping:
        """Place the MLP's layers sizes[i] -> sizes[i+1]; MappingError if the array is too small."""
        return cls.build_layers(shapes_of(sizes), betas, geometry, row0, col0)

    @classmethod
    def build_layers(cls, shapes: list[tuple[int, int]], betas: list[float], geometry: Geometry, row0: int = 0,
                     col0: int = 0, names: list[str] | None = None, copies: int | list[int] = 1) -> Mapping:
        """Place layers of these (fan_in, fan_out) side by side from (row0, col0), copies devices per polarity; a
        layer that does not fit beside the previous ones starts a new band of rows below them. MappingError names
        the first layer that does not fit."""
        layer_copies = per_layer(copies, len(shapes))
        if min(layer_copies, default=1) < 1:
            raise MappingError(f"devices per polarity must be at least 1, not {min(layer_copies)}")
        names = names if names is not None else [str(i) for i in range(len(shapes))]
        n = geometry.n_devices
        layer_of = np.full(n, -1, np.int16)
        weight_of = np.zeros(n, np.int64)
        sign_of = np.zeros(n, np.int8)
        layers = []
        row, col, band = row0, col0, 0
        for i, (fan_in, fan_out) in enumerate(shapes):
            copies = layer_copies[i]
            h, w = fan_in + 1, 2 * copies * fan_out
            if col + w > geometry.cols and col > col0:
                row, col, band = row + band, col0, 0
            if row + h > geometry.rows or col + w > geometry.cols:
                need = cls.geometry_for(shapes, row0, col0, layer_copies)
                desc = ", ".join(f"{nm} {a + 1}x{2 * k * b}" for nm, k, (a, b) in zip(names, layer_copies, shapes,
                                                                                         strict=True))
                raise MappingError(f"layer {names[i]} ({h} rows x {w} columns of devices) does not fit on the "
                                   f"{geometry.rows} x {geometry.cols} array from row {row}, col {col}; the network "
                                   f"({desc}) needs a {need.rows} x {need.cols} array side by side "
                                   f"(from row {row0}, col {col0})")
            pbs = tuple(Block(row, h, col + k * fan_out, fan_out) for k in range(copies))
            mbs = tuple(Block(row, h, col + (copies + k) * fan_out, fan_out) for k in range(copies))
            plus = np.stack([_block_addresses(b, geometry.cols) for b in pbs])
            minus = np.stack([_block_addresses(b, geometry.cols) for b in mbs])
            if copies == 1:
                plus, minus = plus[0], minus[0]
            widx = np.tile(np.arange(h * fan_out, dtype=np.int64), copies)
            for addr, s in ((plus, 1), (minus, -1)):
                layer_of[addr.ravel()] = i
                weight_of[addr.ravel()] = widx
                sign_of[addr.ravel()] = s
            layers.append(LayerMap(i, fan_in, fan_out, float(betas[i]), pbs[0], mbs[0], plus, minus, copies, pbs, mbs))
            col += w
            band = max(band, h)
        return cls(geometry, tuple(layers), layer_of, weight_of, sign_of)

    def table(self) -> np.ndarray:
        """The mapping as an int64 array, one row per weight: layer, row, col, G+ address(es), G- address(es)
        (table_columns() names them; a layer with fewer copies than the most has -1 in the columns it lacks)."""
        rows, n = [], self.copies
        for lm in self.layers:
            r, c = np.indices(lm.shape)
            pad = [np.full(r.size, -1)] * (n - lm.copies)
            rows.append(np.stack([np.full(r.size, lm.index), r.ravel(), c.ravel(), *lm.plus_copies, *pad,
                                  *lm.minus_copies, *pad], 1))
        return np.concatenate(rows).astype(np.int64)

    def table_columns(self) -> str:
        """The names of table()'s columns, comma-separated."""
        if self.copies == 1:
            return "layer, weight_row, weight_col, gplus_address, gminus_address"
        n = range(self.copies)
        return ", ".join(["layer", "weight_row", "weight_col", *(f"gplus{k}_address" for k in n),
                          *(f"gminus{k}_address" for k in n)])
