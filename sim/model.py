"""Vectorized behavioral model of a PCM device array.

State per device: conductance G (uS, float32, the value at the last programming event), SET pulses
since the last RESET (history term), time of the last programming event (s, float64), drift
exponent nu, and a device-to-device factor on the mean SET increment. 24 bytes per device.

The model never reads wall time: every call says what time it is (seconds on the caller's clock).
Drift follows G(t) = G(t_p) * ((t - t_p) / t0)^(-nu) once t - t_p exceeds t0; before that the device
reads its programmed value (the law is a fit for t >= t0 and grows without bound as t -> t_p).
A programming event (SET or RESET) starts from the drifted value and restarts the drift clock.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .errors import AddressError, ClockError, PulseCountError, StateFileError
from .files import npz_bytes, read_npz, write_atomic
from .params import PCMParams

STATE_FORMAT = "pcm-hil-sim-state"
STATE_VERSION = 1

# Per-device state arrays as saved, in PCMArray._arrays() order.
_STATE_ARRAYS = {"g": np.float32, "pulses": np.uint32, "t_prog": np.float64, "nu": np.float32, "d2d": np.float32}

# Devices per chunk in full-array passes: keeps temporaries small and in cache.
_CHUNK = 1 << 16
# Up to this many devices, a call's bookkeeping goes through Python lists (numpy's per-call cost dominates).
_FEW = 64

IntArray = npt.NDArray[np.integer]
FloatArray = npt.NDArray[np.float32]


class _SetConstants:
    """PCMParams' SET-model and read-noise constants as float32 scalars: what the arithmetic casts the Python floats to."""

    def __init__(self, p: PCMParams) -> None:
        self.params = p
        self.mean_offset = np.float32(p.set_mean_offset_us)
        self.decay = np.float32(-1.0 / p.history_pulses)
        self.std_slope = np.float32(p.set_std_slope)
        self.std_offset = np.float32(p.set_std_offset_us)
        self.std_history = np.float32(p.set_std_history_us)
        self.mean_slope = np.float32(p.set_mean_slope)
        self.mean_history = np.float32(p.set_mean_history_us)
        self.g_min = np.float32(p.g_min_us)
        self.g_max = np.float32(p.g_max_us)
        self.read_noise_rel = np.float32(p.read_noise_rel)
        self.read_noise_abs = np.float32(p.read_noise_abs_us)


class PCMArray:
    """A simulated array of PCM devices, seeded and vectorized; one call acts on many devices."""

    def __init__(self, n_devices: int, params: PCMParams | None = None, seed: int = 0, t: float = 0.0) -> None:
        """Fabricate n_devices devices, all freshly RESET at time t (s)."""
        if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)) or n_devices <= 0:
            raise ValueError(f"n_devices must be a positive integer, got {n_devices!r}")
        _check_time(t)
        self.params = params if params is not None else PCMParams()
        self._set_consts: _SetConstants | None = None
        self.seed = int(seed)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        p = self.params
        n = int(n_devices)
        self._now = float(t)
        self._g = np.empty(n, np.float32)
        self._pulses = np.zeros(n, np.uint32)
        self._t_prog = np.full(n, float(t), np.float64)
        # A lower bound on every device's t_prog (programming only moves t_prog forward): while
        # t - floor <= t0, no device has drifted and reads skip the per-device check.
        self._t_prog_floor = float(t)
        self._nu = np.empty(n, np.float32)
        self._d2d = np.empty(n, np.float32)
        for lo in range(0, n, _CHUNK):
            sl = slice(lo, min(lo + _CHUNK, n))
            m = sl.stop - sl.start
            nu = self._rng.standard_normal(m, dtype=np.float32)
            nu *= p.drift_nu_std
            nu += p.drift_nu_mean
            np.maximum(nu, 0, out=nu)
            self._nu[sl] = nu
            d2d = self._rng.standard_normal(m, dtype=np.float32)
            d2d *= p.d2d_update_spread
            d2d += 1.0
            np.maximum(d2d, 0, out=d2d)
            self._d2d[sl] = d2d
        self._g[:] = self._reset_values(n)

    # ------------------------------------------------------------------ properties
    @property
    def n_devices(self) -> int:
        return int(self._g.size)

    @property
    def now(self) -> float:
        """Latest time (s) any call has used; calls with an earlier time are refused."""
        return self._now

    @property
    def nbytes(self) -> int:
        """Bytes of per-device state held by this array."""
        return sum(a.nbytes for a in (self._g, self._pulses, self._t_prog, self._nu, self._d2d))

    def pulses_since_reset(self, addresses: IntArray | None = None) -> npt.NDArray[np.uint32]:
        """SET pulses each device has had since its last RESET (a copy)."""
        return self._pulses.copy() if addresses is None else self._pulses[self._addresses(addresses)]

    def drift_exponents(self) -> FloatArray:
        """Per-device drift exponent nu (a copy)."""
        return self._nu.copy()

    def update_factors(self) -> FloatArray:
        """Per-device multiplicative factor on the mean SET increment (a copy)."""
        return self._d2d.copy()

    # ------------------------------------------------------------------ programming
    def reset(self, addresses: IntArray, t: float) -> None:
        """RESET the devices at addresses at time t (s): G ~ N(reset_mean, reset_std^2) uS, history cleared."""
        addr = self._addresses(addresses)
        self._advance(t)
        self._reset_checked(addr, t)

    def set_pulses(self, addresses: IntArray, counts: IntArray, t: float) -> None:
        """Apply counts[i] SET pulses to device addresses[i] at time t (s), one pulse after another.

        Each pulse's increment is drawn from the device's state after the previous one; the loop
        runs over pulse number (at most max(counts) passes), never over devices.
        """
        addr = self._addresses(addresses)
        cnt = _counts(counts, addr.size)
        self._advance(t)
        self._set_checked(addr, cnt, t)

    def _reset_checked(self, addr: npt.NDArray[np.intp], t: float) -> None:
        self._g[addr] = self._reset_values(addr.size)
        self._pulses[addr] = 0
        self._t_prog[addr] = t

    def _set_checked(self, addr: npt.NDArray[np.intp], cnt: npt.NDArray[np.int64], t: float,
                     extra: int = 0) -> FloatArray | None:
        """The SET pulses; with extra > 0, extra more standard normal draws right after the pulses' own (the next
        read's noise, in one call), returned."""
        if cnt.size == 0:
            return self._rng.standard_normal(extra, dtype=np.float32) if extra else None
        if cnt.size <= _FEW:
            values = cnt.tolist()  # a training step's program: builtins on a list beat two numpy reductions
            lo, hi = min(values), max(values)
        else:
            lo, hi = np.minimum.reduce(cnt), np.maximum.reduce(cnt)
        if lo <= 0:
            keep = cnt > 0
            if not keep.any():
                return self._rng.standard_normal(extra, dtype=np.float32) if extra else None
            addr, cnt = addr[keep], cnt[keep]
        if hi > 1:
            # Devices sorted by pulse count, most first: the devices still pulsing in pass k are a prefix.
            order = np.argsort(-cnt, kind="stable")
            addr, cnt = addr[order], cnt[order]
            active = np.searchsorted(-cnt, -np.arange(1, int(cnt[0]) + 1), side="right").tolist()
        else:
            active = [addr.size]

        c = self._set_constants()
        g = self._drifted(addr, t)
        pulses = self._pulses[addr]
        mean_gain = self._d2d[addr]
        # Per-device constant part of the mean, folded in once: f * c1.
        base_mean = mean_gain * c.mean_offset
        n = addr.size
        # What does not depend on G is computed for all passes at once, in one flat buffer holding pass after
        # pass (pass k's devices are the prefix active[k]): the pulse number since RESET (float32(hist) + 1 in
        # the first pass, + 1 again in each next one), P = exp(-j / history_pulses), A2 * P and A1 * P, and the
        # pulse-to-pulse noise in one draw (the values one draw per pass gives, in the same order). Each pass
        # then does only the G-dependent part: the same float32 operations in the same order as the plain
        # expressions (sigma = m2 * g + c2 + A2 * P; mean = (m1 * g + A1 * P) * f + f * c1).
        total = n if len(active) == 1 else sum(active)
        hk = np.empty(total, np.float32)
        np.add(pulses, 1.0, out=hk[:n], dtype=np.float32)
        starts = [0]
        for m in active[1:]:
            prev = starts[-1]
            starts.append(prev + active[len(starts) - 1])
            np.add(hk[prev:prev + m], 1.0, out=hk[starts[-1]:starts[-1] + m])
        np.multiply(hk, c.decay, out=hk)
        np.exp(hk, out=hk)  # in place on a contiguous buffer, as before
        history_sigma = hk * c.std_history
        np.multiply(hk, c.mean_history, out=hk)  # hk is now A1 * P
        noise = self._rng.standard_normal(total + extra, dtype=np.float32)
        for o, m in zip(starts, active, strict=True):
            whole = m == n
            gk = g if whole else g[:m]
            sigma = gk * c.std_slope
            sigma += c.std_offset
            sigma += history_sigma[o:o + m]
            sigma *= noise[o:o + m]
            mean = gk * c.mean_slope
            mean += hk[o:o + m]
            mean *= mean_gain if whole else mean_gain[:m]
            mean += base_mean if whole else base_mean[:m]
            gk += mean
            gk += sigma
            np.maximum(gk, c.g_min, out=gk)  # clip, as minimum(maximum(g, lo), hi)
            np.minimum(gk, c.g_max, out=gk)
        self._g[addr] = g
        np.add(pulses, cnt, out=pulses, casting="unsafe")  # as pulses += cnt.astype(np.uint32), without the copy
        self._pulses[addr] = pulses
        self._t_prog[addr] = t
        return noise[total:] if extra else None

    def _set_constants(self) -> _SetConstants:
        """The SET model's and read noise's float32 constants, made once per params object."""
        c = self._set_consts
        if c is None or c.params is not self.params:
            c = self._set_consts = _SetConstants(self.params)
        return c

    def apply(self, addresses: IntArray, set_counts: IntArray, reset: npt.NDArray[np.bool_], t: float,
              *, validate: bool = True, has_reset: bool | None = None) -> None:
        """Apply one program at time t (s): RESET where reset is true, then the SET pulses.

        validate=False skips the address and count checks for a caller that has made them already
        (unique in-range integer addresses, non-negative integer counts, bool reset flags of one
        length); the time is always checked. Unchecked bad input corrupts the state. has_reset: whether
        any reset flag is true, if the caller knows (with validate=False only; else it is counted here).
        """
        if validate:
            addr = self._addresses(addresses)
            cnt = _counts(set_counts, addr.size)
            rst = np.asarray(reset)
            if rst.shape != addr.shape or rst.dtype != np.bool_:
                raise PulseCountError(f"reset must be a bool array of shape {addr.shape}, got {rst.dtype} {rst.shape}")
        else:
            addr, cnt, rst = addresses, set_counts, reset
        self._advance(t)
        if (np.count_nonzero(rst) > 0) if (validate or has_reset is None) else has_reset:
            self._reset_checked(addr[rst], t)
        self._set_checked(addr, cnt, t)

    def apply_and_read(self, addresses: IntArray, set_counts: IntArray, reset: npt.NDArray[np.bool_], t: float,
                       t_read: float, *, has_reset: bool | None = None) -> FloatArray:
        """apply(addresses, set_counts, reset, t, validate=False) and then read(addresses, t_read, validate=False),
        for a caller that has checked them: the same state and the same conductances (uS, float32) as the two
        calls, the read's noise drawn with the pulses' in one call (the values the two calls draw)."""
        self._advance(t)
        if (np.count_nonzero(reset) > 0) if has_reset is None else has_reset:
            self._reset_checked(addresses[reset], t)
        noise = self._set_checked(addresses, set_counts, t, extra=addresses.size)
        self._advance(t_read)
        out = self._drifted(addresses, t_read)
        self._add_read_noise(out, noise)
        return out

    def force_state(self, addresses: IntArray, g_us: float | FloatArray, pulses_since_reset: int | IntArray, t: float) -> None:
        """Put devices straight into a state, as if programmed to g_us (uS) at time t (s) after the
        given number of SET pulses since RESET. For studies and tests; a real chip has no such call."""
        addr = self._addresses(addresses)
        g = np.broadcast_to(np.asarray(g_us, np.float32), addr.shape)
        n = _counts(np.broadcast_to(np.asarray(pulses_since_reset), addr.shape), addr.size)
        p = self.params
        if not np.all(np.isfinite(g)) or g.min(initial=p.g_min_us) < p.g_min_us or g.max(initial=p.g_max_us) > p.g_max_us:
            raise ValueError(f"g_us must lie within [{p.g_min_us}, {p.g_max_us}] uS")
        self._advance(t)
        self._g[addr] = g
        self._pulses[addr] = n.astype(np.uint32)
        self._t_prog[addr] = t

    # ------------------------------------------------------------------ reading
    def conductance(self, addresses: IntArray | None, t: float) -> FloatArray:
        """Noise-free conductance (uS) at time t (s), after drift; does not touch the RNG."""
        addr = None if addresses is None else self._addresses(addresses)
        self._advance(t)
        if addr is not None:
            return self._drifted(addr, t)
        out = np.empty(self.n_devices, np.float32)
        for lo in range(0, self.n_devices, _CHUNK):
            sl = slice(lo, min(lo + _CHUNK, self.n_devices))
            self._drift_into(self._g[sl], self._t_prog[sl], self._nu[sl], t, out[sl])
        return out

    def read(self, addresses: IntArray | None, t: float, *, validate: bool = True) -> FloatArray:
        """Read conductances (uS, float32) at time t (s): drift, then read noise, clipped to bounds.

        addresses=None reads the whole array in address order. validate=False skips the address
        checks for a caller that has made them (unique in-range integers); the time is always checked.
        """
        if addresses is None:
            self._advance(t)
            out = np.empty(self.n_devices, np.float32)
            for lo in range(0, self.n_devices, _CHUNK):
                sl = slice(lo, min(lo + _CHUNK, self.n_devices))
                self._drift_into(self._g[sl], self._t_prog[sl], self._nu[sl], t, out[sl])
                self._add_read_noise(out[sl])
            return out
        addr = self._addresses(addresses) if validate else addresses
        self._advance(t)
        out = self._drifted(addr, t)
        self._add_read_noise(out)
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole chip state, RNG included, to path (atomically: a crash leaves the old file)."""
        write_atomic(path, self.to_bytes())

    def to_bytes(self) -> bytes:
        """The whole chip state, RNG included, as the bytes save() writes."""
        meta = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "seed": self.seed,
            "now": self._now,
            "params": self.params.model_dump(),
            "rng": self._rng.bit_generator.state,
        }
        return npz_bytes(meta, dict(zip(_STATE_ARRAYS, self._arrays(), strict=True)))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PCMArray:
        """Load a chip saved by save(); it continues exactly as the saved one would have."""
        data = read_state_bytes(path)
        return cls.from_bytes(data, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "chip state") -> PCMArray:
        """A chip from to_bytes() output; name says where the bytes came from, for errors."""
        try:
            meta, arrays = read_npz(data)
        except ValueError as e:
            raise StateFileError(f"{name} is not a readable pcm-hil chip state: {e}") from e
        if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
            raise StateFileError(f"{name} has format {meta.get('format')!r} version {meta.get('version')!r}; "
                                 f"expected {STATE_FORMAT!r} version {STATE_VERSION}")
        missing = [k for k in _STATE_ARRAYS if k not in arrays]
        if missing:
            raise StateFileError(f"{name} lacks the arrays {missing}")
        n = arrays["g"].size
        for k, dt in _STATE_ARRAYS.items():
            a = arrays[k]
            if a.dtype != dt or a.shape != (n,):
                raise StateFileError(f"{name}: array {k!r} has {a.dtype} {a.shape}, expected {np.dtype(dt)} ({n},)")
        self = cls.__new__(cls)
        self._set_consts = None
        try:
            self.params = PCMParams.model_validate(meta["params"])
            self.seed = int(meta["seed"])
            self._rng = np.random.Generator(np.random.PCG64())
            self._rng.bit_generator.state = meta["rng"]
            self._now = float(meta["now"])
        except (KeyError, TypeError, ValueError) as e:
            raise StateFileError(f"{name} has a malformed header: {e}") from e
        self._g, self._pulses, self._t_prog, self._nu, self._d2d = (arrays[k] for k in _STATE_ARRAYS)
        self._t_prog_floor = float(self._t_prog.min())
        return self

    def state_equal(self, other: PCMArray) -> bool:
        """True when other holds the same state, parameters and RNG position, bit for bit."""
        return (
            self.params == other.params
            and self._now == other._now
            and self._rng.bit_generator.state == other._rng.bit_generator.state
            and all(np.array_equal(a, b) for a, b in zip(self._arrays(), other._arrays(), strict=True))
        )

    # ------------------------------------------------------------------ internals
    def _arrays(self) -> tuple[np.ndarray, ...]:
        """The per-device state, in _STATE_ARRAYS order."""
        return (self._g, self._pulses, self._t_prog, self._nu, self._d2d)

    def _addresses(self, addresses: IntArray) -> npt.NDArray[np.intp]:
        a = np.asarray(addresses)
        if a.ndim != 1:
            raise AddressError(f"addresses must be a 1-D array, got shape {a.shape}")
        if a.size == 0:
            return a.astype(np.intp)
        if not np.issubdtype(a.dtype, np.integer):
            raise AddressError(f"addresses must be integers, got dtype {a.dtype}")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= self.n_devices:
            bad = lo if lo < 0 else hi
            raise AddressError(f"address {bad} is outside the array (0 .. {self.n_devices - 1})")
        s = np.sort(a)
        dup = np.flatnonzero(s[1:] == s[:-1])
        if dup.size:
            raise AddressError(f"address {int(s[dup[0]])} appears more than once in one call")
        return a.astype(np.intp, copy=False)

    def _advance(self, t: float) -> None:
        _check_time(t)
        if t < self._now:
            raise ClockError(f"time runs backward: t={t} s is before the chip's last event at {self._now} s")
        self._now = float(t)

    def _reset_values(self, n: int) -> FloatArray:
        p = self.params
        g = self._rng.standard_normal(n, dtype=np.float32)
        g *= p.reset_std_us
        g += p.reset_mean_us
        return np.clip(g, p.g_min_us, p.g_max_us, out=g)

    def _drifted(self, addr: npt.NDArray[np.intp], t: float) -> FloatArray:
        if t - self._t_prog_floor <= self.params.drift_t0_s:
            return self._g[addr]  # no device has drifted yet: t - t_prog <= t - floor for each
        t_prog = self._t_prog[addr]
        if addr.size == 0 or t - t_prog.min() <= self.params.drift_t0_s:
            return self._g[addr]  # nothing has drifted yet (a copy: fancy indexing)
        out = np.empty(addr.size, np.float32)
        self._drift_into(self._g[addr], t_prog, self._nu[addr], t, out)
        return out

    def _drift_into(self, g: FloatArray, t_prog: np.ndarray, nu: FloatArray, t: float, out: FloatArray) -> None:
        # ((t - t_p) / t0)^(-nu) = exp(-nu * log(max(t - t_p, t0) / t0))
        t0 = self.params.drift_t0_s
        ratio = np.subtract(t, t_prog)
        ratio *= 1.0 / t0
        np.maximum(ratio, 1.0, out=ratio)
        np.log(ratio, out=out)
        out *= nu
        np.negative(out, out=out)
        np.exp(out, out=out)
        out *= g

    def _add_read_noise(self, g: FloatArray, noise: FloatArray | None = None) -> None:
        """Read noise onto g in place; noise: its standard normal draws, if already drawn (one per device)."""
        c = self._set_constants()
        if noise is None:
            noise = self._rng.standard_normal(g.size, dtype=np.float32)
        noise *= c.read_noise_rel * g + c.read_noise_abs
        g += noise
        np.maximum(g, c.g_min, out=g)  # clip, as minimum(maximum(g, lo), hi)
        np.minimum(g, c.g_max, out=g)


def _check_time(t: float) -> None:
    if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)) or not math.isfinite(t):
        raise ClockError(f"time must be a finite number of seconds, got {t!r}")


def _counts(counts: IntArray, n: int) -> npt.NDArray[np.int64]:
    c = np.asarray(counts)
    if c.shape != (n,):
        raise PulseCountError(f"need one SET pulse count per address ({n}), got shape {c.shape}")
    if n == 0:
        return c.astype(np.int64)
    if not np.issubdtype(c.dtype, np.integer):
        raise PulseCountError(f"SET pulse counts must be integers, got dtype {c.dtype}")
    if c.min() < 0:
        i = int(np.argmin(c))
        raise PulseCountError(f"negative SET pulse count {int(c[i])} at position {i}")
    return c.astype(np.int64, copy=False)


def read_state_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a saved chip state file; StateFileError (one line naming the file) if it cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise StateFileError(f"no chip state file at {path}") from None
    except OSError as e:
        raise StateFileError(f"cannot read chip state {path}: {e}") from e
