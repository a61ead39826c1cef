"""Mapping of layers onto the array, and open-loop programming from the model's mean response."""

from __future__ import annotations

import numpy as np
import pytest

from drivers import Geometry
from hil.array import open_loop_counts
from hil.mapping import Mapping, MappingError


def test_layers_get_disjoint_device_pairs_with_a_bias_row() -> None:
    m = Mapping.build([784, 250, 10], [0.1, 0.2], Mapping.required_geometry([784, 250, 10]))
    assert m.geometry == Geometry(785, 520)
    l0, l1 = m.layers
    assert l0.plus.shape == l0.minus.shape == (785, 250) and l1.plus.shape == (251, 10)
    every = np.concatenate([l.plus.ravel() for l in m.layers] + [l.minus.ravel() for l in m.layers])
    assert np.unique(every).size == every.size == m.addresses.size
    a = int(l1.minus[3, 4])
    assert m.layer_of[a] == 1 and m.sign_of[a] == -1 and m.weight_of[a] == 3 * 10 + 4
    t = m.table()
    assert t.shape == (785 * 250 + 251 * 10, 5)


def test_a_chip_too_small_is_refused() -> None:
    with pytest.raises(MappingError, match="needs a 785 x 520 array"):
        Mapping.build([784, 250, 10], [0.1, 0.1], Geometry(512, 784))


def test_offsets_place_the_network_further_in() -> None:
    g = Geometry(100, 100)
    m = Mapping.build([8, 4, 2], [1.0, 1.0], g, row0=10, col0=20)
    assert int(m.layers[0].plus[0, 0]) == 10 * 100 + 20


def test_open_loop_counts_pick_the_nearest_mean_level() -> None:
    mean = np.array([0.1, 2.1, 3.5, 4.5, 5.3])
    got = open_loop_counts(np.array([0.0, 0.9, 1.1, 3.3, 4.0, 9.0]), mean, cap=4)
    np.testing.assert_array_equal(got, [0, 0, 1, 2, 3, 4])
