"""The torch PCM model (sim/torch_model.py) against the numpy reference (sim/model.py), and driver.device.

Statistical tolerances are Z standard errors of the difference between two independent samples, from
the sample sizes and the samples' own moments (not tuned); every chip is seeded, so a failure repeats.
A digits run on driver.device = "cpu" trains and, killed with SIGKILL, resumes with its accounting exact
and the chip holding exactly the pulses its log says. The CUDA tests run where torch sees a GPU.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from drivers import DriverError, MockDriver
from drivers.runlog import RunLogReader
from hil.config import ConfigError, RunConfig
from sim import AddressError, ClockError, PCMArray, PCMParams, PulseCountError, StateFileError
from sim.torch_model import DeviceUnavailable, TorchPCMArray

ROOT = Path(__file__).resolve().parent.parent
Z = 5.0  # standard errors allowed: a correct model fails with probability < 1e-6 per check
N = 100_000  # devices per statistical experiment
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device here (torch.cuda.is_available() is False): "
                                                  "the CUDA path is tested on a GPU machine")
no_cuda = pytest.mark.skipif(CUDA, reason="this machine has a CUDA device: the refusal cannot be shown")


def _moments(x: np.ndarray) -> tuple[float, float, float, float]:
    """mean, sd, and the standard errors of each (the sd's from the fourth central moment: no normality assumed)."""
    x = np.asarray(x, np.float64)
    n, m, s = x.size, x.mean(), x.std()
    m4 = float(((x - m) ** 4).mean())
    se_sd = math.sqrt(max(m4 - s**4, 0.0) / n) / (2 * s) if s > 0 else 0.0
    return m, s, s / math.sqrt(n), se_sd


def assert_same_distribution(a: np.ndarray, b: np.ndarray, what: str, slack: float = 1e-6) -> None:
    """Mean and sd of two independent samples agree within Z standard errors of their difference.

    slack covers rounding only (the numpy model's float32 against the torch model's float64)."""
    ma, sa, sema, sesa = _moments(a)
    mb, sb, semb, sesb = _moments(b)
    assert abs(ma - mb) <= Z * math.hypot(sema, semb) + slack, f"{what}: mean {ma:.5f} vs {mb:.5f}"
    assert abs(sa - sb) <= Z * math.hypot(sesa, sesb) + slack, f"{what}: sd {sa:.5f} vs {sb:.5f}"


def _both(n: int, params: PCMParams | None = None, seed: int = 1) -> tuple[PCMArray, TorchPCMArray]:
    return PCMArray(n, params, seed=seed), TorchPCMArray(n, params, seed=seed + 1000)


# ---------------------------------------------------------------- the laws, against the reference
def test_conductance_after_1_to_12_pulses_matches_numpy() -> None:
    """G after each of 12 SET pulses from RESET (one call per pulse): state dependence, history term,
    spread and the device factor, all as the reference; the dtype is float64 on the CPU."""
    ref, tch = _both(N)
    assert tch.dtype == torch.float64 and tch.device.type == "cpu"
    addr = np.arange(N)
    for k in range(1, 13):
        for chip in (ref, tch):
            chip.set_pulses(addr, np.ones(N, np.int64), t=1e-3 * k)
        assert_same_distribution(ref.conductance(None, 1e-3 * k), tch.conductance(None, 1e-3 * k), f"G after {k} pulses")
    assert np.array_equal(tch.pulses_since_reset(), np.full(N, 12, np.uint32))


def test_one_program_of_mixed_counts_with_resets_matches_numpy() -> None:
    """apply(): RESET where flagged, then 0..10 pulses drawn one after another in one call, per pulse count."""
    p = PCMParams(d2d_update_spread=0.15)
    ref, tch = _both(N, p, seed=4)
    addr = np.arange(N)
    for chip in (ref, tch):
        chip.set_pulses(addr, np.full(N, 3), t=1.0)
    counts = np.arange(N) % 11
    reset = np.arange(N) % 2 == 0
    for chip in (ref, tch):
        chip.apply(addr, counts, reset, t=2.0)
    ga, gb = ref.conductance(None, 2.0), tch.conductance(None, 2.0)
    for k in (0, 1, 2, 5, 10):
        for r in (False, True):
            sel = (counts == k) & (reset == r)
            assert_same_distribution(ga[sel], gb[sel], f"{k} pulses, reset {r}")
    assert np.array_equal(ref.pulses_since_reset(), tch.pulses_since_reset())


@pytest.mark.parametrize("g0,n_prev", [(8.0, 0), (3.0, 9), (6.0, 1)])
def test_set_increment_matches_published_formulas(g0: float, n_prev: int) -> None:
    p = PCMParams()
    chip = TorchPCMArray(N, p, seed=11)
    addr = np.arange(N)
    chip.force_state(addr, g0, n_prev, t=0.0)
    chip.set_pulses(addr, np.ones(N, np.int64), t=1e-6)
    inc = chip.conductance(addr, 1e-6).astype(np.float64) - g0
    mu, sigma = p.mean_increment_us(g0, n_prev + 1), p.std_increment_us(g0, n_prev + 1)
    total_sd = math.sqrt(sigma**2 + (p.d2d_update_spread * mu) ** 2)  # f ~ N(1, s^2) multiplies the mean
    assert abs(inc.mean() - mu) < Z * total_sd / math.sqrt(N) + 1e-6  # +: the float32 the read returns
    assert abs(inc.std() - total_sd) < Z * total_sd / math.sqrt(2 * (N - 1)) + 1e-6


def test_reset_and_fabrication_draws_match_numpy() -> None:
    p = PCMParams(drift_nu_mean=0.01, drift_nu_std=0.02, d2d_update_spread=0.2)
    ref, tch = _both(N, p, seed=9)
    assert_same_distribution(ref.drift_exponents(), tch.drift_exponents(), "nu (clipped at 0)")
    assert_same_distribution(ref.update_factors(), tch.update_factors(), "device factor f")
    assert tch.drift_exponents().min() >= 0.0
    addr = np.arange(N)
    for chip in (ref, tch):
        chip.set_pulses(addr, np.full(N, 5), t=1.0)
        chip.reset(addr, t=2.0)
    assert_same_distribution(ref.conductance(None, 2.0), tch.conductance(None, 2.0), "G after RESET")
    g = tch.conductance(None, 2.0)
    assert abs((g <= np.float32(p.g_min_us)).mean() - 0.5) < Z * math.sqrt(0.25 / N)  # half clipped at g_min
    assert np.all(tch.pulses_since_reset() == 0)


@pytest.mark.parametrize("nu", [0.02, 0.1])
def test_drift_log_log_slope_is_minus_nu(nu: float) -> None:
    p = PCMParams(drift_nu_mean=nu, drift_nu_std=0.0)
    chip = TorchPCMArray(100, p, seed=0)
    addr = np.arange(100)
    chip.set_pulses(addr, np.full(100, 4), t=0.0)
    g0 = chip.conductance(addr, 0.0)
    assert np.array_equal(chip.conductance(addr, p.drift_t0_s * 0.999), g0)  # no drift before t0
    times = p.drift_t0_s * np.logspace(0.5, 5, 8)
    g = np.stack([chip.conductance(addr, float(t)) for t in times]).astype(np.float64)
    np.testing.assert_allclose(np.polyfit(np.log(times), np.log(g), 1)[0], -nu, atol=1e-5)


def test_drift_is_per_device_and_its_reads_match_numpy() -> None:
    p = PCMParams(drift_nu_std=0.02)
    ref, tch = _both(N, p, seed=3)
    addr = np.arange(N)
    t1, t2 = 10 * p.drift_t0_s, 1000 * p.drift_t0_s
    for chip in (ref, tch):
        chip.set_pulses(addr, np.full(N, 6), t=0.0)
    g1 = tch.conductance(addr[:1000], t1).astype(np.float64)
    g2 = tch.conductance(addr[:1000], t2).astype(np.float64)
    slope = (np.log(g2) - np.log(g1)) / (math.log(t2) - math.log(t1))
    np.testing.assert_allclose(slope, -tch.drift_exponents()[:1000], atol=1e-5)
    assert_same_distribution(ref.conductance(None, t2), tch.conductance(None, t2), "G drifted to 1000 t0")
    assert_same_distribution(ref.read(None, 2 * t2), tch.read(None, 2 * t2), "a read at 2000 t0")


@pytest.mark.parametrize("g0", [0.5, 5.0, 15.0])
def test_read_noise_spread(g0: float) -> None:
    p = PCMParams()
    ref, tch = _both(N, p, seed=6)
    noise = {}
    for name, chip in (("numpy", ref), ("torch", tch)):
        chip.force_state(np.arange(N), g0, 10, t=0.0)
        reads = chip.read(None, 1.0)
        assert reads.dtype == np.float32 and reads.min() >= p.g_min_us and reads.max() <= p.g_max_us
        noise[name] = reads.astype(np.float64) - chip.conductance(None, 1.0)
    sigma = p.read_noise_rel * g0 + p.read_noise_abs_us
    if g0 - 3 * sigma > p.g_min_us:  # far from the clip: the formula itself
        assert abs(noise["torch"].mean()) < Z * sigma / math.sqrt(N) + 1e-6
        assert abs(noise["torch"].std() - sigma) < Z * sigma / math.sqrt(2 * (N - 1)) + 1e-6
    assert_same_distribution(noise["numpy"], noise["torch"], f"read noise at {g0} uS")


def test_bounds_hold_for_long_pulse_trains() -> None:
    p = PCMParams(g_max_us=12.0)
    chip = TorchPCMArray(5000, p, seed=2)
    chip.set_pulses(np.arange(5000), np.arange(5000) % 40, t=1.0)
    for g in (chip.conductance(None, 1.0), chip.read(None, 2.0), chip.read(np.arange(10), 1e6)):
        assert g.min() >= p.g_min_us and g.max() <= p.g_max_us


# ---------------------------------------------------------------- seeds, state, bad input
def _history(seed: int, **kw) -> np.ndarray:
    chip = TorchPCMArray(2000, seed=seed, **kw)
    chip.set_pulses(np.arange(0, 2000, 2), np.full(1000, 3), t=1.0)
    chip.apply(np.arange(0, 100), np.arange(100) % 4, np.arange(100) % 3 == 0, t=2.0)
    return np.concatenate([chip.read(None, 500.0), chip.read(np.array([5, 1, 1999]), 600.0)])


def test_same_seed_same_chip_other_seed_other_chip() -> None:
    assert np.array_equal(_history(7), _history(7))
    assert not np.array_equal(_history(7), _history(8))
    assert not np.array_equal(_history(7), _history(7 + 2**32))  # seeds above 32 bits are seeds too
    assert np.array_equal(_history(3, dtype=torch.float32), _history(3, dtype=torch.float32))


def test_save_load_round_trip_is_exact_and_continues_identically(tmp_path: Path) -> None:
    chip = TorchPCMArray(3000, PCMParams(drift_nu_std=0.02, d2d_update_spread=0.1), seed=12)
    chip.set_pulses(np.arange(3000), np.arange(3000) % 5, t=3.0)
    chip.reset(np.arange(10), t=4.0)
    chip.read(None, 100.0)
    path = tmp_path / "chip.npz"
    chip.save(path)
    loaded = TorchPCMArray.load(path)
    twin = copy.deepcopy(chip)
    assert loaded.state_equal(chip) and twin.state_equal(chip)
    for c in (chip, loaded, twin):
        c.set_pulses(np.arange(100), np.full(100, 2), t=200.0)
    a, b, c = (x.read(None, 1e4) for x in (chip, loaded, twin))
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert loaded.state_equal(chip)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_load_refuses_missing_corrupt_and_numpy_files(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match="no chip state"):
        TorchPCMArray.load(tmp_path / "absent.npz")
    path = tmp_path / "chip.npz"
    TorchPCMArray(100, seed=0).save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(StateFileError):
        TorchPCMArray.load(tmp_path / "trunc.npz")
    PCMArray(100, seed=0).save(tmp_path / "numpy.npz")
    with pytest.raises(StateFileError, match="format"):
        TorchPCMArray.load(tmp_path / "numpy.npz")
    with pytest.raises(StateFileError, match="format"):
        PCMArray.load(path)


@pytest.mark.parametrize("call,error", [
    (lambda c: c.set_pulses(np.array([0, 0]), np.array([1, 1]), 1.0), AddressError),
    (lambda c: c.set_pulses(np.array([0, 100]), np.array([1, 1]), 1.0), AddressError),
    (lambda c: c.set_pulses(np.array([0, 1]), np.array([1, -1]), 1.0), PulseCountError),
    (lambda c: c.apply(np.array([0, 1]), np.array([1, 1]), np.array([1, 0]), 1.0), PulseCountError),
    (lambda c: c.read(None, 0.5), ClockError),
    (lambda c: c.read(None, float("nan")), ClockError),
    (lambda c: c.force_state(np.array([3]), 50.0, 0, 2.0), ValueError),
])
def test_bad_input_is_refused_and_changes_nothing(call, error) -> None:
    chip = TorchPCMArray(100, seed=0, t=1.0)
    before = copy.deepcopy(chip)
    with pytest.raises(error):
        call(chip)
    assert chip.state_equal(before)


# ---------------------------------------------------------------- driver.device
def test_numpy_path_never_imports_torch() -> None:
    code = ("import sys; import sim, drivers, hil.config, hil.chip; from drivers import MockDriver; "
            "d = MockDriver(4, 4); d.read(); assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_mock_driver_on_torch_cpu_and_its_state(tmp_path: Path) -> None:
    from drivers import PulseProgram

    d = MockDriver(8, 10, seed=4, device="cpu")
    assert isinstance(d.chip, TorchPCMArray)
    assert d.identity == "pcm-hil,MockDriver,8x10,seed=4,model=torch-cpu"
    assert MockDriver(8, 10, seed=4).identity == "pcm-hil,MockDriver,8x10,seed=4"  # the numpy model's, unchanged
    addr = np.arange(0, 80, 3, dtype=np.int64)
    d.apply(PulseProgram(1, addr, np.full(addr.size, 2, np.int64), np.zeros(addr.size, bool)))
    r = d.read(addr)
    assert r.conductances_us.dtype == np.float32 and r.conductances_us.shape == addr.shape
    d.chip.save(tmp_path / "chip.npz")
    back = MockDriver.from_state(tmp_path / "chip.npz", 8, 10, seed=4)
    assert back.identity == d.identity and back.chip.state_equal(d.chip)
    assert np.array_equal(back.chip.pulses_since_reset(addr), np.full(addr.size, 2, np.uint32))
    PCMArray(80, seed=4).save(tmp_path / "numpy.npz")  # a numpy chip's state still loads as the numpy model
    assert isinstance(MockDriver.from_state(tmp_path / "numpy.npz", 8, 10).chip, PCMArray)
    from drivers import Block

    analog = MockDriver(4, 4, seed=3, analog_mvm=True, device="cpu")  # the analog product reads the torch chip
    y = analog.mvm(Block(0, 4, 0, 4), np.ones((2, 4)))
    assert y.shape == (2, 4) and np.all(y > 0)


def test_config_digest_unchanged_while_device_is_unset() -> None:
    """The digest is the sha256 of the model dump without None fields: an unset device is not in it, so the
    runs made before driver.device existed still resume."""
    cfg = RunConfig()
    assert cfg.driver.device is None
    assert "device" not in cfg.model_dump(mode="json", exclude_none=True)["driver"]
    assert "\ndevice =" not in cfg.to_toml()
    on = cfg.with_overrides(**{"driver.device": "cpu"})
    assert on.digest() != cfg.digest() and 'device = "cpu"' in on.to_toml()
    with pytest.raises(ConfigError, match="driver.device"):
        cfg.with_overrides(**{"driver.device": "tpu"})


def test_device_on_a_tester_is_refused() -> None:
    from hil.chip import chip_model, make_driver

    cfg = RunConfig().with_overrides(**{"driver.kind": "visa", "driver.resource": "TCPIP::127.0.0.1::1::SOCKET",
                                        "driver.device": "cpu"})
    with pytest.raises(ConfigError, match='driver.device = "cpu" selects the torch model'):
        make_driver(cfg, [(4, 3)], chip_model(cfg))


@no_cuda
def test_cuda_without_a_gpu_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(DeviceUnavailable, match="no CUDA device"):
        TorchPCMArray(10, device="cuda")
    with pytest.raises(DriverError, match='driver.device = "cuda": torch finds no CUDA device'):
        MockDriver(2, 2, device="cuda")
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "hil.cli", "train", "--data", "digits", "--set", "driver.device=cuda",
                        "--out", str(run)], cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, COLUMNS="80"))
    assert r.returncode == 2
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: driver.device = "cuda"'), lines
    assert "Traceback" not in r.stderr and not run.exists()


# ---------------------------------------------------------------- a run on it: trains, resumes exactly
CONFIG = """
seed = 5
[network]
hidden = [16]
[data]
name = "digits"
[update]
epochs = 2
lr = 0.03
lr_decay = 0.9
[refresh]
check_every_steps = 25
[read_policy]
every_steps = 300
[checkpoint]
every_steps = 60
audit = true
[driver]
seed = 3
device = "cpu"
"""


def _train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hil.cli", "train", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, COLUMNS="120"))


def _since_reset_from_log(run: Path, n_devices: int) -> np.ndarray:
    """SET pulses per device since its last RESET, from the log's applied programs (RESET first, then SET)."""
    summary = json.loads((run / "summary.json").read_text())
    unapplied = set(summary["unapplied_program_ids"])
    since = np.zeros(n_devices, np.int64)
    with RunLogReader(run / "run.h5") as r:
        progs = [p for _, _, p in r.programs()]
    ids = [p.program_id for p in progs]
    assert ids == sorted(set(ids)), "program ids must increase strictly in the log"
    for p in progs:
        if p.program_id in unapplied:
            continue
        since[p.addresses[p.reset]] = 0
        since[p.addresses] += p.set_counts
    return since


@pytest.mark.slow
def test_digits_run_on_torch_cpu_trains_and_resumes_exactly_after_kill9(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG)
    run = tmp_path / "run"
    proc = _train(["--config", str(cfg), "--out", str(run)])
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc = _train(["--resume", str(run)])
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed, "the run finished before it could be killed"
    rolled = re.search(r"(\d+) journal records rolled forward", (run / "pcm-hil.log").read_text())
    assert rolled and int(rolled.group(1)) > 0, "the kill should fall between two checkpoints"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["test_accuracy"] > 0.5  # chance is 0.1; 0.72 .. 0.83 uninterrupted (seeds 5, 6)
    from hil.data import load_digits

    n_train = len(load_digits(5).y_train)
    assert summary["samples_trained"] == 2 * n_train  # every sample trained exactly once
    with np.load(run / "checkpoint.npz") as z:
        meta = json.loads(bytes(z["meta"]).decode())
        arrays = {k: z[k] for k in z.files}
    assert meta["identity"].endswith(",model=torch-cpu")
    with RunLogReader(run / "run.h5") as r:
        eps = json.loads(r.attrs["eps_per_layer_json"])
    for i in range(2):  # the audit ledger: chi + eps * net SET pulses = the float64 sum of every update
        np.testing.assert_allclose(arrays[f"chi{i}"] + eps[i] * arrays[f"net{i}"], arrays[f"total{i}"], rtol=0, atol=1e-9)
    # The chip saved with the last checkpoint (restored after the kill, the journal re-applied to it) holds
    # exactly the pulses the log's applied programs gave each device: none lost, none doubled.
    chip = TorchPCMArray.load(run / meta["chip"])
    np.testing.assert_array_equal(chip.pulses_since_reset().astype(np.int64), _since_reset_from_log(run, chip.n_devices))


# ---------------------------------------------------------------- CUDA, where there is one
@needs_cuda
def test_cuda_model_matches_numpy_and_resumes_exactly(tmp_path: Path) -> None:
    ref, tch = PCMArray(N, seed=1), TorchPCMArray(N, seed=2, device="cuda")
    assert tch.dtype == torch.float32 and tch._g.is_cuda
    addr = np.arange(N)
    for k in range(1, 9):
        for chip in (ref, tch):
            chip.set_pulses(addr, np.ones(N, np.int64), t=1e-3 * k)
        assert_same_distribution(ref.conductance(None, 1e-3 * k), tch.conductance(None, 1e-3 * k), f"G after {k}")
    assert_same_distribution(ref.read(None, 1e5), tch.read(None, 1e5), "a drifted read")
    tch.save(tmp_path / "chip.npz")
    back = TorchPCMArray.load(tmp_path / "chip.npz")
    assert back.device.type == "cuda" and back.state_equal(tch)
    assert np.array_equal(back.read(None, 2e5), tch.read(None, 2e5))
    with pytest.raises(StateFileError, match="cannot continue on cpu"):
        TorchPCMArray.load(tmp_path / "chip.npz", device="cpu")


def test_memory_check_counts_the_torch_chips_larger_state(monkeypatch):
    """The pre-run memory check budgets the torch model's float64 state (36 B/device), not the numpy model's 24 B:
    a chip that fits as numpy but not as torch is refused in one line before anything is allocated."""
    import hil.sizing as sizing
    from hil.chip import chip_model, make_driver
    from hil.config import ConfigError, validate_config

    shapes = [(64, 16), (16, 10)]
    rows, cols = 65, 2 * (16 + 10)
    n = rows * cols
    # room for the numpy chip and the host side, not for the torch chip's extra 12 B/device
    room = n * (sizing.HOST_BYTES_PER_DEVICE + sizing.MOCK_BYTES_PER_DEVICE) + sum((i + 1) * o for i, o in shapes) * \
        sizing.BYTES_PER_WEIGHT + n
    monkeypatch.setattr(sizing, "available_memory_bytes", lambda: room)
    base = {"data": {"name": "digits"}, "network": {"hidden": [16]}}
    cfg = validate_config(base)
    make_driver(cfg, shapes, chip_model(cfg)).close()
    cfg = validate_config({**base, "driver": {"device": "cpu"}})
    with pytest.raises(ConfigError, match="simulated chip needs about"):
        make_driver(cfg, shapes, chip_model(cfg))
