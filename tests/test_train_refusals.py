"""Bad input and faults the process can name: one clear line, a nonzero exit, no traceback, nothing half-written.

- a refused run leaves no RUN_DIR; a refused resume, and the resume of a finished run, change no file;
- configs that cannot be meant, or would exhaust memory, are refused before anything is allocated;
- safety limits wider than the built-in defaults need an explicit, logged opt-in;
- SIGTERM stops between steps, leaves a resumable state and prints the --resume command;
- a full disk mid-run is one error line, and the run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hil.cli import app

ROOT = Path(__file__).resolve().parent.parent

TINY = """
seed = 1
[network]
hidden = [8]
[data]
name = "digits"
train_limit = 200
[update]
lr = 0.1
"""


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args), env={"COLUMNS": "60"})
    out = r.output
    assert "Traceback" not in out, out
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, out


def _refused(tmp_path: Path, toml: str, match: str, *extra: str) -> str:
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml)
    out_dir = tmp_path / "run"
    rc, out = _cli("train", "--config", str(cfg), "--out", str(out_dir), *extra)
    assert rc == 2, out
    assert match in " ".join(out.split()), out
    assert not out_dir.exists(), "a refused run must leave no folder"
    return out


@pytest.mark.parametrize("toml, match", [
    (TINY + "[mapping]\nw_max = [1e300]\n", "mapping.w_max.0: Input should be less than or equal to 1000"),
    (TINY.replace("lr = 0.1", "lr = 1e300"), "update.lr: Input should be less than or equal to 10"),
    (TINY + "epochs = true\n", "update.epochs: Input should be a valid integer"),
    (TINY.replace("seed = 1", "seed = -1"), "seed: Input should be greater than or equal to 0"),
    (TINY + "[driver]\nseed = -4\n", "driver.seed: Input should be greater than or equal to 0"),
    (TINY + "[mapping]\nrow0 = 1e9\n", "mapping.row0: Input should be a valid integer"),
    (TINY + "eps = [0.01]\n", "update.eps has 1 values, the network has 2 layers"),
    (TINY.replace("hidden = [8]", "hidden = [100000, 100000]"), "devices; addresses are 32-bit"),
    (TINY.replace("hidden = [8]", "hidden = [30000, 30000]"), "GiB of memory"),
    (TINY + "[mapping]\nrow0 = 1000000000\n", "devices; addresses are 32-bit"),
    (TINY + "[mapping]\nrow0 = 100000000\n", "GiB of memory"),
    (TINY + "[updat]\n", "updat: unknown key (did you mean 'update'?)"),
])
def test_config_that_cannot_be_meant_is_refused_before_anything_exists(tmp_path: Path, toml: str, match: str) -> None:
    out = _refused(tmp_path, toml, match)
    assert "errors.pydantic.dev" not in out


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """(A read-only parent is the same error path; as root, permissions do not bite, so a file stands in the way.)"""
    (tmp_path / "file").write_text("x")
    rc, out = _cli("train", "--data", "digits", "--train-limit", "50", "--out", str(tmp_path / "file" / "run"))
    assert rc == 2 and "error: Not a directory" in out, out


def test_config_naming_a_directory(tmp_path: Path) -> None:
    rc, out = _cli("train", "--config", str(tmp_path), "--out", str(tmp_path / "run"))
    assert rc == 2 and "is a directory, not a run config file" in out
    assert not (tmp_path / "run").exists()


WIDE = TINY + """
[driver.limits.set_amplitude_ua]
min = 10
max = 5000
[driver.shapes.set]
amplitude_ua = 4000
width_ns = 50
"""


def test_limits_wider_than_the_defaults_need_an_opt_in(tmp_path: Path) -> None:
    _refused(tmp_path, WIDE, "driver.limits is wider than the built-in safety limits (set_amplitude_ua.max = 5000 "
                             "is above 200); set driver.allow_wider_limits = true")


def test_the_opt_in_is_logged(tmp_path: Path) -> None:
    from drivers.runlog import RunLogReader

    cfg = tmp_path / "run.toml"
    cfg.write_text(WIDE.replace("[driver.limits", "[driver]\nallow_wider_limits = true\n[driver.limits", 1))
    rc, out = _cli("train", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert rc == 0, out
    assert "warning: safety limits wider than the built-in defaults" in " ".join(out.split())
    with RunLogReader(tmp_path / "run" / "run.h5") as r:
        assert json.loads(r.attrs["limits_widened_json"]) == ["set_amplitude_ua.max = 5000 is above 200"]
        assert json.loads(r.attrs["safety_limits_json"])["set_amplitude_ua"]["max"] == 5000


def test_a_tester_narrows_even_opted_in_limits(tmp_path: Path) -> None:
    """The tester's LIM? (max 200 uA) wins over the config's 5000: the 4000 uA shape is refused before RUN_DIR."""
    from hil.cli_emulator import EmulatorProcess

    toml = WIDE.replace("[driver.limits", "[driver]\nallow_wider_limits = true\n[driver.limits", 1)
    with EmulatorProcess(["--rows", "65", "--cols", "36"]) as emu:
        _refused(tmp_path, toml, "safety limit 'set_amplitude_ua' refused the program", "--driver", emu.resource,
                 "--set", "driver.uncalibrated_ok=true")


def _snapshot(run: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(run.iterdir())}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped half way (resumable), made once for the resume refusals below."""
    from hil.config import RunConfig
    from hil.run import start_run

    run = tmp_path_factory.mktemp("stopped") / "run"
    cfg = RunConfig().with_overrides(**{"data.name": "digits", "network.hidden": [8], "data.train_limit": 200,
                                        "checkpoint.every_steps": 30})
    s = start_run(cfg, run, stop_after_steps=100)
    assert not s["finished"]
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def test_refused_resume_with_an_edited_config_changes_nothing(stopped_run: Path, tmp_path: Path) -> None:
    run = _copy(stopped_run, tmp_path)
    (run / "config.toml").write_text((run / "config.toml").read_text().replace("lr = 0.03", "lr = 0.05"))
    before = _snapshot(run)
    rc, out = _cli("train", "--resume", str(run))
    assert rc == 2 and "another config" in out
    assert _snapshot(run) == before


def test_a_resume_takes_another_visa_backend_from_the_edited_config(stopped_run: Path, tmp_path: Path) -> None:
    """driver.visa_backend is a link setting: a run may come back through another VISA library."""
    run = _copy(stopped_run, tmp_path)
    text = (run / "config.toml").read_text()
    assert 'visa_backend = "@py"' in text
    (run / "config.toml").write_text(text.replace('visa_backend = "@py"', 'visa_backend = "@ivi"'))
    rc, out = _cli("train", "--resume", str(run))
    assert rc == 0, out
    assert json.loads((run / "summary.json").read_text())["finished"]


def test_refused_resume_on_a_corrupt_journal_record_changes_nothing(stopped_run: Path, tmp_path: Path) -> None:
    from hil.journal import Journal

    run = _copy(stopped_run, tmp_path)
    meta = json.loads(bytes(np.load(run / "checkpoint.npz")["meta"]).decode())
    seg = run / meta["journal"]
    j = Journal(seg)
    for step in (101, 102):  # two records: damage to the first is not a torn tail
        j.append({"kind": "update", "step": step, "epoch": 0, "pos": step, "correct": 0, "n": 1},
                 {"a0": np.zeros((1, 65)), "d0": np.zeros((1, 8)), "a1": np.zeros((1, 9)), "d1": np.zeros((1, 10))})
    j.close()
    data = bytearray(seg.read_bytes())
    data[20] ^= 0xFF
    seg.write_bytes(bytes(data))
    before = _snapshot(run)
    rc, out = _cli("train", "--resume", str(run))
    assert rc == 2 and "fails its checksum" in out
    assert _snapshot(run) == before


def test_refused_resume_on_a_tampered_run_log_changes_nothing(stopped_run: Path, tmp_path: Path) -> None:
    """The log is evidence: flipped SET counts fail its checksums, and the resume will not append to it."""
    import h5py

    run = _copy(stopped_run, tmp_path)
    with h5py.File(run / "run.h5", "r+") as f:
        counts = f["programs/set_count"]
        counts[5:25] = counts[5:25] + 1
    before = _snapshot(run)
    rc, out = _cli("train", "--resume", str(run))
    assert rc == 2 and "programs/set_count" in out, out
    assert _snapshot(run) == before


def test_resume_of_a_finished_run_says_so_and_changes_nothing(stopped_run: Path, tmp_path: Path) -> None:
    run = _copy(stopped_run, tmp_path)
    rc, out = _cli("train", "--resume", str(run))
    assert rc == 0, out
    before = _snapshot(run)
    rc, out = _cli("train", "--resume", str(run))
    assert rc == 0 and "is finished" in out and "nothing changed" in " ".join(out.split())
    assert _snapshot(run) == before


def test_resume_of_a_run_killed_before_its_summary_finishes_it(stopped_run: Path, tmp_path: Path) -> None:
    """Trained to the end but killed before summary.json was written (the window holds the baseline's whole
    training with --baseline): --resume writes the summary, training nothing more; then it is finished."""
    run = _copy(stopped_run, tmp_path)
    rc, out = _cli("train", "--resume", str(run))
    assert rc == 0, out
    first = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    rc, out = _cli("train", "--resume", str(run))
    assert rc == 0 and "is finished" not in out, out
    again = json.loads((run / "summary.json").read_text())
    assert again["finished"] is True
    for key in ("samples_trained", "steps", "epochs", "test_accuracy", "set_pulses", "reset_pulses", "refreshes"):
        assert again[key] == first[key], key
    rc, out = _cli("train", "--resume", str(run))
    assert rc == 0 and "is finished" in out


def _train(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hil.cli", "train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, COLUMNS="200"), **kw)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_between_steps_and_prints_the_resume_command(tmp_path: Path, sig: signal.Signals) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(TINY + "epochs = 400\n[checkpoint]\naudit = true\nevery_steps = 500\n")
    run = tmp_path / "run"
    proc = _train(["--config", str(cfg), "--out", str(run)])
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.npz").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    assert "Traceback" not in out
    assert f"pcm-hil train --resume {run}" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by_signal"] == sig and not summary["finished"]
    assert summary["steps"] % 1 == 0 and 0 < summary["samples_trained"] < 400 * 200
    # The stop left a checkpoint at the stopping step and an empty journal: nothing to roll forward.
    meta = json.loads(bytes(np.load(run / "checkpoint.npz")["meta"]).decode())
    assert meta["position"]["step"] == summary["steps"]
    assert (run / meta["journal"]).stat().st_size == 0


DISK_FULL = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk fails one
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = ["pcm-hil", *sys.argv[2:]]
runpy.run_module("hil.cli", run_name="__main__")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_full_disk_mid_run_is_one_line_and_the_run_resumes(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    # Full reads every 2 steps grow run.h5 to about 11 MB; the file size limit stops it at 5 MB, mid-run.
    cfg.write_text(TINY + "epochs = 6\n[read_policy]\nevery_steps = 2\n[checkpoint]\naudit = true\nevery_steps = 50\n"
                   "[logging]\nflush_interval_s = 0.2\n")
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", DISK_FULL, str(5_000_000), "train", "--config", str(cfg), "--out", str(run)],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"), timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out and "HDF5-DIAG" not in out, out
    assert "error:" in out and "file too large" in out.lower(), out
    assert len([line for line in out.splitlines() if "file too large" in line.lower()]) == 1, out
    assert f"the run is resumable: pcm-hil train --resume {run}" in out
    r = subprocess.run([sys.executable, "-m", "hil.cli", "train", "--resume", str(run)], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, COLUMNS="200"), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["samples_trained"] == 6 * 200
    with np.load(run / "checkpoint.npz") as z:
        arrays = {k: z[k] for k in z.files}
    from drivers.runlog import RunLogReader

    with RunLogReader(run / "run.h5") as lr:
        eps = json.loads(lr.attrs["eps_per_layer_json"])
    for i in range(2):
        np.testing.assert_allclose(arrays[f"chi{i}"] + eps[i] * arrays[f"net{i}"], arrays[f"total{i}"], rtol=0, atol=1e-9)


def test_the_visa_backend_reaches_pyvisa_and_a_missing_library_is_one_line(tmp_path: Path) -> None:
    """driver.visa_backend (NI-VISA's '@ivi', or a VISA library's path) goes to pyvisa's ResourceManager: a
    library that is not there is one line naming it, and no folder; the key is a link setting (digest unchanged)."""
    lib = tmp_path / "no-such-libvisa.so"
    out = _refused(tmp_path, TINY, f"cannot load VISA backend '{lib}'", "--set", "driver.kind=visa",
                   "--set", "driver.resource=TCPIP::127.0.0.1::1::SOCKET", "--set", f"driver.visa_backend={lib}",
                   "--set", "driver.uncalibrated_ok=true")
    assert "no-such-libvisa.so" in out
    from hil.config import RunConfig

    cfg = RunConfig()
    assert cfg.driver.visa_backend == "@py"
    assert cfg.with_overrides(**{"driver.visa_backend": "@ivi"}).digest() == cfg.digest()
