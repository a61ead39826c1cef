"""The chip's measured pulse response, from the reads training makes anyway (docs/training.md).

Two running estimates, both in microsiemens:

- **increments**: every device an update program pulsed is read back right after it, and the host
  copy held its conductance before, so (G after - G before) / n is what each of its n SET pulses
  did. Binned per layer, by conductance before the program (G_EDGES_US) and by SET pulses since the
  device's last RESET (K_EDGES), with what the host's response law expects of the same pulses from
  the same conductances. Their ratio says how the chip compares with what the host assumes.
- **from RESET**: every program that RESETs a device and sets n pulses (initial programming,
  refresh, the probe) is read back too: the mean G after n pulses from RESET, which is what the
  open-loop pulse table (ArrayWeights.mean_response_us) predicts.

Samples are buffered and folded into the sums in batches (fold()), so the training step only pays
for a gather and a list append.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sim import PCMParams

#: Conductance bins (uS, G before the program): [0, 0.5), [0.5, 1), ..., [8, inf).
G_EDGES_US = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
#: Bins of SET pulses since the device's last RESET, before the program: 0, 1, 2, 3-4, 5-8, 9-16, 17+.
K_EDGES = (1, 2, 3, 5, 9, 17)
N_G, N_K = len(G_EDGES_US) + 1, len(K_EDGES) + 1
#: The sums kept per bin (rows of ResponseEstimator.sums).
PULSES, DG, DG2N, EXPECTED = range(4)
#: Buffered samples are folded in once this many have accumulated.
FOLD_AT = 8192


def g_bin_labels() -> list[str]:
    e = (0.0, *G_EDGES_US)
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(e, e[1:], strict=False)] + [f"{e[-1]:g}+"]


def k_bin_labels() -> list[str]:
    e = (0, *K_EDGES)
    out = []
    for lo, hi in zip(e, e[1:], strict=False):
        out.append(f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}")
    return out + [f"{e[-1]}+"]


@dataclass(frozen=True)
class ResponseLaw:
    """The mean SET increment the host assumes: mu = slope * G + offset_us + history_us * exp(-j / history_pulses),
    j the pulse number since RESET (1 for the first), G clipped to [g_min_us, g_max_us] (the model's mean law)."""

    slope: float
    offset_us: float
    history_us: float
    history_pulses: float
    g_min_us: float
    g_max_us: float

    @classmethod
    def from_params(cls, p: PCMParams) -> ResponseLaw:
        return cls(p.set_mean_slope, p.set_mean_offset_us, p.set_mean_history_us, p.history_pulses,
                   p.g_min_us, p.g_max_us)

    def expected_increment(self, g0_us: np.ndarray, k: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Expected G gain (uS) of n SET pulses from conductance g0_us on devices with k pulses since RESET."""
        g = np.asarray(g0_us, np.float64).copy()
        k = np.asarray(k, np.float64)
        n = np.asarray(n)
        for i in range(1, int(n.max(initial=0)) + 1):
            on = n >= i
            mu = self.slope * g + self.offset_us + self.history_us * np.exp(-(k + i) / self.history_pulses)
            g = np.where(on, np.clip(g + mu, self.g_min_us, self.g_max_us), g)
        return g - g0_us

    def mean_response(self, g_start_us: float, first_pulse: int, count: int) -> np.ndarray:
        """Mean G (uS) after 1..count more pulses from g_start_us, the first being pulse first_pulse since RESET."""
        out = np.empty(count)
        g = float(g_start_us)
        for i in range(count):
            j = first_pulse + i
            g = min(max(g + self.slope * g + self.offset_us + self.history_us * math.exp(-j / self.history_pulses),
                        self.g_min_us), self.g_max_us)
            out[i] = g
        return out


def extend_table(means_us: np.ndarray, count: int, g_max_us: float) -> np.ndarray:
    """count more mean G values (uS) past a probe's last, from a line fitted to the gain per pulse against G over
    the probe's second half (where the early-pulse history has faded); never falling, at most g_max_us."""
    if count <= 0:
        return np.zeros(0)
    m = np.asarray(means_us, np.float64)
    half = max(m.size // 2, 1)
    gain, prev = np.diff(m)[half - 1:], m[half - 1:-1]
    if prev.size >= 2 and np.ptp(prev) > 0:
        slope, offset = np.polyfit(prev, gain, 1)
    else:
        slope, offset = 0.0, float(gain.mean()) if gain.size else 0.0
    out = np.empty(count)
    g = float(m[-1])
    for i in range(count):
        g = min(g + max(slope * g + offset, 0.0), g_max_us)
        out[i] = g
    return out


class ResponseEstimator:
    """Running estimates of the chip's response per layer, bin and pulse count (see the module docstring).

    layer_of: per device address, its layer (-1: unmapped). cap: the most SET pulses one program may give
    a device (the from-RESET table's length is cap + 1).
    """

    def __init__(self, layer_of: np.ndarray, n_layers: int, law: ResponseLaw, cap: int) -> None:
        self.layer_of = layer_of
        self.n_layers = n_layers
        self.law = law
        self.cap = int(cap)
        self.sums = np.zeros((4, n_layers, N_G, N_K))
        self.devices = np.zeros((n_layers, N_G, N_K), np.int64)
        # per n = 0..cap: samples, sum of G, sum of G^2 (uS) after RESET + n SET pulses
        self.reset_sums = np.zeros((3, self.cap + 1))
        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0

    # ------------------------------------------------------------------ samples
    def add_increments(self, addresses: np.ndarray, n: np.ndarray, k: np.ndarray, g0_us: np.ndarray,
                       g1_us: np.ndarray) -> None:
        """Devices that got n >= 1 SET pulses (no RESET) with k pulses since RESET before, read g0 before, g1 after."""
        self._buf.append((addresses, n, k, g0_us, g1_us))
        self._buffered += addresses.size
        if self._buffered >= FOLD_AT:
            self.fold()

    def add_from_reset(self, n: np.ndarray, g_us: np.ndarray) -> None:
        """Devices read right after a RESET and n SET pulses (n <= cap)."""
        n = np.minimum(np.asarray(n, np.int64), self.cap)
        g = np.asarray(g_us, np.float64)
        m = self.cap + 1
        self.reset_sums[0] += np.bincount(n, minlength=m)
        self.reset_sums[1] += np.bincount(n, g, minlength=m)
        self.reset_sums[2] += np.bincount(n, g * g, minlength=m)

    def fold(self) -> None:
        """Fold the buffered increment samples into the sums (deterministic: same samples, same sums)."""
        if not self._buf:
            return
        parts = list(zip(*self._buf, strict=True))
        self._buf, self._buffered = [], 0
        addr, n, k, g0, g1 = (np.concatenate(p) for p in parts)
        layer = self.layer_of[addr]
        keep = (layer >= 0) & (n > 0)
        addr, n, k, g0, g1, layer = addr[keep], n[keep], k[keep], g0[keep], g1[keep], layer[keep]
        g0 = g0.astype(np.float64)
        dg = g1.astype(np.float64) - g0
        nf = n.astype(np.float64)
        idx = (layer * N_G + np.searchsorted(G_EDGES_US, g0, side="right")) * N_K \
            + np.searchsorted(K_EDGES, k, side="right")
        size = self.n_layers * N_G * N_K
        flat = self.sums.reshape(4, size)
        flat[PULSES] += np.bincount(idx, nf, size)
        flat[DG] += np.bincount(idx, dg, size)
        flat[DG2N] += np.bincount(idx, dg * dg / nf, size)
        flat[EXPECTED] += np.bincount(idx, self.law.expected_increment(g0, k, n), size)
        self.devices.reshape(size)[:] += np.bincount(idx, minlength=size)

    # ------------------------------------------------------------------ figures
    def layer_figures(self) -> list[dict[str, float]]:
        """Per layer: pulses seen, measured and expected mean increment per pulse (uS), and their ratio."""
        self.fold()
        out = []
        for layer in range(self.n_layers):
            s = self.sums[:, layer].reshape(4, -1).sum(axis=1)
            p = s[PULSES]
            out.append({"pulses": float(p),
                        "mean_us": s[DG] / p if p else math.nan,
                        "expected_us": s[EXPECTED] / p if p else math.nan,
                        "ratio": s[DG] / s[EXPECTED] if p and s[EXPECTED] > 0 else math.nan})
        return out

    def bin_table(self, layer: int) -> dict[str, Any]:
        """One layer's bins: pulses, measured and expected mean increment per pulse, spread (uS); NaN where empty."""
        self.fold()
        s = self.sums[:, layer]
        p = s[PULSES]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s[DG] / p
            spread = np.sqrt(np.maximum(s[DG2N] / p - mean * mean, 0.0))
            exp = s[EXPECTED] / p
        return {"g_bins_us": g_bin_labels(), "pulses_since_reset_bins": k_bin_labels(),
                "pulses": p.tolist(), "devices": self.devices[layer].tolist(),
                "mean_us": _nan_none(mean), "expected_us": _nan_none(exp), "spread_us": _nan_none(spread)}

    def from_reset_means(self) -> tuple[np.ndarray, np.ndarray]:
        """(samples, mean G in uS) after RESET + n pulses, n = 0..cap; NaN where no sample."""
        c = self.reset_sums[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            return c.copy(), np.where(c > 0, self.reset_sums[1] / np.maximum(c, 1), np.nan)

    def from_reset_ratio(self, table_us: np.ndarray, min_samples: int) -> tuple[float, float]:
        """(measured / table) gain above the RESET level, weighted by samples, over n >= 1; and the samples used."""
        c, mean = self.from_reset_means()
        base = mean[0] if c[0] >= min_samples else table_us[0]
        use = (np.arange(c.size) >= 1) & (c > 0)
        n = float(c[use].sum())
        if n < min_samples:
            return math.nan, n
        want = float(np.sum(c[use] * (table_us[: c.size][use] - table_us[0])))
        got = float(np.sum(c[use] * (mean[use] - base)))
        return (got / want if want > 0 else math.nan), n

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What a checkpoint keeps (buffered samples folded first)."""
        self.fold()
        return ({"law": asdict(self.law)},
                {"resp_sums": self.sums, "resp_devices": self.devices, "resp_reset": self.reset_sums})

    def load(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Restore state() (a checkpoint without it leaves the estimates empty)."""
        if "resp_sums" not in arrays:
            return
        self._buf, self._buffered = [], 0
        self.law = ResponseLaw(**meta["law"])
        self.sums[...] = arrays["resp_sums"]
        self.devices[...] = arrays["resp_devices"]
        self.reset_sums[...] = arrays["resp_reset"]


def _nan_none(a: np.ndarray) -> list:
    """A nested list for JSON, with None where a is NaN."""
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in np.atleast_2d(a)]


# ---------------------------------------------------------------------- figures of an ArrayWeights
# (aw: hil.array.ArrayWeights; typed loosely, array.py imports this module)

def _assumed_ratio(aw: Any, layer: int) -> float:
    """The ratio measured / expected the host's eps stands for: 1 on the model, what eps followed under "auto"."""
    if aw.auto is None:
        return 1.0
    return aw.eps[layer] / (aw.mapping.layers[layer].beta * aw.auto["base_eps_over_beta_us"][layer])


def mismatch(aw: Any, tolerance: float, min_pulses: int) -> tuple[str | None, dict[str, float]]:
    """(warning text, metrics) when the measured response is more than tolerance off the host's; (None, {}) if not."""
    est: ResponseEstimator = aw.response
    parts, metrics = [], {}
    for i, f in enumerate(est.layer_figures()):
        if f["pulses"] < min_pulses or not math.isfinite(f["ratio"]):
            continue
        rel = f["ratio"] / _assumed_ratio(aw, i)
        if abs(rel - 1.0) <= tolerance:
            continue
        e = aw.eps[i] / aw.mapping.layers[i].beta
        parts.append(f"layer {i}: {f['mean_us']:.3g} uS per SET pulse measured over {int(f['pulses']):,} pulses, "
                     f"where the host expects {f['expected_us'] * _assumed_ratio(aw, i):.3g} uS of the same pulses "
                     f"({rel:.2f}x; the host programs eps / beta = {e:.3g} uS per pulse, the chip's equivalent "
                     f"is {e * rel:.3g} uS)")
        metrics[f"response_mismatch_l{i}"] = rel
    r, n = est.from_reset_ratio(aw.mean_response_us, min_pulses)
    if math.isfinite(r) and abs(r - 1.0) > tolerance:
        parts.append(f"after RESET + n SET pulses, {int(n):,} devices gained {r:.2f}x what the open-loop pulse table "
                     f"assumes (refresh and initial weights land {r:.2f}x off)")
        metrics["response_mismatch_reset"] = r
    if not parts:
        return None, {}
    if aw.auto is None:
        advice = ("training on this chip with the assumed response will be poor: characterize it (pcm-hil "
                  "characterize) and set driver.params_file, or set update.eps = \"auto\"")
    else:
        advice = "the chip moved away from what the probe measured; eps and the open-loop table follow at checkpoints"
    return (f"the chip's pulse response differs from the host's by more than {tolerance:.0%}: "
            + "; ".join(parts) + f". {advice}", metrics)


def layer_metrics(aw: Any) -> dict[str, float]:
    """The run log's metrics of an evaluation (names in docs/training.md, "Measured response")."""
    est: ResponseEstimator = aw.response
    out: dict[str, float] = {}
    for i, f in enumerate(est.layer_figures()):
        out[f"eps_l{i}"] = aw.eps[i]
        out[f"response_l{i}_pulses"] = f["pulses"]
        for key in ("mean_us", "expected_us", "ratio"):
            if math.isfinite(f[key]):
                out[f"response_l{i}_{key}"] = f[key]
        s = est.sums[:, i]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s[DG] / s[PULSES]
        for gi, ki in zip(*np.nonzero(s[PULSES]), strict=True):
            out[f"response_l{i}_g{gi}_k{ki}_pulses"] = float(s[PULSES, gi, ki])
            out[f"response_l{i}_g{gi}_k{ki}_mean_us"] = float(mean[gi, ki])
    r, n = est.from_reset_ratio(aw.mean_response_us, 1)
    out["response_reset_devices"] = n
    if math.isfinite(r):
        out["response_reset_ratio"] = r
    return out


def summary(aw: Any, tolerance: float, warned: bool) -> dict[str, Any]:
    """The measured response as summary.json and Trainer.response_summary() give it (JSON-able, None for NaN)."""
    est: ResponseEstimator = aw.response
    layers = []
    for i, f in enumerate(est.layer_figures()):
        b = aw.mapping.layers[i].beta
        layers.append({"pulses": int(f["pulses"]), "mean_us": _num(f["mean_us"]), "expected_us": _num(f["expected_us"]),
                       "ratio": _num(f["ratio"]), "eps": aw.eps[i], "eps_over_beta_us": aw.eps[i] / b})
    count, mean = est.from_reset_means()
    r, n = est.from_reset_ratio(aw.mean_response_us, 1)
    top = int(min(count.size - 1, 20))
    return {"eps_auto": aw.auto is not None, "tolerance": tolerance, "mismatch_warned": warned, "layers": layers,
            "from_reset": {"devices": int(n), "ratio": _num(r), "pulses": list(range(top + 1)),
                           "measured_us": [_num(v) for v in mean[:top + 1]],
                           "samples": [int(c) for c in count[:top + 1]],
                           "table_us": [float(v) for v in aw.mean_response_us[:top + 1]]},
            "probe": aw.auto_state() if aw.auto is not None else None,
            "bins": [est.bin_table(i) for i in range(est.n_layers)]}


def _num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None
