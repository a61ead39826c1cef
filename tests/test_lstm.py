"""The analog LSTM (hil/analog.py), the character-level language model (hil/charlm.py), text data (hil/data.py)
and tasks (hil/tasks.py): forward and backward equal torch's LSTM on exact weights; a tiny model learns on the
mock chip; kill -9 and resume give the run an uninterrupted one gives, bit for bit, on a noise-free mock."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from analysis import compare_runs, load_run, write_report
from analysis.watch import Watcher
from analysis.watch import rows as watch_rows
from drivers.runlog import RunLogReader
from hil.analog import AnalogLSTM, ConvertError, HostWeights, analog_layers, convert
from hil.config import ConfigError, RunConfig, load_config
from hil.data import DataError, default_corpus, load_dataset, load_text
from hil.networks import build_network
from hil.run import start_run
from hil.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent

TINY = {"seed": 3, "network.kind": "lstm", "data.name": "text", "network.lstm.embedding": 8,
        "network.lstm.hidden": 16, "network.lstm.bptt": 16, "data.train_limit": 400, "data.test_limit": 60,
        "update.batch_size": 8, "update.lr": 0.1, "update.lr_decay": 1.0, "mapping.w_max": [1.0, 1.0]}

# A mock chip without noise or drift (its device-to-device spread stays): what it does depends on the pulses alone,
# so a resumed run must end exactly where an uninterrupted one does.
QUIET = """[pcm]
set_std_slope = 0.0
set_std_offset_us = 0.0
set_std_history_us = 0.0
reset_std_us = 0.0
drift_nu_mean = 0.0
drift_nu_std = 0.0
read_noise_rel = 0.0
read_noise_abs_us = 0.0
"""


def _cell_grads(ref: nn.LSTM, k: int) -> np.ndarray:
    """torch's gradient of layer k in the analog block's layout: [W_ih^T; W_hh^T; b] (b_ih's = b_hh's grad)."""
    return np.concatenate([getattr(ref, f"weight_ih_l{k}").grad.numpy().T, getattr(ref, f"weight_hh_l{k}").grad.numpy().T,
                           getattr(ref, f"bias_ih_l{k}").grad.numpy()[None]])


@pytest.mark.parametrize("layers, batch_first, with_state", [(1, True, False), (2, True, True), (2, False, False)])
def test_analog_lstm_forward_and_backward_equal_torch_s(layers: int, batch_first: bool, with_state: bool) -> None:
    torch.manual_seed(7)
    ref = nn.LSTM(5, 6, layers, batch_first=batch_first).double()
    analog = AnalogLSTM.from_torch(ref)
    for cell in analog.cells:  # an ideal chip: products from the exact weights
        cell.source = HostWeights(cell.initial.copy())
    shape = (3, 9, 5) if batch_first else (9, 3, 5)
    x = torch.randn(*shape, dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    hx = (torch.randn(layers, 3, 6, dtype=torch.float64), torch.randn(layers, 3, 6, dtype=torch.float64))
    y, (h, c) = ref(x, hx if with_state else None)
    ya, (ha, ca) = analog(xa, hx if with_state else None)
    for a, b in ((y, ya), (h, ha), (c, ca)):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-12, atol=1e-13)
    r = torch.randn(*y.shape, dtype=torch.float64)
    ((y * r).sum() + h.sum() + (c ** 2).sum()).backward()
    ((ya * r).sum() + ha.sum() + (ca ** 2).sum()).backward()
    np.testing.assert_allclose(xa.grad.numpy(), x.grad.numpy(), rtol=1e-10, atol=1e-13)
    for k, cell in enumerate(analog.cells):
        a, d = cell.take_factors()
        assert a.shape == (9 * 3, (5 if k == 0 else 6) + 6 + 1) and d.shape == (9 * 3, 4 * 6)  # every time step
        np.testing.assert_array_equal(a[:, -1], 1.0)  # the bias input
        np.testing.assert_allclose(a.T @ d, _cell_grads(ref, k), rtol=1e-10, atol=1e-12)


def test_convert_places_an_lstm_only_when_asked() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 3, 2))
    with pytest.raises(ConvertError, match="layer '1' \\(LSTM"):
        convert(model)
    names = [(n, m.shape) for n, m in analog_layers(convert(model, lstm=True))]
    assert names == [("0", (5, 4)), ("1.cells.0", (8, 12)), ("1.cells.1", (7, 12))]
    with pytest.raises(ConvertError, match="bidirectional=True"):
        convert(nn.Sequential(nn.LSTM(4, 3, bidirectional=True)), lstm=True)
    # the language model: its embedding always digital, network.digital may keep more off the chip
    data = load_dataset("text", train_limit=10, test_limit=5, bptt=8)
    for digital, analog in (([], ["lstm.cells.0", "lstm.cells.1", "readout"]), (["readout"], ["lstm.cells.0",
                                                                                               "lstm.cells.1"])):
        cfg = RunConfig().with_overrides(**{"network.kind": "lstm", "data.name": "text", "network.lstm.layers": 2,
                                            "network.digital": digital})
        net = build_network(cfg, data)
        assert net.names == analog and sorted(net.digital)[0] == "embed.weight"
        assert net.shapes[0] == (16 + 64, 256) and net.shapes[1] == (64 + 64, 256)


def test_lstm_config_and_the_digests_of_other_configs() -> None:
    cfg = RunConfig().with_overrides(**{"network.kind": "lstm", "data.name": "text", "network.lstm.layers": 2})
    assert cfg.network.lstm_options.layers == 2 and cfg.network.lstm_options.bptt == 32
    for bad, match in (({"network.kind": "lstm"}, "trains on data.name = \"text\""),
                       ({"data.name": "text"}, "trains on data.name = \"text\""),
                       ({"network.lstm.hidden": 8}, "[network.lstm] configures"),
                       ({"network.kind": "lstm", "data.name": "text", "network.lstm.layers": 3}, "network.lstm.layers")):
        with pytest.raises(ConfigError) as e:
            RunConfig().with_overrides(**bad)
        assert match in str(e.value)
    # the digests existing runs resume by (measured on the code before tasks and the LSTM existed)
    assert RunConfig().digest() == "263c4c43c928f13b2c7efc6cbcf91a9462fbfe31784fecf6225bea119af1062c"
    assert load_config(ROOT / "examples" / "cnn.toml").digest() == \
        "fdb6309a68c8391826f3954704b5859c601d7031206307b78173ce420b034500"


def test_text_data_windows_split_and_refusals(tmp_path: Path) -> None:
    text = default_corpus()
    assert len(text) == 465_048 or len(text) > 100_000  # the figure is Python 3.11's
    d = load_dataset("text", bptt=32)
    n_valid = int(len(text) * 0.1)
    assert d.x_train.shape == ((len(text) - n_valid - 1) // 32, 32) and d.x_test.shape == ((n_valid - 1) // 32, 32)
    assert d.n_classes == len(set(text)) == len(d.alphabet)
    # a window's targets are its inputs shifted by one character, and windows follow each other
    assert "".join(d.alphabet[i] for i in d.x_train[1]) == text[32:64]
    assert "".join(d.alphabet[i] for i in d.y_train[1]) == text[33:65]
    f = tmp_path / "t.txt"
    f.write_text("abcdé" * 100, encoding="utf-8")
    small = load_text(f, bptt=8)
    assert small.alphabet == "abcdé" and small.x_test.shape == (6, 8) and small.x_train.shape[0] == 56
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    for path, bptt, match in ((tmp_path / "none.txt", 8, "text corpus not found at"),
                              (tmp_path, 8, "is a folder"),
                              (tmp_path / "latin1.txt", 8, "is not UTF-8 text (byte 3"),
                              (f, 60, "has 500 characters; with network.lstm.bptt = 60 it needs at least 610")):
        with pytest.raises(DataError) as e:
            load_text(path, bptt)
        assert match in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_bad_text_in_one_line_and_leaves_no_folder(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8" * 100)
    exe = Path(sys.executable).with_name("pcm-hil")
    r = subprocess.run([str(exe), "train", "--out", str(tmp_path / "run"), "--set", "network.kind=lstm", "--set",
                        "data.name=text", "--set", f"data.path={tmp_path / 'bad.txt'}"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, COLUMNS="300"))
    assert r.returncode != 0
    out = (r.stdout + r.stderr).strip()
    assert "is not UTF-8 text (byte 0" in out and "Traceback" not in out, out
    assert not (tmp_path / "run").exists()


def test_tiny_lstm_learns_on_the_mock_chip(tmp_path: Path) -> None:
    """150 steps on the (noisy) mock chip: bits per character fall far below the start (log2(103) = 6.7)."""
    cfg = RunConfig().with_overrides(**TINY, **{"update.epochs": 3})
    start = Trainer(cfg, load_dataset("text", train_limit=400, test_limit=60, bptt=16)).evaluate()
    assert abs(start - math.log2(103)) < 0.3, start
    s = start_run(cfg, tmp_path / "run", baseline=True)
    assert s["metric"]["name"] == "bits_per_char" and s["metric"]["higher_is_better"] is False
    assert s["bits_per_char"] == s["metric"]["value"] < start - 1.5, (start, s["bits_per_char"])
    assert s["baseline_bits_per_char"] == s["metric"]["baseline"] < start - 1.5
    assert "test_accuracy" not in s and s["set_pulses"] > 0
    with RunLogReader(tmp_path / "run" / "run.h5") as r:
        m = r.metrics()
        assert json.loads(r.attrs["network_layers_json"])[0]["name"] == "lstm.cells.0"
    rows = ~np.isnan(m["epoch"])
    assert list(m["epoch"][rows]) == [1.0, 2.0, 3.0]
    assert m["bits_per_char"][rows][-1] == s["bits_per_char"] and (m["train_bits_per_char"][rows] < start).all()
    base = ~np.isnan(m["baseline_epoch"])
    assert m["baseline_bits_per_char"][base][-1] == s["baseline_bits_per_char"]
    # pcm-hil report / compare / watch show the task's metric
    run = load_run(tmp_path / "run")
    assert run.metric["name"] == "bits_per_char" and not run.metric["higher_is_better"]
    assert run.final_metric == s["bits_per_char"] and run.baseline_metric == s["baseline_bits_per_char"]
    rep = write_report(tmp_path / "run", tmp_path / "report")
    assert "metric.png" in [f.file for f in rep.figures]
    assert ("bits per character (chip, last epoch)", f"{s['bits_per_char']:.4f}") in rep.summary
    assert compare_runs([tmp_path / "run", tmp_path / "run"]).columns[2] == "bits/char"
    w = Watcher(tmp_path / "run")
    try:
        lines = dict(watch_rows(w.tick()))
    finally:
        w.close()
    assert lines["epoch 3"].startswith(f"bits/char {s['bits_per_char']:.4f}, train ")
    assert "running bits per character" in lines


def _train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hil.cli", "train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, COLUMNS="120"))


def _checkpoint(run: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(run / "checkpoint.npz") as z:
        return json.loads(bytes(z["meta"]).decode()), {k: z[k] for k in z.files if k != "meta"}


@pytest.mark.slow
def test_kill9_and_resume_end_where_an_uninterrupted_run_ends(tmp_path: Path) -> None:
    """On a noise-free mock chip a run killed twice (-9, at random moments) and resumed has the uninterrupted run's
    metrics, chi, net pulses, conductances and embedding bit for bit, and its accounting holds (audit)."""
    (tmp_path / "quiet.toml").write_text(QUIET)
    cfg = RunConfig().with_overrides(**TINY, **{"update.epochs": 2, "checkpoint.every_steps": 15,
                                                "checkpoint.audit": True, "refresh.check_every_steps": 10,
                                                "read_policy.every_steps": 35, "logging.flush_interval_s": 0.3,
                                                "driver.params_file": str(tmp_path / "quiet.toml")})
    (tmp_path / "run.toml").write_text(cfg.to_toml())
    whole = start_run(cfg, tmp_path / "whole")
    run = tmp_path / "killed"
    rng = np.random.default_rng(4)
    proc, killed = _train(["--config", str(tmp_path / "run.toml"), "--out", str(run)]), 0
    try:
        while True:
            deadline = time.monotonic() + 120
            while not (run / "checkpoint.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(float(rng.uniform(0.02, 0.4)))
            if killed < 2 and proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                killed += 1
            else:
                out, err = proc.communicate(timeout=300)
                assert proc.returncode == 0, (out + err)[-3000:]
            summary = run / "summary.json"
            if summary.exists() and json.loads(summary.read_text())["finished"]:
                break  # (a kill may come after the end)
            proc = _train(["--resume", str(run)])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed >= 1
    resumed = json.loads((run / "summary.json").read_text())
    for k in ("bits_per_char", "metric", "steps", "samples_trained", "programs_applied", "set_pulses", "reset_pulses",
              "refreshes"):
        assert resumed[k] == whole[k], k
    (m1, a1), (m2, a2) = _checkpoint(tmp_path / "whole"), _checkpoint(run)
    assert m1["metrics"] == m2["metrics"] and m1["position"]["step"] == 100
    for k in ("g", "chi0", "chi1", "net0", "net1", "digital.embed.weight"):
        assert np.array_equal(a1[k], a2[k]), k
    eps = m2["eps"]
    for i in range(2):
        np.testing.assert_allclose(a2[f"chi{i}"] + eps[i] * a2[f"net{i}"], a2[f"total{i}"], rtol=0, atol=1e-9)


def test_an_lstm_run_replays_as_logged(tmp_path: Path) -> None:
    """pcm-hil replay trains the LSTM again against its log: every program, each epoch's bits per character."""
    from hil.replay import replay_run

    cfg = RunConfig().with_overrides(**{**TINY, "data.train_limit": 160, "data.test_limit": 20})
    s = start_run(cfg, tmp_path / "run")
    r = replay_run(tmp_path / "run", tmp_path / "again")
    assert r.programs == s["programs_applied"] > 0 and r.steps == 20
    (logged, got), = r.epoch_rows
    assert got["bits_per_char"] == logged["bits_per_char"] == s["bits_per_char"]
