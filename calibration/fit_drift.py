"""Fit of the drift law: the onset t0 and the distribution of the drift exponent nu over devices."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import optimize

from .data import DriftData
from .errors import FitDidNotConverge, InsufficientData
from .fit_results import Bounds, DriftFit, Estimate, FloatArray, ReadNoiseFit
from .progress import NoProgress, Reporter

#: Drift is fitted on devices whose relative read noise s(G)/G is below this (others carry no drift signal).
DRIFT_MAX_REL_NOISE = 0.1

def _drift_profile(y: FloatArray, tau: FloatArray, wdev: FloatArray, t0: float) -> tuple[float, FloatArray, FloatArray]:
    """Weighted SSE of per-device lines log G = log G0 - nu log(max(tau, t0)/t0); returns sse, nu, log G0."""
    lx = np.log(np.maximum(tau, t0) / t0)
    lc = lx - lx.mean()
    sxx = float(lc @ lc)
    ym = y.mean(axis=0)
    slope = (lc @ (y - ym)) / sxx
    sse = ((y - ym) ** 2).sum(axis=0) - slope ** 2 * sxx
    return float(wdev @ sse), -slope, ym - slope * lx.mean()


def _fit_drift_once(y: FloatArray, tau: FloatArray, wdev: FloatArray, q2: FloatArray, cnt: FloatArray) -> FloatArray:
    """t0 (s), mean and variance of nu; cnt: how often each device counts (1, or bootstrap multiplicity)."""
    lo, hi = math.log(tau[0]), math.log(tau[-3])
    wsse = wdev * cnt
    res = optimize.minimize_scalar(lambda lt: _drift_profile(y, tau, wsse, math.exp(lt))[0], bounds=(lo, hi),
                                   method="bounded", options={"xatol": 1e-6})
    if not res.success:
        raise FitDidNotConverge("drift", str(res.message))
    if res.x - lo < 0.02 * (hi - lo) or hi - res.x < 0.02 * (hi - lo):
        raise FitDidNotConverge("drift", f"the drift onset t0 ran to the edge of the measured span "
                                f"[{tau[0]:.3g}, {tau[-3]:.3g}] s (t0 = {math.exp(res.x):.3g} s): read earlier and longer")
    t0 = math.exp(float(res.x))
    _, nu, _ = _drift_profile(y, tau, wsse, t0)
    lx = np.log(np.maximum(tau, t0) / t0)
    sxx = float(((lx - lx.mean()) ** 2).sum())
    # Devices count equally in the moments of nu: the exponent does not depend on a device's noise level.
    mean = float(np.average(nu, weights=cnt))
    var = (float(np.average((nu - mean) ** 2, weights=cnt)) * cnt.sum() / (cnt.sum() - 1)
           - float(np.average(q2, weights=cnt)) / sxx)
    return np.array([t0, mean, var])


def fit_drift(d: DriftData, rn: ReadNoiseFit, bounds: Bounds, warn: Callable[[str], None],
              bootstrap: int = 40, seed: int = 0, progress: Reporter | None = None) -> DriftFit:
    """Fit the drift onset t0 (s) and the distribution of the drift exponent nu over devices."""
    tau = d.t_s - d.t_prog_s
    if tau.size < 6 or np.any(tau <= 0) or np.any(np.diff(tau) <= 0):
        raise InsufficientData(f"the drift reads need at least 6 increasing times after programming, got {tau.tolist()}")
    g = d.reads_us
    dev = g.mean(axis=0)
    rel = rn.sd(dev) / np.maximum(dev, 1e-12)
    keep = ~bounds.clipped(g).any(axis=0) & (g.min(axis=0) > 0) & (rel < DRIFT_MAX_REL_NOISE)
    if keep.sum() < 10:
        raise InsufficientData(f"only {int(keep.sum())} drift devices read above the read noise (s(G)/G < "
                               f"{DRIFT_MAX_REL_NOISE}) without clipping; program the drift levels higher")
    y = np.log(g[:, keep])
    q2 = rel[keep] ** 2  # variance of log G per read
    wdev_full = 1.0 / q2
    wdev = wdev_full / wdev_full.mean()
    est = _fit_drift_once(y, tau, wdev, q2, np.ones(y.shape[1]))
    rng = np.random.default_rng(seed)
    m = y.shape[1]
    boot = []
    with (progress or NoProgress()).task("fit: drift (bootstrap)", bootstrap) as tick:
        for _ in range(bootstrap):
            cnt = np.bincount(rng.integers(0, m, m), minlength=m).astype(np.float64)
            try:
                boot.append(_fit_drift_once(y, tau, wdev, q2, cnt))
            except FitDidNotConverge:
                boot.append(np.full(3, np.nan))
            tick()
    se = np.nanstd(np.array(boot), axis=0, ddof=1) if bootstrap > 1 else np.full(3, np.nan)
    t0, nu_mean, nu_var = est
    if nu_var <= 0:
        warn(f"device-to-device spread of the drift exponent not resolved (variance {nu_var:.3g}); drift_nu_std set to 0")
        nu_std = Estimate(0.0, math.sqrt(max(se[2], 0.0)))
    else:
        nu_std = Estimate(math.sqrt(nu_var), se[2] / (2 * math.sqrt(nu_var)))
    _, nu, lg0 = _drift_profile(y, tau, wdev, t0)
    return DriftFit(Estimate(t0, se[0]), Estimate(nu_mean, se[1]), nu_std, int(keep.sum()), np.exp(lg0), nu,
                    d.levels[keep], tau, g[:, keep])
