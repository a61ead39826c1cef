"""Issue 9, part 1: train on the chip you have. The measured response, the mismatch warning, eps = "auto"
(probe + read-backs) against chips that are not the model, the refusal of an uncalibrated tester, and a
crash/resume with eps = "auto" that stays exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from drivers.runlog import RunLogReader
from hil.cli_emulator import EmulatorProcess
from hil.config import ConfigError, RunConfig
from hil.run import resume_run, start_run

#: A linear noise-free chip: 0.5 uS per SET pulse whatever G and the pulse count, no noise, drift or spread.
LINEAR = """[pcm]
set_mean_slope = 0.0
set_mean_offset_us = 0.5
set_mean_history_us = 0.0
set_std_slope = 0.0
set_std_offset_us = 0.0
set_std_history_us = 0.0
reset_std_us = 0.0
drift_nu_mean = 0.0
drift_nu_std = 0.0
read_noise_rel = 0.0
read_noise_abs_us = 0.0
d2d_update_spread = 0.0
"""
#: Half the default model's mean SET increment everywhere (its three mean terms halved; spread unchanged).
HALF = """[pcm]
set_mean_slope = -0.042
set_mean_offset_us = 0.44
set_mean_history_us = 0.70
"""
#: Digits, the default MLP (64-250-10): the array it needs, and the run compared on every chip.
EMU = ["--rows", "251", "--cols", "520", "--seed", "0"]
DIGITS = {"data.name": "digits", "update.epochs": 2, "driver.kind": "visa"}


def _cfg(resource: str, **extra: object) -> RunConfig:
    return RunConfig().with_overrides(**{**DIGITS, "driver.resource": resource, **extra})


def _emulator(tmp_path: Path, params: str | None) -> EmulatorProcess:
    args = list(EMU)
    if params is not None:
        f = tmp_path / "chip.toml"
        f.write_text(params)
        args += ["--params", str(f)]
    return EmulatorProcess(args)


def _train(tmp_path: Path, name: str, cfg: RunConfig, **kw: object) -> tuple[dict, list[str]]:
    said: list[str] = []
    s = start_run(cfg, tmp_path / name, notify=said.append, **kw)
    return s, [m for m in said if "pulse response differs" in m]


@pytest.fixture(scope="module")
def reference_accuracy(tmp_path_factory: pytest.TempPathFactory) -> float:
    """The same run on a chip that matches the host's model (default eps, the model's table)."""
    tmp = tmp_path_factory.mktemp("reference")
    with _emulator(tmp, None) as emu:
        s, warned = _train(tmp, "run", _cfg(emu.resource, **{"driver.uncalibrated_ok": True}))
    assert not warned
    assert all(abs(layer["ratio"] - 1) < 0.1 for layer in s["response"]["layers"]), s["response"]["layers"]
    return s["test_accuracy"]


def test_linear_chip_with_eps_auto_trains_like_the_model_chip(tmp_path: Path, reference_accuracy: float) -> None:
    with _emulator(tmp_path, LINEAR) as emu:
        plain, warned = _train(tmp_path, "plain", _cfg(emu.resource, **{"driver.uncalibrated_ok": True}),
                               stop_after_steps=400)
        assert len(warned) == 1, warned
        assert "layer 1: 0.5 uS per SET pulse measured" in warned[0] and "update.eps = \"auto\"" in warned[0]
        auto, warned_auto = _train(tmp_path, "auto", _cfg(emu.resource, **{"update.eps": "auto"}))
    assert not warned_auto
    r = auto["response"]
    assert r["eps_auto"] and r["probe"]["probe_devices"] == 256
    assert r["from_reset"]["measured_us"][:3] == pytest.approx([0.1, 0.6, 1.1], abs=1e-4)
    assert auto["test_accuracy"] >= reference_accuracy - 0.02, (auto["test_accuracy"], reference_accuracy)
    with RunLogReader(tmp_path / "plain" / "run.h5") as log:
        m = log.metrics()
    assert np.nansum(m["response_mismatch"]) == 1.0
    with RunLogReader(tmp_path / "auto" / "run.h5") as log:
        reasons = set(log.reads()["reason"])
        m = log.metrics()
        probe = json.loads(log.attrs["response_probe_json"])
    assert "probe" in reasons and probe["probe_pulses"] == 20
    assert np.isfinite(m["response_l0_mean_us"]).sum() == 2 and np.isfinite(m["eps_l1"]).any()


def test_half_response_chip_warns_and_eps_auto_recovers(tmp_path: Path, reference_accuracy: float) -> None:
    with _emulator(tmp_path, HALF) as emu:
        plain, warned = _train(tmp_path, "plain", _cfg(emu.resource, **{"driver.uncalibrated_ok": True}))
        auto, warned_auto = _train(tmp_path, "auto", _cfg(emu.resource, **{"update.eps": "auto"}))
    assert len(warned) == 1 and "0.6" in warned[0], warned
    assert plain["response"]["mismatch_warned"] and not warned_auto
    assert [layer["ratio"] for layer in plain["response"]["layers"]] == pytest.approx([0.6, 0.6], abs=0.05)
    # eps followed the chip: per layer about the model's eps times the measured ratio
    for p, a in zip(plain["response"]["layers"], auto["response"]["layers"], strict=True):
        assert a["eps"] == pytest.approx(p["eps"] * a["ratio"], rel=0.06)
    assert auto["test_accuracy"] > plain["test_accuracy"]
    # One seed: 91.8% against 95.1%. A single digits run's accuracy moves by about 2 points from seed to seed
    # (the paired difference of two chips by about 1.5), so this bounds only gross failures; the 2-point goal is
    # test_half_response_chip_with_eps_auto_is_within_2_points_over_seeds.
    assert auto["test_accuracy"] >= reference_accuracy - 0.035, (auto["test_accuracy"], reference_accuracy)


#: Seeds of the paired comparison (run seed and chip seed alike), fixed in advance: not chosen by their results.
PAIRED_SEEDS = range(10)


def _mock_with_chip(monkeypatch: pytest.MonkeyPatch, chip: dict[str, float]) -> None:
    """driver.kind = "mock" with a chip whose parameters differ from the host's model by chip (the host keeps
    the default model, as on a tester; the emulator runs the same MockDriver behind the wire)."""
    import hil.run
    from hil.chip import ChipModel
    from hil.chip import make_driver as make
    from sim import PCMParams

    def make_driver(cfg, shapes, model):  # noqa: ANN001, ANN202 - hil.chip.make_driver's signature
        params = PCMParams(**{**model.params.model_dump(), **chip})
        return make(cfg, shapes, ChipModel(params, model.granularity_us, model.calibrated_eps_us,
                                           model.mean_response_us))

    monkeypatch.setattr(hil.run, "make_driver", make_driver)


@pytest.mark.slow
def test_half_response_chip_with_eps_auto_is_within_2_points_over_seeds(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's goal, averaged over PAIRED_SEEDS: eps = "auto" on the half-response chip against the default
    eps on a chip that matches the model, same run seed and chip seed. In process (the emulator only adds the
    wire, which the test above covers). Measured: 93.0% against 92.8% (seeds 0-9; per seed the two differ by
    -4.9..+6.5 points, so a mean over few seeds is noise); with the chip seed held at 0, 93.2% against 94.0%.
    Halving the chip's spread, scaling the auto eps 0.7-1.5x and probe early-pulse counts of 1-10 all stayed
    within that noise (92.0-93.6%), and no update reached the per-step pulse cap."""
    import tomllib

    chip = tomllib.loads(HALF)["pcm"]

    def accuracy(name: str, seed: int, **extra: object) -> float:
        cfg = RunConfig().with_overrides(**{"data.name": "digits", "update.epochs": 2, "seed": seed,
                                            "driver.seed": seed, **extra})
        return start_run(cfg, tmp_path / f"{name}{seed}", notify=lambda _m: None)["test_accuracy"]

    model = [accuracy("model", s) for s in PAIRED_SEEDS]
    _mock_with_chip(monkeypatch, chip)
    auto = [accuracy("auto", s, **{"update.eps": "auto"}) for s in PAIRED_SEEDS]
    gap = float(np.mean(model) - np.mean(auto))
    assert gap <= 0.02, (model, auto)


def test_an_uncalibrated_tester_is_refused_before_anything(tmp_path: Path) -> None:
    cfg = _cfg("TCPIP::127.0.0.1::9::SOCKET", **{"network.hidden": [8]})  # nothing listens: nothing is touched
    with pytest.raises(ConfigError, match="not calibrated.*pcm-hil characterize.*update.eps = \"auto\".*--uncalibrated"):
        start_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()

    from typer.testing import CliRunner

    from hil.cli import app

    r = CliRunner().invoke(app, ["train", "--data", "digits", "--driver", "TCPIP::127.0.0.1::9::SOCKET",
                                 "--out", str(tmp_path / "cli")])
    assert r.exit_code == 2 and "not calibrated" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "cli").exists()


class Crash(Exception):
    pass


def test_crash_and_resume_with_eps_auto_is_exact(tmp_path: Path) -> None:
    """eps moves only at checkpoints, so the journal's roll-forward needs no read: the state it rebuilds equals
    the crashed trainer's, bit for bit, and the audit ledger holds through every eps change."""
    from drivers.tester import TesterDriver
    from hil.data import load_digits
    from hil.journal import read_journal
    from hil.run import build_session, chip_model
    from hil.resume import load_checkpoint, restore, roll_forward

    run = tmp_path / "run"
    seen = {}

    def crash(trainer) -> None:
        if trainer.at.step == 430:
            aw = trainer.array
            seen.update(chi=[c.copy() for c in aw.chi], eps=list(aw.eps), since=aw.since_reset.copy(),
                        table=aw.mean_response_us.copy())
            raise Crash

    extra = {"network.hidden": [16], "update.eps": "auto", "checkpoint.audit": True, "update.lr": 0.1,
             "update.epochs": 1, "checkpoint.every_steps": 1000}
    with _emulator(tmp_path, HALF) as emu:
        cfg = _cfg(emu.resource, **extra)
        with pytest.raises(Crash):
            start_run(cfg, run, progress=crash, progress_every=1)
        meta, arrays = load_checkpoint(run)
        records = read_journal(run / meta["journal"])
        assert meta["position"]["step"] < 430 and len(records) > 0 and meta["eps"] == seen["eps"]
        with RunLogReader(run / "run.h5") as log:
            followed = log.metrics()["eps_l0"]
        assert np.isfinite(followed).any()  # eps moved (at a checkpoint) before the crash
        data = load_digits(0)
        inner = TesterDriver.open(emu.resource)
        s = build_session(cfg, data, None, inner, append_log=False, model=chip_model(cfg), log=False)
        try:
            restore(s.trainer, meta, arrays)
            roll_forward(s.trainer, records, reapply=False, last_applied=inner.last_program_id())
            aw = s.trainer.array
            assert aw.eps == seen["eps"]
            np.testing.assert_array_equal(aw.since_reset, seen["since"])
            np.testing.assert_array_equal(aw.mean_response_us, seen["table"])
            for a, b in zip(aw.chi, seen["chi"], strict=True):
                np.testing.assert_array_equal(a, b)
        finally:
            s.close()
        summary = resume_run(run, driver=emu.resource)
    assert summary["finished"] and summary["response"]["eps_auto"]
    with np.load(run / "checkpoint.npz") as z:
        final = {k: z[k] for k in z.files}
        meta = json.loads(bytes(z["meta"]).decode())
    for i in range(2):
        total = final[f"chi{i}"] + meta["eps"][i] * final[f"net{i}"] + final[f"epsoff{i}"]
        np.testing.assert_allclose(total, final[f"total{i}"], rtol=0, atol=1e-9)
