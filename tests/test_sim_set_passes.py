"""PCMArray's SET passes compute what does not depend on G for all passes at once and draw the pulse noise in one
call: the chip state and the RNG position must be what the pass-by-pass computation gives, bit for bit."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from sim import PCMArray


def _set_pass_by_pass(chip: PCMArray, addr: np.ndarray, cnt: np.ndarray, t: float) -> None:
    """The SET passes as they were written before (one pass after another, one noise draw per pass)."""
    if cnt.size == 0:
        return
    lo, hi = int(cnt.min()), int(cnt.max())
    if lo <= 0:
        keep = cnt > 0
        if not keep.any():
            return
        addr, cnt = addr[keep], cnt[keep]
    if hi > 1:
        order = np.argsort(-cnt, kind="stable")
        addr, cnt = addr[order], cnt[order]
        active = np.searchsorted(-cnt, -np.arange(1, int(cnt[0]) + 1), side="right").tolist()
    else:
        active = [addr.size]
    c = chip._set_constants()
    g = chip._drifted(addr, t)
    pulses = chip._pulses[addr]
    hist = pulses.astype(np.float32)
    mean_gain = chip._d2d[addr]
    base_mean = mean_gain * c.mean_offset
    n = addr.size
    pk_buf, sigma_buf, mean_buf = np.empty((3, n), np.float32)
    for m in active:
        gk, hk, pk, sigma, mean = g[:m], hist[:m], pk_buf[:m], sigma_buf[:m], mean_buf[:m]
        hk += 1.0
        np.multiply(hk, c.decay, out=pk)
        np.exp(pk, out=pk)
        np.multiply(gk, c.std_slope, out=sigma)
        sigma += c.std_offset
        np.multiply(pk, c.std_history, out=mean)
        sigma += mean
        sigma *= chip._rng.standard_normal(m, dtype=np.float32)
        np.multiply(gk, c.mean_slope, out=mean)
        np.multiply(pk, c.mean_history, out=pk)
        mean += pk
        mean *= mean_gain[:m]
        mean += base_mean[:m]
        gk += mean
        gk += sigma
        np.maximum(gk, c.g_min, out=gk)
        np.minimum(gk, c.g_max, out=gk)
    chip._g[addr] = g
    chip._pulses[addr] = pulses + cnt.astype(np.uint32)
    chip._t_prog[addr] = t


@pytest.mark.parametrize("seed", range(6))
def test_set_passes_equal_the_pass_by_pass_computation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    chip = PCMArray(5000, seed=seed)
    ref = copy.deepcopy(chip)
    t = 0.0
    for i in range(40):
        # small programs (a training step's), larger ones, counts 0..8, some devices pulsed many times
        n = int(rng.choice([1, 3, 7, 64, 65, 400]))
        addr = rng.choice(5000 if i % 3 else 50, size=min(n, 5000 if i % 3 else 50), replace=False).astype(np.int64)
        cnt = rng.integers(0 if i % 2 else 1, 9 if i % 4 else 2, addr.size).astype(np.int64)
        reset = rng.random(addr.size) < (0.3 if i % 5 == 0 else 0.0)
        t += float(rng.choice([1e-4, 30.0]))  # some programs after drift set in
        chip.apply(addr, cnt, reset, t)
        ref._advance(t)
        if reset.any():
            ref._reset_checked(addr[reset], t)
        _set_pass_by_pass(ref, addr, cnt, t)
        assert chip.state_equal(ref), f"program {i} ({addr.size} devices, counts up to {cnt.max()})"
    # and reads after it draw the same noise
    assert np.array_equal(chip.read(None, t + 1.0), ref.read(None, t + 1.0))


@pytest.mark.parametrize("seed", range(4))
def test_apply_and_read_equals_apply_then_read(seed: int) -> None:
    """The mock driver's one call for a program and its read-back: the same chip state, conductances and RNG
    position as apply() and read() one after the other."""
    rng = np.random.default_rng(seed)
    chip = PCMArray(3000, seed=seed)
    ref = copy.deepcopy(chip)
    t = 0.0
    for i in range(30):
        addr = rng.choice(3000, size=int(rng.choice([1, 6, 64, 200])), replace=False).astype(np.int64)
        cnt = rng.integers(0, 9 if i % 3 else 2, addr.size).astype(np.int64)
        if i % 7 == 0:
            cnt[:] = 0  # a program without SET pulses (a RESET-only probe) still reads back
        reset = rng.random(addr.size) < (0.4 if i % 4 == 0 else 0.0)
        t_read = t + 1e-4 + float(rng.choice([0.0, 50.0]))  # some reads after drift set in
        got = chip.apply_and_read(addr, cnt, reset, t, t_read, has_reset=bool(reset.any()) if i % 2 else None)
        ref.apply(addr, cnt, reset, t, validate=False)
        want = ref.read(addr, t_read, validate=False)
        assert got.dtype == want.dtype and np.array_equal(got, want)
        assert chip.state_equal(ref)
        t = t_read + 1e-4
