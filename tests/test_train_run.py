"""Tiny training runs on digits: the summary, the log's completeness, module path = fast path, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from drivers import MockDriver
from drivers.runlog import RunLogReader
from hil.cli import app
from hil.config import RunConfig
from hil.data import load_digits
from hil.analog import analog_layers, convert
from hil.network import fast_step, init_weights
from hil.networks import mlp_module
from hil.trainer import module_step
from hil.run import RunDirError, resume_run, start_run
from hil.trainer import CheckpointError

TINY = {"data.name": "digits", "network.hidden": [16], "update.epochs": 1, "data.train_limit": 300,
        "refresh.check_every_steps": 20, "refresh.threshold_us": 6.0, "read_policy.every_steps": 100,
        "checkpoint.every_steps": 100, "update.lr": 0.1, "update.lr_decay": 1.0, "mapping.w_max": [1.0, 2.0]}


def tiny(**extra: object) -> RunConfig:
    return RunConfig().with_overrides(**{**TINY, **extra})


def test_fast_path_equals_module_path() -> None:
    data = load_digits(0)
    sizes = [64, 16, 10]
    w = init_weights(sizes, seed=3)
    model = convert(mlp_module(sizes))
    layers = [m for _, m in analog_layers(model)]
    for layer, x in zip(layers, w, strict=True):
        layer.source.w[:] = x  # type: ignore[attr-defined]
    for batch in (1, 5):
        x, y = data.x_train[:batch], data.y_train[:batch]
        a, b = fast_step(w, x, y), module_step(model, layers, x, y)
        np.testing.assert_array_equal(a.predicted, b.predicted)
        for (fa, fd), (ma, md) in zip(a.factors, b.factors, strict=True):
            np.testing.assert_allclose(fa, ma, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(fd, md, rtol=1e-12, atol=1e-15)


def _programs(run: Path) -> list[tuple[int, np.ndarray, np.ndarray]]:
    with RunLogReader(run / "run.h5") as r:
        return [(p.program_id, p.addresses, p.set_counts) for _, _, p in r.programs()]


def test_same_run_on_both_paths_sends_the_same_programs(tmp_path: Path) -> None:
    cfg = tiny(**{"data.train_limit": 150})
    start_run(cfg.with_overrides(**{"update.path": "fast"}), tmp_path / "fast")
    start_run(cfg.with_overrides(**{"update.path": "module"}), tmp_path / "module")
    a, b = _programs(tmp_path / "fast"), _programs(tmp_path / "module")
    assert len(a) == len(b) > 10
    for (ia, aa, ca), (ib, ab, cb) in zip(a, b, strict=True):
        assert ia == ib
        np.testing.assert_array_equal(aa, ab)
        np.testing.assert_array_equal(ca, cb)


def test_tiny_run_summary_and_complete_log(tmp_path: Path) -> None:
    run = tmp_path / "run"
    seen_while_running: list[int] = []

    def peek(trainer) -> None:  # a live reader follows the log while the run writes it
        trainer.logger.flush()
        with RunLogReader(run / "run.h5") as r:
            seen_while_running.append(len(r.reads()["address"]))

    s = start_run(tiny(**{"update.epochs": 2}), run, baseline=True, progress=peek)
    for key in ("test_accuracy", "baseline_test_accuracy", "epochs", "samples_trained", "train_seconds", "us_per_sample",
                "reads_logged", "programs_applied", "set_pulses", "reset_pulses", "refreshes"):
        assert key in s
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["test_accuracy"] == s["test_accuracy"]
    assert s["epochs"] == 2 and s["samples_trained"] == 600
    assert s["test_accuracy"] > 0.5 and s["baseline_test_accuracy"] > 0.5
    assert len(seen_while_running) >= 2 and seen_while_running == sorted(seen_while_running)
    assert seen_while_running[-1] > 0
    with RunLogReader(run / "run.h5") as r:
        reads = r.reads()
        progs = r.programs()
        metrics = r.metrics()
        assert "config_toml" in r.attrs and "git_commit" in r.attrs and "instrument_identity" in r.attrs
        assert r.array("mapping/table").shape[1] == 5
    assert len(reads["address"]) == s["reads_logged"] == s["devices_read"]
    assert len(progs) == s["programs_applied"]
    assert sum(p.set_pulses for _, _, p in progs) == s["set_pulses"]
    assert sum(p.reset_pulses for _, _, p in progs) == s["reset_pulses"]
    assert list(metrics["epoch"][~np.isnan(metrics["epoch"])]) == [1.0, 2.0]
    assert (run / "config.toml").is_file()


def test_analog_mvm_path_trains(tmp_path: Path) -> None:
    s = start_run(tiny(**{"driver.analog_mvm": True, "update.epochs": 2}), tmp_path / "run")
    assert s["test_accuracy"] > 0.4


def test_existing_run_dir_is_refused_and_untouched(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    with pytest.raises(RunDirError, match="already exists"):
        start_run(tiny(), run)
    assert [p.name for p in run.iterdir()] == ["keep.txt"]


def test_resume_refuses_another_config_and_a_corrupt_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    start_run(tiny(), run, stop_after_steps=50)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "run.h5"}
    with pytest.raises(CheckpointError, match="differs"):
        resume_run(run, config=tiny(**{"update.lr": 0.5}))
    ck = run / "checkpoint.npz"
    ck.write_bytes(ck.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        resume_run(run)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "run.h5"}
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in after if k != "checkpoint.npz")


def test_resume_refuses_another_chip(tmp_path: Path) -> None:
    from hil.run import build_session, chip_model
    from hil.resume import load_checkpoint, restore

    cfg = tiny()
    run = tmp_path / "run"
    start_run(cfg, run, stop_after_steps=20)
    meta, arrays = load_checkpoint(run)
    other = MockDriver(65, 52, seed=99)
    s = build_session(cfg, load_digits(0).limited(300, None), None, other, append_log=False, model=chip_model(cfg))
    with pytest.raises(CheckpointError, match="another chip"):
        restore(s.trainer, meta, arrays)
    s.close()


def test_stop_and_resume_continues_to_the_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = start_run(tiny(), run, stop_after_steps=120)
    assert first["finished"] is False and first["samples_trained"] == 120
    s = resume_run(run)
    assert s["finished"] is True and s["samples_trained"] == 300
    ids = [i for i, _, _ in _programs(run)]
    assert ids == sorted(set(ids))


def test_cli_train_and_its_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    run = tmp_path / "run"
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny().to_toml())
    r = runner.invoke(app, ["train", "--config", str(cfg), "--out", str(run), "--baseline"])
    assert r.exit_code == 0, r.output
    s = json.loads((run / "summary.json").read_text())
    assert s["baseline_test_accuracy"] is not None and s["samples_trained"] == 300
    assert "test_accuracy" in r.output
    r = runner.invoke(app, ["train", "--config", str(cfg), "--out", str(run)])
    assert r.exit_code == 2 and "already exists" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[update]\nlr = 'x'\nspeed = 3\n")
    r = runner.invoke(app, ["train", "--config", str(bad), "--out", str(tmp_path / "new")])
    assert r.exit_code == 2 and "update.speed: unknown key" in r.output
    assert not (tmp_path / "new").exists()


def test_verify_refresh_reads_back_and_the_log_counts_refreshes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    s = start_run(tiny(**{"refresh.mode": "verify", "refresh.threshold_us": 4.0, "update.lr": 0.3}), run)
    assert s["refreshes"] > 0
    with RunLogReader(run / "run.h5") as r:
        reasons = set(r.reads()["reason"])
        m = r.metrics()
        assert float(r.attrs["refresh_threshold_us"]) == 4.0
    assert "refresh-verify" in reasons and "after-program" in reasons and "initial" in reasons
    assert np.nansum(m["refreshed_pairs"]) == s["refreshes"]
    assert np.nanmax(m["refreshes"]) == s["refreshes"]


def test_resume_with_a_corrupt_log_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    from drivers.runlog import RunLogError

    run = tmp_path / "run"
    start_run(tiny(), run, stop_after_steps=30)
    log = run / "run.h5"
    log.write_bytes(log.read_bytes()[:4096])
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(RunLogError):
        resume_run(run)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_of_a_mock_run_refuses_a_tester(tmp_path: Path) -> None:
    run = tmp_path / "run"
    start_run(tiny(), run, stop_after_steps=10)
    with pytest.raises(CheckpointError, match="its own chip"):
        resume_run(run, driver="TCPIP::127.0.0.1::5025::SOCKET")


def test_run_log_says_its_units_and_mapping_columns(tmp_path: Path) -> None:
    import h5py

    from drivers.runlog.schema import UNITS

    start_run(tiny(**{"data.train_limit": 20}), tmp_path / "run")
    with h5py.File(tmp_path / "run" / "run.h5", "r", swmr=True) as f:
        assert f["reads/conductance_us"].attrs["units"] == "uS"
        assert f["programs/shapes"].attrs["units"].startswith("set_amplitude_ua=uA")
        assert {n: f[n].attrs["units"] for n in UNITS} == UNITS
        cols = f["arrays/mapping/table"].attrs["columns"].split(", ")
        assert cols == ["layer", "weight_row", "weight_col", "gplus_address", "gminus_address"]
        assert f["arrays/mapping/table"].shape[1] == len(cols)
