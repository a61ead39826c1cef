"""End to end: a tiny training run against the emulated tester process, over pyvisa-py (TCP) and over a pty (serial)."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.runlog import RunLogReader
from drivers import tester
from hil.cli_emulator import EmulatorProcess
from hil.config import RunConfig
from hil.run import start_run

TINY = {"data.name": "digits", "network.hidden": [8], "update.epochs": 1, "data.train_limit": 120,
        "data.test_limit": 100, "refresh.threshold_us": 6.0, "read_policy.every_steps": 50}


@pytest.mark.parametrize("link", ["visa", "serial"])
def test_tiny_run_over_the_emulated_tester(tmp_path, link: str) -> None:
    args = ["--rows", "65", "--cols", "36", "--seed", "7"] + (["--pty"] if link == "serial" else [])
    with EmulatorProcess(args) as emu:
        resource = emu.resource if link == "visa" else emu.serial_url
        cfg = RunConfig().with_overrides(**TINY, **{"driver.kind": link, "driver.resource": resource,
                                                           "driver.uncalibrated_ok": True})
        s = start_run(cfg, tmp_path / "run")
        with tester.TesterDriver.open(resource) as t:
            applied = t.tester_lifetime_pulses()
            assert t.last_program_id() == s["programs_applied"]
    assert s["finished"] and s["samples_trained"] == 120
    with RunLogReader(tmp_path / "run" / "run.h5") as r:
        reads = r.reads()
        progs = [p for _, _, p in r.programs()]
        assert "emulator" in r.attrs["instrument_identity"]
    assert len(reads["address"]) == s["reads_logged"] == s["devices_read"]
    assert len(progs) == s["programs_applied"]
    logged = np.zeros(65 * 36, np.int64)
    for p in progs:
        np.add.at(logged, p.addresses, p.set_counts + p.reset)
    np.testing.assert_array_equal(applied, logged)
