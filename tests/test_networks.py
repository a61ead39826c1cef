"""Any network on the array: conversion, the CNN on digits, a user's module with a digital layer, the
recompute journal (exact roll-forward, small records), and the log of a CNN run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from drivers.runlog import RunLogReader
from hil.analog import AnalogConv2d, AnalogLinear, ConvertError, analog_layers, convert
from hil.config import ConfigError, RunConfig
from hil.data import load_digits
from hil.journal import read_journal
from hil.run import build_session, chip_model, layer_shapes, make_driver, start_run
from hil.resume import load_checkpoint, restore, roll_forward

CNN = {"data.name": "digits", "network.kind": "cnn", "network.cnn.channels": [8], "network.cnn.kernel": 3,
       "network.cnn.padding": 1, "network.cnn.fc": [], "update.lr": 0.03, "mapping.w_max": [1.0]}
USER = {"data.name": "digits", "network.kind": "module", "network.module": "netmodels:conv_with_digital_head",
        "network.digital": ["8"], "update.lr": 0.03, "mapping.w_max": [1.0]}


def test_convert_replaces_linear_and_conv_and_keeps_digital_ones() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.Linear(8, 3))
    analog = convert(model, digital=["4"])
    kinds = [type(m) for m in analog]
    assert kinds[0] is AnalogConv2d and kinds[3] is AnalogLinear and kinds[4] is nn.Linear
    assert [n for n, _ in analog_layers(analog)] == ["0", "3"]
    assert type(model[0]) is nn.Conv2d  # the original is left alone
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_allclose(analog(x).numpy(), model.double()(x).numpy(), rtol=1e-12, atol=1e-12)


def test_conv_factors_give_torch_s_weight_gradient() -> None:
    torch.manual_seed(1)
    ref = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5)).double()
    analog = convert(ref)
    x, y = torch.rand(4, 2, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(ref(x), y).backward()
    nn.functional.cross_entropy(analog(x), y).backward()
    for (_, layer), r in zip(analog_layers(analog), (ref[0], ref[3]), strict=True):
        a, d = layer.take_factors()
        want = np.concatenate([r.weight.grad.reshape(r.weight.shape[0], -1).numpy().T, r.bias.grad.numpy()[None]])
        np.testing.assert_allclose(a.T @ d, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("model, digital, match", [
    (nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)), [], "layer '1' (LSTM"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), [], "groups=2"),
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), [], "keep it digital with network.digital = [\"1\"]"),
    (nn.Sequential(nn.Linear(4, 4)), ["head"], "'head' are not modules of the model"),
    (nn.Sequential(nn.Linear(4, 4)), ["0"], "no nn.Linear or nn.Conv2d layer left"),
])
def test_convert_refuses_what_it_cannot_place(model: nn.Module, digital: list[str], match: str) -> None:
    with pytest.raises(ConvertError, match=None) as e:
        convert(model, digital)
    assert match in str(e.value)


def test_a_layer_kept_digital_converts_and_its_neighbours_stay() -> None:
    convert(nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4)), digital=["1"])


@pytest.mark.parametrize("extra, match", [
    ({"network.kind": "module", "network.module": "netmodels:with_lstm"}, "layer '1' (LSTM"),
    ({"network.kind": "module", "network.module": "netmodels:not_a_module"}, "returned int, not a torch.nn.Module"),
    ({"network.kind": "module", "network.module": "no_such_pkg.mod:build"}, "cannot be imported"),
    ({"network.kind": "cnn", "network.cnn.channels": [4, 4, 4], "network.cnn.kernel": 3}, "is used up"),
])
def test_bad_networks_are_config_errors(extra: dict, match: str, tmp_path: Path) -> None:
    cfg = RunConfig().with_overrides(**{"data.name": "digits", **extra})
    with pytest.raises(ConfigError) as e:
        start_run(cfg, tmp_path / "run")
    assert match in str(e.value)
    assert not (tmp_path / "run").exists()


def test_network_options_belong_to_their_kind() -> None:
    with pytest.raises(ConfigError, match="network.module names the model"):
        RunConfig().with_overrides(**{"network.module": "a.b:c"})
    with pytest.raises(ConfigError, match="network.digital"):
        RunConfig().with_overrides(**{"network.digital": ["0"]})


def test_tiny_cnn_trains_on_digits_and_beats_chance_clearly(tmp_path: Path) -> None:
    s = start_run(RunConfig().with_overrides(**CNN, **{"update.epochs": 2}), tmp_path / "run", baseline=True)
    assert s["test_accuracy"] > 0.8 and s["baseline_test_accuracy"] > 0.9, s
    with RunLogReader(tmp_path / "run" / "run.h5") as r:
        layers = json.loads(r.attrs["network_layers_json"])
        assert r.attrs["network_kind"] == "cnn"
        assert [(x["fan_in"], x["fan_out"]) for x in layers] == [(9, 8), (128, 10)]
        reads = r.reads()
        programs = [p for _, _, p in r.programs()]
    # the log is complete: every device read that the chip served is in the file, every program applied too
    assert len(reads["address"]) == s["reads_logged"] == s["devices_read"] > 0
    assert len(programs) == s["programs_applied"]


def _session(cfg: RunConfig, run_dir: Path):
    data = load_digits(cfg.seed)
    model = chip_model(cfg)
    return build_session(cfg, data, run_dir, make_driver(cfg, layer_shapes(cfg, data), model),
                         append_log=False, model=model)


@pytest.mark.parametrize("extra", [CNN, USER], ids=["cnn", "module-with-digital-layer"])
def test_roll_forward_recomputes_the_live_chi_exactly(extra: dict, tmp_path: Path) -> None:
    """The recompute journal (samples + conductances read since the last record) rolls chi, the net pulses and
    the digital parameters forward bit for bit, across refreshes and a periodic full read inside the window."""
    cfg = RunConfig().with_overrides(**extra, **{"logging.enabled": False, "checkpoint.every_steps": 10_000,
                                                 "seed": 4, "read_policy.every_steps": 150,
                                                 "refresh.check_every_steps": 10, "refresh.threshold_us": 5.0})
    live = _session(cfg, tmp_path)
    try:
        t = live.trainer
        assert t.journal_mode == "recompute"
        t.start_journal()
        t.array.initialize(t.w0)
        t.checkpoint()
        t.run(stop_after_steps=300)
        state = [c.copy() for c in t.array.chi] + [n.copy() for n in t.array.net_pulses]
        digital = {k: p.detach().numpy().copy() for k, p in t.net.digital.items()}
        assert t.array.counters.refreshes > 0
        t.journal.close()
        meta, arrays = load_checkpoint(tmp_path)
        records = read_journal(tmp_path / meta["journal"])
    finally:
        live.close()
    assert bool(digital) == (extra is USER)
    assert all("a0" not in arr and "idx" in arr for m, arr in records if m["kind"] == "update")
    again = _session(cfg, tmp_path)
    try:
        restore(again.trainer, meta, arrays)
        rf = roll_forward(again.trainer, tmp_path / meta["journal"], reapply=True)
        assert rf.records == len(records)
        aw = again.trainer.array
        for x, y in zip(state, [*aw.chi, *aw.net_pulses], strict=True):
            assert np.array_equal(x, y)
        for k, p in again.trainer.net.digital.items():
            assert np.array_equal(digital[k], p.detach().numpy())
    finally:
        again.close()


def test_cnn_journal_stays_small(tmp_path: Path) -> None:
    """A conv layer's factors would be 10 x 64 + 64 x 8 floats per step; the journal keeps about a hundred bytes
    per pulsed device instead: on average well under 1 KB per step here."""
    cfg = RunConfig().with_overrides(**CNN, **{"checkpoint.every_steps": 100_000, "logging.enabled": False})
    live = _session(cfg, tmp_path)
    try:
        t = live.trainer
        t.start_journal()
        t.array.initialize(t.w0)
        t.checkpoint()
        t.run(stop_after_steps=500)
        t.journal.close()
        meta, _ = load_checkpoint(tmp_path)
        size = (tmp_path / meta["journal"]).stat().st_size
        pulsed = t.array.counters.set_pulses
    finally:
        live.close()
    assert pulsed > 0
    assert size / 500 < 1024, size / 500


def test_cli_trains_a_users_module_from_the_current_folder(tmp_path: Path) -> None:
    """`pcm-hil train --config` with network.module naming a file in the current folder (not on sys.path)."""
    import subprocess
    import sys

    (tmp_path / "mynets.py").write_text((Path(__file__).parent / "netmodels.py").read_text())
    (tmp_path / "run.toml").write_text('seed = 2\n[network]\nkind = "module"\nmodule = "mynets:conv_with_digital_head"\n'
                                       'digital = ["8"]\n[data]\nname = "digits"\ntrain_limit = 200\n'
                                       '[update]\nlr = 0.03\n[mapping]\nw_max = [1.0]\n')
    exe = Path(sys.executable).with_name("pcm-hil")
    r = subprocess.run([str(exe), "train", "--config", "run.toml", "--out", "run"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["finished"] and s["samples_trained"] == 200
    with RunLogReader(tmp_path / "run" / "run.h5") as log:
        assert log.attrs["network_kind"] == "module"
        assert [x["name"] for x in json.loads(log.attrs["network_layers_json"])] == ["1", "6"]


def test_baseline_per_epoch_metrics_are_logged(tmp_path: Path) -> None:
    cfg = RunConfig().with_overrides(**{"data.name": "digits", "network.hidden": [8], "update.epochs": 2,
                                        "data.train_limit": 150})
    s = start_run(cfg, tmp_path / "run", baseline=True)
    with RunLogReader(tmp_path / "run" / "run.h5") as r:
        m = r.metrics()
    rows = ~np.isnan(m["baseline_epoch"])
    assert list(m["baseline_epoch"][rows]) == [1.0, 2.0]
    assert m["baseline_test_accuracy"][rows][-1] == s["baseline_test_accuracy"]
    assert list(m["epoch"][~np.isnan(m["epoch"])]) == [1.0, 2.0]  # the chip's epochs stay the chip's
    with RunLogReader(tmp_path / "run" / "run.h5") as r:
        for i in range(2):
            w = r.array(f"baseline/layer{i}_weights")
            assert w.shape == r.array(f"mapping/layer{i}_gplus").shape and np.abs(w).max() > 0


def test_cnn_trains_on_a_local_cifar10_copy(tmp_path: Path) -> None:
    """data.name = "cifar10" at data.path: the CNN takes its 3 x 32 x 32 images (a fake copy the test writes)."""
    from test_data_images import write_folder

    folder, _ = write_folder(tmp_path / "cifar")
    cfg = RunConfig().with_overrides(**{"data.name": "cifar10", "data.path": str(folder), "network.kind": "cnn",
                                        "network.cnn.channels": [4], "network.cnn.fc": [], "data.train_limit": 12,
                                        "mapping.w_max": [1.0]})
    s = start_run(cfg, tmp_path / "run")
    assert s["finished"] and s["samples_trained"] == 12
    with RunLogReader(tmp_path / "run" / "run.h5") as r:
        assert [x["fan_in"] for x in json.loads(r.attrs["network_layers_json"])] == [3 * 5 * 5, 4 * 14 * 14]
