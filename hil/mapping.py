"""Where each layer's weights sit on the array: one device pair (G+, G-) per weight, W = beta * (G+ - G-).

A layer with fan_in inputs and fan_out outputs takes (fan_in + 1) rows (the last is the bias row,
driven by an always-on input) and 2 * fan_out columns: G+ in the left block, G- in the right one.
Layers sit side by side from (row0, col0). Addresses are flat: row * cols + col.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from drivers import Block, Geometry


class MappingError(ValueError):
    """The network does not fit the array, or a saved mapping disagrees with this one."""


@dataclass(frozen=True)
class LayerMap:
    """One layer's place on the array and its scale; plus[r, c] / minus[r, c] are flat device addresses."""

    index: int
    fan_in: int
    fan_out: int
    beta: float
    plus_block: Block
    minus_block: Block
    plus: np.ndarray
    minus: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(fan_in + 1, fan_out): the weight matrix with its bias row."""
        return (self.fan_in + 1, self.fan_out)


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

    @staticmethod
    def required_geometry(sizes: list[int], row0: int = 0, col0: int = 0) -> Geometry:
        """Smallest array that holds a network with these layer sizes (inputs, hidden..., outputs)."""
        rows = row0 + max(n + 1 for n in sizes[:-1])
        cols = col0 + sum(2 * n for n in sizes[1:])
        return Geometry(rows, cols)

    @classmethod
    def build(cls, sizes: list[int], betas: list[float], geometry: Geometry, row0: int = 0, col0: int = 0) -> Mapping:
        """Place layers sizes[i] -> sizes[i+1] side by side; MappingError if the array is too small."""
        need = cls.required_geometry(sizes, row0, col0)
        if need.rows > geometry.rows or need.cols > geometry.cols:
            raise MappingError(f"the network {'-'.join(map(str, sizes))} needs a {need.rows} x {need.cols} array "
                               f"(from row {row0}, col {col0}); the chip is {geometry.rows} x {geometry.cols}")
        n = geometry.n_devices
        layer_of = np.full(n, -1, np.int16)
        weight_of = np.zeros(n, np.int64)
        sign_of = np.zeros(n, np.int8)
        layers = []
        col = col0
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            pb = Block(row0, fan_in + 1, col, fan_out)
            mb = Block(row0, fan_in + 1, col + fan_out, fan_out)
            plus, minus = _block_addresses(pb, geometry.cols), _block_addresses(mb, geometry.cols)
            widx = np.arange(plus.size, dtype=np.int64)
            for addr, s in ((plus, 1), (minus, -1)):
                layer_of[addr.ravel()] = i
                weight_of[addr.ravel()] = widx
                sign_of[addr.ravel()] = s
            layers.append(LayerMap(i, fan_in, fan_out, float(betas[i]), pb, mb, plus, minus))
            col += 2 * fan_out
        return cls(geometry, tuple(layers), layer_of, weight_of, sign_of)

    def table(self) -> np.ndarray:
        """The mapping as an int64 array, one row per device pair: layer, row, col, G+ address, G- address."""
        rows = []
        for lm in self.layers:
            r, c = np.indices(lm.shape)
            rows.append(np.stack([np.full(r.size, lm.index), r.ravel(), c.ravel(), lm.plus.ravel(), lm.minus.ravel()], 1))
        return np.concatenate(rows).astype(np.int64)
