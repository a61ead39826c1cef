"""The GAN on the array (hil/gan.py) and its metric (hil/gan_metric.py): the Frechet distance against the closed
form, a tiny GAN that learns on the mock chip, exact recomputation at a resume, kill -9 and resume, a side kept
digital, the classifier cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from drivers.runlog import RunLogReader
from hil import gan_metric as gm
from hil.chip import chip_model, layer_shapes, make_driver
from hil.config import ConfigError, RunConfig, validate_config
from hil.data import load_digits
from hil.journal import read_journal
from hil.resume import load_checkpoint, restore, roll_forward
from hil.run import build_session, start_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One classifier cache for the module's runs (training the digits classifier takes a few seconds)."""
    return str(tmp_path_factory.mktemp("gan-classifier"))


def tiny(cache: str, **over: object) -> RunConfig:
    """A GAN on scikit-learn's 8x8 digits: z 16 -> 64 -> 64 and 64 -> 64 -> 1, batch 32. The discriminator's first
    layer gets a small w_max (a fine eps, and its weights bounded): the setting of examples/gan.toml."""
    data = {"seed": 2, "network": {"kind": "gan", "gan": {"z_dim": 16, "g_hidden": [64], "d_hidden": [64],
                                                          "eval_samples": 400, "classifier_cache": cache}},
            "data": {"name": "digits"}, "update": {"lr": 0.1, "lr_decay": 1.0, "batch_size": 32, "epochs": 8},
            "mapping": {"w_max": [1.0, 1.0, 0.15, 0.6]}}
    return validate_config(data).with_overrides(**over) if over else validate_config(data)


# ---------------------------------------------------------------------------------------------- the metric
def test_frechet_distance_matches_the_closed_form_of_two_gaussians() -> None:
    """Diagonal covariances: FD = |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2)); the same in a rotated basis (full
    matrices that commute, so the closed form still holds), and 0 between equal Gaussians."""
    rng = np.random.default_rng(0)
    k = 12
    mu1, mu2 = rng.normal(size=k), rng.normal(size=k)
    s1, s2 = rng.uniform(0.1, 3.0, k), rng.uniform(0.1, 3.0, k)
    closed = float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))
    assert gm.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(k, k)))
    full1, full2 = q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T
    assert gm.frechet_distance(q @ mu1, full1, q @ mu2, full2) == pytest.approx(closed, rel=1e-8)
    assert gm.frechet_distance(mu1, full1, mu1, full1) == pytest.approx(0.0, abs=1e-8)
    # from samples: the statistics of many draws give the distance of the Gaussians they came from
    a = rng.normal(size=(200_000, 3)) * np.sqrt([1.0, 2.0, 0.5])
    b = rng.normal(size=(200_000, 3)) * np.sqrt([2.0, 0.5, 0.5]) + [1.0, 0.0, 0.0]
    want = 1.0 + (1 + 2 - 2 * np.sqrt(2)) + (2 + 0.5 - 2 * 1.0) + 0.0
    assert gm.frechet_distance(*gm.feature_stats(a), *gm.feature_stats(b)) == pytest.approx(want, abs=0.02)


def test_class_entropy_bits() -> None:
    assert gm.class_entropy_bits(np.arange(1000) % 10, 10) == pytest.approx(np.log2(10))
    assert gm.class_entropy_bits(np.full(50, 3), 10) == 0.0
    assert gm.class_entropy_bits(np.array([0, 1]), 10) == pytest.approx(1.0)


def test_classifier_is_cached_and_a_corrupt_cache_is_retrained(tmp_path: Path) -> None:
    d = load_digits(0)
    first = gm.load_classifier("digits", d.x_train, d.y_train, d.x_test, d.y_test, 10, tmp_path)
    assert first.retrained and first.path.parent == tmp_path and first.test_accuracy > 0.9
    again = gm.load_classifier("digits", d.x_train, d.y_train, d.x_test, d.y_test, 10, tmp_path)
    assert not again.retrained
    np.testing.assert_array_equal(first.features(d.x_test), again.features(d.x_test))
    first.path.write_bytes(first.path.read_bytes()[:200])  # truncated: not trusted, trained again
    third = gm.load_classifier("digits", d.x_train, d.y_train, d.x_test, d.y_test, 10, tmp_path)
    assert third.retrained
    np.testing.assert_array_equal(first.features(d.x_test), third.features(d.x_test))  # the same seeded recipe
    # another training set is another key, so another file
    other = gm.classifier_key("digits", d.x_train[:-1], d.y_train[:-1], 10)[0]
    assert other != gm.classifier_key("digits", d.x_train, d.y_train, 10)[0]


# ---------------------------------------------------------------------------------------------- training
def _epochs(run: Path, key: str) -> list[float]:
    with RunLogReader(run / "run.h5") as r:
        m = r.metrics()
    return [float(v) for v in m[key] if np.isfinite(v)]


def test_tiny_gan_learns_on_the_mock_chip_and_draws_grids(cache: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    s = start_run(tiny(cache), run)
    assert s["finished"] and s["metric"]["name"] == "frechet_distance" and not s["metric"]["higher_is_better"]
    fd = _epochs(run, "frechet_distance")
    assert len(fd) == 8
    from hil.trainer import Trainer
    untrained = Trainer(tiny(cache), load_digits(2))
    start = untrained.task.evaluate(untrained)
    # seeded: from about 1,030 at the initial weights, 365 after the first epoch, to about 200 after the eighth
    assert fd[-1] < 0.35 * start and fd[-1] < 0.7 * fd[0], (start, fd)
    assert s["frechet_distance"] == fd[-1]
    entropy = _epochs(run, "class_entropy_bits")
    # after one epoch every digit is drawn as one class (0 bits); after eight, several classes (about 1.9 bits)
    assert entropy[-1] > 1.5 and entropy[-1] > entropy[0] + 1.0, entropy
    assert s["set_pulses"] > 0 and s["programs_applied"] > 0
    grids = sorted(p.name for p in (run / "gan").iterdir())
    assert grids == [f"epoch_{e:03d}.png" for e in range(1, 9)]
    assert (run / "gan" / "epoch_008.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("side", ["generator", "discriminator"])
def test_a_side_kept_digital_stays_off_the_array(side: str, cache: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny(cache, **{"network.digital": [side], "update.epochs": 1})
    s = start_run(cfg, run)
    other = "discriminator" if side == "generator" else "generator"
    with RunLogReader(run / "run.h5") as r:
        layers = [entry["name"] for entry in json.loads(r.attrs["network_layers_json"])]
        n_mapped = len(r.array("mapping/table"))
    assert layers == [f"{other}.0", f"{other}.2"]
    shapes = {"generator": (17 * 64 + 65 * 64), "discriminator": (65 * 64 + 65 * 1)}
    assert n_mapped == shapes[other]  # one table row per weight (device pair): only the analog side's
    assert s["finished"] and np.isfinite(s["frechet_distance"])
    # the digital side trained (plain SGD beside the array): its parameters moved from their initial values
    from hil.gan import build_network
    from hil.data import load_dataset
    net0 = build_network(cfg, load_dataset("digits", seed=cfg.seed))
    with np.load(run / "checkpoint.npz") as z:
        moved = [not np.array_equal(z[f"digital.{n}"], p.detach().numpy()) for n, p in net0.digital.items()]
    assert net0.digital and all(n.startswith(side + ".") for n in net0.digital) and all(moved)


def test_both_sides_digital_is_refused(cache: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing is left for the array"):
        start_run(tiny(cache, **{"network.digital": ["generator", "discriminator"]}), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"\[network.gan\] configures"):
        validate_config({"network": {"kind": "cnn", "gan": {"z_dim": 4}}})


def _session(cfg: RunConfig, run_dir: Path):
    data = load_digits(cfg.seed)
    model = chip_model(cfg)
    return build_session(cfg, data, run_dir, make_driver(cfg, layer_shapes(cfg, data), model),
                         append_log=False, model=model)


@pytest.mark.parametrize("digital", [[], ["discriminator"]], ids=["both-analog", "digital-discriminator"])
def test_roll_forward_recomputes_the_gan_steps_exactly(digital: list[str], cache: str, tmp_path: Path) -> None:
    """A resume recomputes each journaled step: the same noise (seeded by seed and step), the same factors, so chi,
    the net pulses and the digital parameters come out bit for bit as they were live (refreshes in the window)."""
    cfg = tiny(cache, **{"network.digital": digital, "logging.enabled": False, "checkpoint.every_steps": 10_000,
                         "refresh.check_every_steps": 5})
    live = _session(cfg, tmp_path)
    try:
        t = live.trainer
        assert t.journal_mode == "recompute"
        t.start_journal()
        t.array.initialize(t.w0)
        t.checkpoint()
        t.run(stop_after_steps=40)  # inside the first epoch (42 steps), whose end would checkpoint
        state = [c.copy() for c in t.array.chi] + [n.copy() for n in t.array.net_pulses]
        dig = {k: p.detach().numpy().copy() for k, p in t.net.digital.items()}
        assert t.array.counters.refreshes > 0 and bool(dig) == bool(digital)
        t.journal.close()
        meta, arrays = load_checkpoint(tmp_path)
        records = read_journal(tmp_path / meta["journal"])
    finally:
        live.close()
    assert sum(m["kind"] == "update" for m, _ in records) == 40
    again = _session(cfg, tmp_path)
    try:
        restore(again.trainer, meta, arrays)
        roll_forward(again.trainer, tmp_path / meta["journal"], reapply=True)
        aw = again.trainer.array
        for x, y in zip(state, [*aw.chi, *aw.net_pulses], strict=True):
            assert np.array_equal(x, y)
        for k, p in again.trainer.net.digital.items():
            assert np.array_equal(dig[k], p.detach().numpy())
    finally:
        again.close()


def test_the_discriminator_is_updated_by_its_own_loss_only(cache: str, tmp_path: Path) -> None:
    """The factors a step hands the array: the discriminator's equal the gradient of its own loss (real + fake),
    not that plus the generator loss's backward through it; the generator's that of the non-saturating loss."""
    import torch
    from torch.nn import functional as F

    from hil.trainer import Trainer

    cfg = tiny(cache)
    data = load_digits(cfg.seed)
    t = Trainer(cfg, data)  # float host weights
    task = t.task
    idx = np.arange(32)
    res = task.step(t, idx, 1)
    # the same losses through plain torch layers carrying the same weights
    g = [torch.tensor(w, requires_grad=True) for w in t.weights]
    x = torch.from_numpy(data.x_train[idx])
    z = torch.from_numpy(task.noise(1, 32))
    lin = lambda a, w: a @ w[:-1] + w[-1]  # noqa: E731
    act = lambda a: F.leaky_relu(a, 0.2)  # noqa: E731
    gen = lambda z: torch.sigmoid(lin(act(lin(z, g[0])), g[1]))  # noqa: E731
    dis = lambda v: lin(act(lin(v, g[2])), g[3])  # noqa: E731
    ones = torch.ones(32, 1, dtype=torch.float64)
    fake = gen(z)
    loss_d = F.binary_cross_entropy_with_logits(dis(x), ones) + F.binary_cross_entropy_with_logits(
        dis(fake.detach()), 0 * ones)
    grad_d = torch.autograd.grad(loss_d, [g[2], g[3]])
    grad_g = torch.autograd.grad(F.binary_cross_entropy_with_logits(dis(fake), ones), [g[0], g[1]])
    for (a, d), want in zip(res.factors, [*grad_g, *grad_d], strict=True):
        np.testing.assert_allclose(a.T @ d, want.numpy(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- kill -9, resume
def _train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hil.cli", "train", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, COLUMNS="120"))


@pytest.mark.slow
def test_kill9_mid_run_and_resume_keeps_the_accounting(cache: str, tmp_path: Path) -> None:
    """kill -9 of `pcm-hil train` mid-run, then --resume: every sample trained once, chi + eps x net pulses equals
    the float64 sum of every update (audit), the counters agree with the run log; the same steps, samples and
    epochs as an uninterrupted run of the same config, and the metric of every epoch logged."""
    cfg = tiny(cache, **{"update.epochs": 4, "checkpoint.every_steps": 20, "checkpoint.audit": True,
                         "logging.flush_interval_s": 0.3})
    conf = tmp_path / "gan.toml"
    conf.write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    whole, run = tmp_path / "whole", tmp_path / "run"
    ref = start_run(cfg, whole)
    rng = np.random.default_rng(21)
    proc = _train(["--config", str(conf), "--out", str(run)])
    killed = 0
    try:
        while killed < 2:
            deadline = time.monotonic() + 120
            while not (run / "checkpoint.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(float(rng.uniform(0.3, 1.5)))
            if proc.poll() is not None:
                break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed += 1
            proc = _train(["--resume", str(run)])
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed >= 1
    s = json.loads((run / "summary.json").read_text())
    assert s["finished"]
    for k in ("steps", "samples_trained", "epochs"):
        assert s[k] == ref[k], k
    assert len(_epochs(run, "frechet_distance")) == 4 and np.isfinite(s["frechet_distance"])
    with np.load(run / "checkpoint.npz") as z:
        arrays = {k: z[k] for k in z.files}
    with RunLogReader(run / "run.h5") as r:
        eps = json.loads(r.attrs["eps_per_layer_json"])
        progs = [p for _, _, p in r.programs() if p.program_id not in set(s["unapplied_program_ids"])]
        plus = [r.array(f"mapping/layer{i}_gplus") for i in range(4)]
        minus = [r.array(f"mapping/layer{i}_gminus") for i in range(4)]
    ids = [p.program_id for p in progs]
    assert ids == sorted(set(ids))
    n_devices = max(int(p.max()) for p in plus + minus) + 1
    upd = np.zeros(n_devices, np.int64)
    for p in progs:
        if not p.reset.any():
            np.add.at(upd, p.addresses, p.set_counts)
    resets = sum(int(p.reset.sum()) for p in progs)
    assert s["reset_pulses"] == resets
    assert s["set_pulses"] == sum(int(p.set_counts.sum()) for p in progs)
    for i in range(4):
        np.testing.assert_allclose(arrays[f"chi{i}"] + eps[i] * arrays[f"net{i}"], arrays[f"total{i}"], rtol=0,
                                   atol=1e-9)
        np.testing.assert_array_equal(upd[plus[i]] - upd[minus[i]], arrays[f"net{i}"])


# ---------------------------------------------------------------------------------------------- scripts/bench zoo
def test_zoo_table_gaps_goals_and_a_network_not_available(tmp_path: Path) -> None:
    """The study's table: the gap by metric (points of accuracy; percent of bits/char and Frechet distance), goal
    lines, and a network whose config is missing printed as not available (nothing trained, nothing made)."""
    from benchmarks import zoo

    assert zoo.gap_and_goal("test_accuracy", 0.9761, 0.9800) == ("0.39 pt", True)
    assert zoo.gap_and_goal("test_accuracy", 0.9700, 0.9800) == ("1.00 pt", False)
    assert zoo.gap_and_goal("bits_per_char", 2.09, 2.00) == ("+4.5%", True)
    assert zoo.gap_and_goal("bits_per_char", 2.2, 2.00) == ("+10.0%", False)
    assert zoo.gap_and_goal("frechet_distance", 130.0, 100.0) == ("+30.0%", False)

    def missing(full: bool) -> RunConfig:
        raise FileNotFoundError("examples/nothing.toml is not there yet")

    row = zoo.run_entry(zoo.Entry("nothing", "LSTM", missing, zoo._data_label, "-"), False, tmp_path)
    assert row == {"name": "LSTM", "unavailable": "examples/nothing.toml is not there yet"}
    assert list(tmp_path.iterdir()) == []
    ok = {"name": "GAN", "data": "digits", "metric": "frechet_distance", "pcm": 35.2, "float": 30.5, "gap": "+15.4%",
          "met": True, "goal": "Frechet distance within 25% of float", "set": 274_465, "reset": 49_998,
          "refreshes": 15_526, "us": 729.0}
    lines = zoo.table([row, ok])
    assert lines[1].split() == ["LSTM", "not", "available:", "examples/nothing.toml", "is", "not", "there", "yet"]
    assert lines[2].split() == ["GAN", "digits", "Frechet", "dist.", "35.2", "30.5", "+15.4%", "274,465", "49,998",
                                "15,526", "729"]
    assert lines[3] == "  goal GAN Frechet distance within 25% of float: met (+15.4%)"


def test_a_gan_run_replays_with_its_frechet_distance_compared(cache: str, tmp_path: Path) -> None:
    """pcm-hil replay reproduces a GAN run: every program, and each epoch's Frechet distance and class entropy
    (the generator's noise is seeded by step, the metric's noise fixed) as logged."""
    from hil.replay import replay_run

    run = tmp_path / "run"
    start_run(tiny(cache, **{"update.epochs": 1}), run)
    seen: list[tuple[dict, dict]] = []
    replay_run(run, tmp_path / "again", on_epoch=lambda logged, got: seen.append((logged, got)))
    assert len(seen) == 1
    logged, got = seen[0]
    for k in ("frechet_distance", "class_entropy_bits", "train_d_loss"):
        assert k in logged and got[k] == logged[k], k
