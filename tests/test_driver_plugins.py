"""Your own tester: the worked adapter of docs/drivers.md, run from the page itself, by import path and by an
entry-point name; drivers.serve() in front of it; --dry-run; plugin errors are one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """acme_driver.py as docs/drivers.md shows it, and a dist-info registering it as 'acme'."""
    text = (ROOT / "docs" / "drivers.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next(b for b in blocks if b.startswith('"""acme_driver.py'))
    d = tmp_path_factory.mktemp("plugins")
    (d / "acme_driver.py").write_text(code)
    info = d / "acme_lab-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-lab\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pcm_hil.drivers]\nacme = acme_driver:AcmeDriver\n")
    return d


def _train(plugin_dir: Path, *args: str, plugin: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")]),
               COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "hil.cli", "train", "--data", "digits", "--set", "update.lr=0.1",
                           "--set", "network.hidden=[16]", *(["--set", "driver.options.cols=52"] if plugin else []),
                           *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _uncalibrated() -> list[str]:
    """The fake Acme chip is the default model: training on it uncalibrated is what the test means."""
    return ["--set", "driver.uncalibrated_ok=true"]


@pytest.mark.parametrize("spec", ["acme_driver:AcmeDriver", "acme"])
def test_the_documented_adapter_trains(plugin_dir: Path, tmp_path: Path, spec: str) -> None:
    run = tmp_path / "run"
    r = _train(plugin_dir, "--driver", spec, "--out", str(run), *_uncalibrated())
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["test_accuracy"] > 0.3 and summary["programs_applied"] > 10
    from drivers.runlog import RunLogReader

    with RunLogReader(run / "run.h5") as lr:
        assert lr.attrs["instrument_identity"] == "Acme,PX-200,SN42"


def test_plugin_mistakes_are_one_line(plugin_dir: Path, tmp_path: Path) -> None:
    for spec, msg in (("acme_driver:Nope", "'acme_driver' has no 'Nope'"), ("no_such_mod:X", "cannot import 'no_such_mod'"),
                      ("acme_driver:AcmeDriver --set driver.options.colour=3", "does not take the options")):
        a = spec.split()
        r = _train(plugin_dir, "--driver", *a, "--out", str(tmp_path / "run"), *_uncalibrated())
        out = r.stdout + r.stderr
        assert r.returncode == 2 and msg in out and "Traceback" not in out, out
        assert not (tmp_path / "run").exists()


def test_dry_run_checks_and_logs_every_program_and_sends_none(plugin_dir: Path, tmp_path: Path) -> None:
    from drivers.runlog import RunLogReader

    run = tmp_path / "run"
    r = _train(plugin_dir, "--driver", "mock", "--dry-run", "--out", str(run), plugin=False)
    assert r.returncode == 0, r.stdout + r.stderr
    with RunLogReader(run / "run.h5") as lr:
        assert lr.attrs["instrument_identity"].startswith("dry-run of pcm-hil,MockDriver")
        assert len(lr.programs()) > 10
        g = lr.reads()["conductance_us"]
    # Nothing was programmed: the chip still holds its as-made conductances (no RESET, no SET ever landed).
    assert np.ptp(g) < 5.0
    r = subprocess.run([sys.executable, "-m", "hil.cli", "train", "--resume", str(run)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "is a dry run" in r.stdout + r.stderr


def test_serve_puts_the_adapter_behind_the_wire_protocol(plugin_dir: Path) -> None:
    sys.path.insert(0, str(plugin_dir))
    try:
        from acme_driver import AcmeDriver
    finally:
        sys.path.remove(str(plugin_dir))
    from drivers import serve
    from drivers.tester import TesterDriver

    ready = threading.Event()
    box: dict = {}

    def on_ready(server) -> None:
        box["server"] = server
        ready.set()

    th = threading.Thread(target=serve, args=(AcmeDriver(rows=4, cols=5), "127.0.0.1:0"),
                          kwargs={"on_ready": on_ready}, daemon=True)
    th.start()
    assert ready.wait(30)
    server = box["server"]
    try:
        with TesterDriver.open(server.visa_resource, timeout_s=5) as t:
            assert "(Acme;PX-200;SN42)" in t.identity and t.geometry.n_devices == 20  # the served driver, named
            from drivers import PulseProgram

            t.apply(PulseProgram(1, np.array([3]), np.array([2]), np.array([True])))
            assert t.last_program_id() == 1
            assert t.read(np.array([3])).conductances_us.shape == (1,)
    finally:
        server.stop()
        th.join(10)
