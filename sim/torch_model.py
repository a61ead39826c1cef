"""The behavioral PCM model in torch, on a CPU or a CUDA device (sim/model.py PCMArray stays the reference).

Same laws, same parameters (sim.PCMParams), same public methods and the same statistical behaviour as
PCMArray: SET increments dG ~ N(f (m1 G + c1 + A1 P), (m2 G + c2 + A2 P)^2) drawn one pulse after another,
RESET, drift G(t) = G(t_p) ((t - t_p)/t0)^(-nu) after t0, read noise, clipping to the bounds, the per-device
nu and f drawn at fabrication. Conductances in microsiemens (uS), times in seconds on the caller's clock.

What differs: the random numbers come from a torch.Generator on the chip's device (not numpy's PCG64), so a
chip of a given seed is another draw than PCMArray's of that seed; a seed gives the same chip every time on the
same device type. Conductances, nu and f are float64 on the CPU and float32 on CUDA (see default_dtype);
programming times are float64 everywhere (a float32 time has ~0.5 s resolution after a few weeks of chip time).
Inputs are numpy arrays (addresses, counts, flags) and outputs numpy arrays, as PCMArray's, so drivers/mock.py
takes either model.

Imported only where driver.device is set (drivers/mock.py imports it lazily): the numpy path never loads torch.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from .errors import PulseCountError, SimError, StateFileError
from .files import npz_bytes, read_npz, write_atomic
from .model import PCMArray, _check_time, _counts, read_state_bytes
from .params import PCMParams

STATE_FORMAT = "pcm-hil-sim-torch-state"
STATE_VERSION = 1

# Per-device state arrays as saved: name -> numpy dtype ("model" = the chip's float dtype).
_STATE_ARRAYS = {"g": "model", "pulses": np.uint32, "t_prog": np.float64, "nu": "model", "d2d": "model"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Devices per chunk of a full read on the CPU: keeps the temporaries in cache.
_CHUNK = 1 << 16


class DeviceUnavailable(SimError, RuntimeError):
    """The torch device asked for does not exist or is not usable on this machine."""


def default_dtype(device: str | torch.device) -> torch.dtype:
    """float64 on the CPU, float32 on CUDA.

    On the CPU the extra precision costs little, and the torch model's rounding then stays far below the
    reference's float32, so what the tests compare is the statistics. On a GPU the passes are memory-bound
    elementwise kernels: float32 halves the bytes moved, most GPUs run float64 at 1/2 to 1/64 of the float32
    rate, and float32 is the reference's own precision for G, nu and f.
    """
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def check_device(device: str | torch.device) -> torch.device:
    """The torch.device for device ("cpu", "cuda", "cuda:1"); DeviceUnavailable when this machine lacks it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceUnavailable(f"{device!r} is not a torch device (use \"cpu\" or \"cuda\")") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"torch finds no CUDA device on this machine (torch {torch.__version__}, "
                                    "torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise DeviceUnavailable(f"{device!r}: the torch model runs on \"cpu\" or \"cuda\"")
    return dev


def _torch_seed(seed: int) -> int:
    """A 64-bit generator seed from the chip seed: torch's CPU generator keeps only 32 bits of what it is given,
    so seeds that differ above bit 31 would otherwise make the same chip."""
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])


class TorchPCMArray:
    """A simulated array of PCM devices in torch tensors on one device; the same laws and methods as PCMArray."""

    def __init__(self, n_devices: int, params: PCMParams | None = None, seed: int = 0, t: float = 0.0, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
        """Fabricate n_devices devices, all freshly RESET at time t (s), on device ("cpu" or "cuda").

        dtype (torch.float32 or torch.float64) of G, nu and f: default_dtype(device) unless given.
        """
        if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)) or n_devices <= 0:
            raise ValueError(f"n_devices must be a positive integer, got {n_devices!r}")
        _check_time(t)
        self.device = check_device(device)
        self.dtype = dtype if dtype is not None else default_dtype(self.device)
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {self.dtype}")
        self.params = params if params is not None else PCMParams()
        self.seed = int(seed)
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(_torch_seed(self.seed))
        p = self.params
        n = int(n_devices)
        self._now = float(t)
        self._t_prog = torch.full((n,), float(t), dtype=torch.float64, device=self.device)
        # A lower bound on every t_prog (programming only moves t_prog forward): while t - floor <= t0 no device
        # has drifted. Only a shortcut: the drift factor of an undrifted device is exactly 1 anyway.
        self._t_prog_floor = float(t)
        self._pulses = torch.zeros(n, dtype=torch.int32, device=self.device)
        self._nu = self._randn(n).mul_(p.drift_nu_std).add_(p.drift_nu_mean).clamp_(min=0.0)
        self._d2d = self._randn(n).mul_(p.d2d_update_spread).add_(1.0).clamp_(min=0.0)
        self._g = self._reset_values(n)

    # ------------------------------------------------------------------ properties
    @property
    def n_devices(self) -> int:
        return int(self._g.numel())

    @property
    def now(self) -> float:
        """Latest time (s) any call has used; calls with an earlier time are refused."""
        return self._now

    @property
    def backend(self) -> str:
        """"torch-cpu" or "torch-cuda" (drivers/mock.py puts it in the mock chip's identity)."""
        return f"torch-{self.device.type}"

    @property
    def nbytes(self) -> int:
        """Bytes of per-device state held by this array (on its device)."""
        return sum(a.element_size() * a.numel() for a in self._arrays())

    def pulses_since_reset(self, addresses: npt.ArrayLike | None = None) -> npt.NDArray[np.uint32]:
        """SET pulses each device has had since its last RESET (a numpy copy)."""
        p = self._pulses if addresses is None else self._pulses.index_select(0, self._index(self._addresses(addresses)))
        return p.cpu().numpy().astype(np.uint32)

    def drift_exponents(self) -> np.ndarray:
        """Per-device drift exponent nu (a numpy copy, in the chip's dtype)."""
        return self._nu.cpu().numpy().copy()

    def update_factors(self) -> np.ndarray:
        """Per-device multiplicative factor on the mean SET increment (a numpy copy, in the chip's dtype)."""
        return self._d2d.cpu().numpy().copy()

    # ------------------------------------------------------------------ programming
    def reset(self, addresses: npt.ArrayLike, t: float) -> None:
        """RESET the devices at addresses at time t (s): G ~ N(reset_mean, reset_std^2) uS, history cleared."""
        addr = self._addresses(addresses)
        self._advance(t)
        self._reset_checked(addr, t)

    def set_pulses(self, addresses: npt.ArrayLike, counts: npt.ArrayLike, t: float) -> None:
        """Apply counts[i] SET pulses to device addresses[i] at time t (s), one pulse after another.

        As PCMArray: each increment is drawn from the state after the previous pulse; the loop runs over
        pulse number (at most max(counts) passes over the devices still pulsing), never over devices.
        """
        addr = self._addresses(addresses)
        cnt = _counts(np.asarray(counts), addr.size)
        self._advance(t)
        self._set_checked(addr, cnt, t)

    def apply(self, addresses: npt.ArrayLike, set_counts: npt.ArrayLike, reset: npt.ArrayLike, t: float, *,
              validate: bool = True, has_reset: bool | None = None) -> None:
        """Apply one program at time t (s): RESET where reset is true, then the SET pulses.

        validate=False skips the address and count checks for a caller that has made them already (as
        PCMArray.apply); the time is always checked. Unchecked bad input corrupts the state. has_reset: whether
        any reset flag is set, if the caller counted them (as PCMArray.apply; unchecked, like the rest).
        """
        if validate:
            addr = self._addresses(addresses)
            cnt = _counts(np.asarray(set_counts), addr.size)
            rst = np.asarray(reset)
            if rst.shape != addr.shape or rst.dtype != np.bool_:
                raise PulseCountError(f"reset must be a bool array of shape {addr.shape}, got {rst.dtype} {rst.shape}")
        else:
            addr, cnt, rst = np.asarray(addresses), np.asarray(set_counts), np.asarray(reset)
        self._advance(t)
        if np.logical_or.reduce(rst) if (validate or has_reset is None) else has_reset:
            self._reset_checked(addr[rst], t)
        self._set_checked(addr, cnt, t)

    def force_state(self, addresses: npt.ArrayLike, g_us: float | npt.ArrayLike, pulses_since_reset: int | npt.ArrayLike,
                    t: float) -> None:
        """Put devices straight into a state, as if programmed to g_us (uS) at time t (s) after the given
        number of SET pulses since RESET. For studies and tests; a real chip has no such call."""
        addr = self._addresses(addresses)
        g = np.broadcast_to(np.asarray(g_us, np.float64), addr.shape)
        n = _counts(np.broadcast_to(np.asarray(pulses_since_reset), addr.shape), addr.size)
        p = self.params
        if not np.all(np.isfinite(g)) or g.min(initial=p.g_min_us) < p.g_min_us or g.max(initial=p.g_max_us) > p.g_max_us:
            raise ValueError(f"g_us must lie within [{p.g_min_us}, {p.g_max_us}] uS")
        self._advance(t)
        idx = self._index(addr)
        self._g.index_copy_(0, idx, _tensor(g, np.float32 if self.dtype == torch.float32 else np.float64, self.device))
        self._pulses.index_copy_(0, idx, _tensor(n, np.int32, self.device))
        self._t_prog.index_fill_(0, idx, float(t))

    # ------------------------------------------------------------------ reading
    def conductance(self, addresses: npt.ArrayLike | None, t: float) -> npt.NDArray[np.float32]:
        """Noise-free conductance (uS, float32 numpy) at time t (s), after drift; does not touch the RNG."""
        idx = None if addresses is None else self._index(self._addresses(addresses))
        self._advance(t)
        return _to_numpy(self._drifted(idx, t))

    def read(self, addresses: npt.ArrayLike | None, t: float, *, validate: bool = True) -> npt.NDArray[np.float32]:
        """Read conductances (uS, float32 numpy) at time t (s): drift, then read noise, clipped to bounds.

        addresses=None reads the whole array in address order. validate=False skips the address checks for a
        caller that has made them (unique in-range integers); the time is always checked.
        """
        if addresses is None and self.device.type == "cpu":
            # In cache-sized chunks straight into the float32 result, as the numpy model does: a whole-array pass
            # per operation would stream each 8 MB temporary through memory a dozen times.
            self._advance(t)
            out = np.empty(self.n_devices, np.float32)
            dest = torch.from_numpy(out)
            for lo in range(0, self.n_devices, _CHUNK):
                x = self._drifted(slice(lo, lo + _CHUNK), t)
                self._add_read_noise(x)
                dest[lo:lo + _CHUNK] = x
            return out
        return _to_numpy(self.read_tensor(addresses, t, validate=validate))

    def read_tensor(self, addresses: npt.ArrayLike | None, t: float, *, validate: bool = True) -> torch.Tensor:
        """read(), as a tensor on the chip's device in its dtype (no copy to the host), for studies on the GPU."""
        if addresses is None:
            self._advance(t)
            out = self._drifted(None, t)
        else:
            addr = self._addresses(addresses) if validate else np.asarray(addresses)
            self._advance(t)
            out = self._drifted(self._index(addr), t)
        self._add_read_noise(out)
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole chip state, RNG included, to path (atomically: a crash leaves the old file)."""
        write_atomic(path, self.to_bytes())

    def to_bytes(self) -> bytes:
        """The whole chip state, RNG included, as the bytes save() writes (an npz with a JSON header)."""
        meta = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "seed": self.seed,
            "now": self._now,
            "params": self.params.model_dump(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device.type,
        }
        arrays = {k: a.cpu().numpy() for k, a in zip(_STATE_ARRAYS, self._arrays(), strict=True)}
        arrays["pulses"] = arrays["pulses"].astype(np.uint32)
        arrays["rng"] = self._gen.get_state().numpy()
        return npz_bytes(meta, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device | None = None) -> TorchPCMArray:
        """Load a chip saved by save(); it continues exactly as the saved one would have.

        device: where to put it (default: the device type it was saved on; another type is refused, since a
        CPU generator's state cannot continue on CUDA or back).
        """
        data = read_state_bytes(path)
        return cls.from_bytes(data, str(path), device=device)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "chip state", device: str | torch.device | None = None) -> TorchPCMArray:
        """A chip from to_bytes() output; name says where the bytes came from, for errors."""
        try:
            meta, arrays = read_npz(data)
        except ValueError as e:
            raise StateFileError(f"{name} is not a readable pcm-hil chip state: {e}") from e
        if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
            raise StateFileError(f"{name} has format {meta.get('format')!r} version {meta.get('version')!r}; "
                                 f"expected {STATE_FORMAT!r} version {STATE_VERSION}")
        dtype = _DTYPES.get(str(meta.get("dtype")))
        saved_on = meta.get("device")
        if dtype is None or saved_on not in ("cpu", "cuda"):
            raise StateFileError(f"{name} has a malformed header: dtype {meta.get('dtype')!r}, device {saved_on!r}")
        dev = check_device(device if device is not None else saved_on)
        if dev.type != saved_on:
            raise StateFileError(f"{name} was saved on {saved_on}; its random-number state cannot continue on "
                                 f"{dev.type}")
        missing = [k for k in (*_STATE_ARRAYS, "rng") if k not in arrays]
        if missing:
            raise StateFileError(f"{name} lacks the arrays {missing}")
        n = arrays["g"].size
        np_model = np.float32 if dtype == torch.float32 else np.float64
        for k, dt in _STATE_ARRAYS.items():
            a, want = arrays[k], np.dtype(np_model if dt == "model" else dt)
            if a.dtype != want or a.shape != (n,) or n == 0:
                raise StateFileError(f"{name}: array {k!r} has {a.dtype} {a.shape}, expected {want} ({n},)")
        self = cls.__new__(cls)
        self.device, self.dtype = dev, dtype
        try:
            self.params = PCMParams.model_validate(meta["params"])
            self.seed = int(meta["seed"])
            self._now = float(meta["now"])
            self._gen = torch.Generator(device=dev)
            self._gen.set_state(torch.from_numpy(np.ascontiguousarray(arrays["rng"], np.uint8)))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise StateFileError(f"{name} has a malformed header: {e}") from e
        t = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])).to(dev) for k in _STATE_ARRAYS}
        self._g, self._t_prog, self._nu, self._d2d = t["g"], t["t_prog"], t["nu"], t["d2d"]
        self._pulses = torch.from_numpy(arrays["pulses"].astype(np.int32)).to(dev)
        self._t_prog_floor = float(arrays["t_prog"].min())
        return self

    def state_equal(self, other: Any) -> bool:
        """True when other holds the same state, parameters and RNG position, bit for bit."""
        return (
            isinstance(other, TorchPCMArray)
            and self.params == other.params
            and self._now == other._now
            and self.dtype == other.dtype
            and self.device.type == other.device.type
            and torch.equal(self._gen.get_state(), other._gen.get_state())
            and all(torch.equal(a, b.to(a.device)) for a, b in zip(self._arrays(), other._arrays(), strict=True))
        )

    def __deepcopy__(self, memo: dict) -> TorchPCMArray:
        # torch.Generator does not deep-copy; the saved form holds everything, RNG position included.
        return TorchPCMArray.from_bytes(self.to_bytes(), device=self.device)

    # ------------------------------------------------------------------ internals
    def _arrays(self) -> tuple[torch.Tensor, ...]:
        """The per-device state, in _STATE_ARRAYS order."""
        return (self._g, self._pulses, self._t_prog, self._nu, self._d2d)

    def _addresses(self, addresses: npt.ArrayLike) -> npt.NDArray[np.intp]:
        # The reference's checks and messages (it only needs n_devices from self).
        return PCMArray._addresses(self, addresses)  # type: ignore[arg-type]

    def _index(self, addr: np.ndarray) -> torch.Tensor:
        return _tensor(addr, np.int64, self.device)

    def _advance(self, t: float) -> None:
        PCMArray._advance(self, t)  # type: ignore[arg-type]

    def _randn(self, n: int) -> torch.Tensor:
        # float32 standard normals, as the reference draws, in the chip's dtype: torch's CPU float64 normal
        # sampler is ~4x slower than its float32 one, and a draw's precision is not what the model's statistics
        # rest on (torch's float32 sampler is Box-Muller on 24-bit uniforms: no draw beyond ~5.8 sigma).
        z = torch.randn(n, generator=self._gen, dtype=torch.float32, device=self.device)
        return z if self.dtype == torch.float32 else z.to(self.dtype)

    def _reset_values(self, n: int) -> torch.Tensor:
        p = self.params
        return self._randn(n).mul_(p.reset_std_us).add_(p.reset_mean_us).clamp_(p.g_min_us, p.g_max_us)

    def _reset_checked(self, addr: np.ndarray, t: float) -> None:
        if addr.size == 0:
            return
        idx = self._index(addr)
        self._g.index_copy_(0, idx, self._reset_values(addr.size))
        self._pulses.index_fill_(0, idx, 0)
        self._t_prog.index_fill_(0, idx, float(t))

    def _set_checked(self, addr: np.ndarray, cnt: np.ndarray, t: float) -> None:
        if cnt.size == 0:
            return
        if np.minimum.reduce(cnt) <= 0:
            keep = cnt > 0
            if not keep.any():
                return
            addr, cnt = addr[keep], cnt[keep]
        if np.maximum.reduce(cnt) > 1:
            # Devices sorted by pulse count, most first: the devices still pulsing in pass k are a prefix,
            # so each pass works on views (no gather per pass). Sorted on the host: the counts come from there.
            order = np.argsort(-cnt, kind="stable")
            addr, cnt = addr[order], cnt[order]
            active = np.searchsorted(-cnt, -np.arange(1, int(cnt[0]) + 1), side="right").tolist()
        else:
            active = [addr.size]
        p = self.params
        idx = self._index(addr)
        g = self._drifted(idx, t)
        f = self._d2d.index_select(0, idx)
        # The law folded into per-device factors once per call, so a pass is 10 elementwise operations (kernel
        # launches on a GPU): G' = G (1 + f m1) + f c1 + f A1 P + sigma z, sigma = m2 G + c2 + A2 P, where
        # P = exp(-n/a) for pulse number n = hist + k steps by the factor exp(-1/a) from pass to pass.
        keep = f.mul(p.set_mean_slope).add_(1.0)
        base = f.mul(p.set_mean_offset_us)
        f_a1 = f.mul_(p.set_mean_history_us)
        pk = self._pulses.index_select(0, idx).to(self.dtype).add_(1.0).mul_(-1.0 / p.history_pulses).exp_()
        step = math.exp(-1.0 / p.history_pulses)
        z = self._randn(sum(active))  # every pass's draws in one call: pass k's follow pass k-1's
        sigma_buf = torch.empty(addr.size, dtype=self.dtype, device=self.device)
        off = 0
        for m in active:
            gk, pm, sigma = g[:m], pk[:m], sigma_buf[:m]
            torch.mul(gk, p.set_std_slope, out=sigma).add_(pm, alpha=p.set_std_history_us).add_(p.set_std_offset_us)
            sigma.mul_(z[off:off + m])
            off += m
            gk.mul_(keep[:m]).add_(base[:m]).addcmul_(f_a1[:m], pm).add_(sigma).clamp_(p.g_min_us, p.g_max_us)
            pm.mul_(step)
        self._g.index_copy_(0, idx, g)
        self._pulses.index_add_(0, idx, _tensor(cnt, np.int32, self.device))  # unique: exact
        self._t_prog.index_fill_(0, idx, float(t))

    def _drifted(self, idx: torch.Tensor | slice | None, t: float) -> torch.Tensor:
        """G at time t (s) of the devices at idx (an index tensor, a slice, or all when None), as a new tensor."""
        if idx is None:
            idx = slice(None)
        # index_select, not a[idx]: torch's advanced indexing is slower on the CPU (2.6x for 10,000 of 1e6, measured).
        take = (lambda a: a[idx]) if isinstance(idx, slice) else (lambda a: a.index_select(0, idx))
        g = self._g[idx].clone() if isinstance(idx, slice) else take(self._g)
        if t - self._t_prog_floor <= self.params.drift_t0_s:
            return g  # no device has drifted yet: t - t_prog <= t - floor for each
        t_prog, nu = take(self._t_prog), take(self._nu)
        # ((t - t_p) / t0)^(-nu) = exp(-nu * log(max(t - t_p, t0) / t0)); the time difference in float64.
        x = torch.rsub(t_prog, t).mul_(1.0 / self.params.drift_t0_s).clamp_(min=1.0).log_().to(self.dtype)
        return g.mul_(x.mul_(nu).neg_().exp_())

    def _add_read_noise(self, g: torch.Tensor) -> None:
        p = self.params
        sigma = torch.mul(g, p.read_noise_rel).add_(p.read_noise_abs_us)
        g.add_(sigma.mul_(self._randn(g.numel()))).clamp_(p.g_min_us, p.g_max_us)


def _tensor(a: npt.ArrayLike, dtype: type, device: torch.device) -> torch.Tensor:
    """A tensor on device holding a copy of a (the caller's array may be read-only, as a PulseProgram's are, and
    torch.from_numpy warns about those)."""
    return torch.from_numpy(np.array(a, dtype, copy=True)).to(device)


def _to_numpy(x: torch.Tensor) -> npt.NDArray[np.float32]:
    """A float32 numpy array the caller owns (the driver contract's conductances)."""
    return x.to(device="cpu", dtype=torch.float32).numpy()
