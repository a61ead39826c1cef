"""`pcm-hil emulator` refuses every mistake with one line on stderr and a nonzero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # A timeout: the old emulator served (forever) where it should have refused.
    return subprocess.run([sys.executable, "-m", "hil.cli", "emulator", "--listen", "127.0.0.1:0", "--rows", "2",
                           "--cols", "2", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def assert_one_line_refusal(r: subprocess.CompletedProcess[str], *words: str) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "https://" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pcm-hil emulator: ")
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "LISTENING" not in r.stdout
    return lines[0]


@pytest.mark.parametrize("option", ["--limits", "--params"])
def test_a_missing_toml_file_is_named(tmp_path, option):
    r = run_cli(option, str(tmp_path / "nope.toml"))
    assert_one_line_refusal(r, option, "nope.toml", "no such file")


@pytest.mark.parametrize("option", ["--limits", "--params"])
def test_invalid_toml_is_refused(tmp_path, option):
    f = tmp_path / "bad.toml"
    f.write_text("max_set_pulses_per_device = [\n")
    assert_one_line_refusal(run_cli(option, str(f)), option, "bad.toml", "invalid TOML")


@pytest.mark.parametrize("option,text,words", [
    ("--limits", 'max_set_pulses_per_device = "many"\n', ["max_set_pulses_per_device", "valid integer", "'many'"]),
    ("--limits", "max_set_pulse_per_device = 3\n", ["max_set_pulse_per_device", "unknown key",
                                                    "did you mean 'max_set_pulses_per_device'"]),
    ("--limits", "set_amplitude_ua = {min = 300, max = 10}\n", ["set_amplitude_ua", "exceeds max"]),
    ("--params", 'read_noise_rel = "loud"\n', ["read_noise_rel", "valid number"]),
    ("--params", "[pcm]\nnot_a_param = 1\n", ["not_a_param", "unknown key"]),
], ids=["limits-type", "limits-unknown-key", "limits-range", "params-type", "params-unknown-key"])
def test_a_wrong_type_or_unknown_key_is_named(tmp_path, option, text, words):
    f = tmp_path / "x.toml"
    f.write_text(text)
    assert_one_line_refusal(run_cli(option, str(f)), option, *words)


def test_a_folder_given_as_a_toml_file_is_refused(tmp_path):
    assert_one_line_refusal(run_cli("--limits", str(tmp_path)), "is a folder")


def test_an_array_too_big_for_the_protocol_is_refused_before_allocating():
    r = subprocess.run([sys.executable, "-m", "hil.cli", "emulator", "--listen", "127.0.0.1:0", "--rows", "100000",
                        "--cols", "100000"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert_one_line_refusal(r, "100000 x 100000", "10,000,000,000 devices")


def test_an_array_too_big_for_this_machine_is_refused():
    from drivers.server import BYTES_PER_DEVICE, MAX_DEVICES, check_size

    with pytest.raises(ValueError, match=r"needs about 9\.6 GB of memory .* this machine has 1\.0 GB"):
        check_size(10_000, 10_000, memory_bytes=10**9)
    check_size(1000, 1000, memory_bytes=BYTES_PER_DEVICE * 10**6)
    with pytest.raises(ValueError, match="wire protocol serves at most"):
        check_size(MAX_DEVICES + 1, 1, memory_bytes=10**15)


def test_a_state_file_in_a_folder_that_does_not_exist_is_refused_at_start(tmp_path):
    r = run_cli("--state", str(tmp_path / "no" / "such" / "chip.npz"))
    assert_one_line_refusal(r, "--state", "does not exist")


def test_a_state_file_that_is_a_folder_is_refused(tmp_path):
    assert_one_line_refusal(run_cli("--state", str(tmp_path)), "--state", "is a folder")


def test_a_state_file_that_cannot_be_written_is_refused_at_start(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert_one_line_refusal(run_cli("--state", str(ro / "chip.npz")), "--state", "cannot write")
    finally:
        ro.chmod(0o700)


def test_a_bad_listen_address_is_one_line():
    r = subprocess.run([sys.executable, "-m", "hil.cli", "emulator", "--listen", "127.0.0.1:99999"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert_one_line_refusal(r, "HOST:PORT")
