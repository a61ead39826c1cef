"""Fit the behavioral PCM model (sim.PCMParams) to what the experiments measured, with uncertainties.

Every read carries noise of standard deviation s(G) = rel * G + abs (fitted first, from repeated
reads). Measured SET increments are differences of two noisy reads, and the conductance they are
regressed on is itself a noisy read that shares its noise with the increment; the fits remove both
effects exactly in expectation (corrected least squares, the read-noise variance taken off the
increment variance). Uncertainties are standard errors from a bootstrap over devices (the reads of
one device are correlated, devices are independent). A fit that does not converge, or that runs
to the edge of its search range, raises FitDidNotConverge naming the fit and the reason.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import optimize

from drivers.program import PulseShapes
from sim import PCMArray, PCMParams

from .data import MIN_DEVICES, MIN_PULSES, CalibrationData, NoiseData, PulseData
from .errors import FitDidNotConverge, InsufficientData
from .fit_drift import fit_drift
from .fit_results import Bounds, CalibrationWarning, DriftFit, Estimate, FloatArray, IncrementFit, ReadNoiseFit
from .progress import NoProgress, Reporter



@dataclass(frozen=True)
class ModelFit:
    """Everything fitted, the PCMParams it makes, eps both ways, and the warnings raised on the way."""

    params: PCMParams
    bounds: Bounds
    read_noise: ReadNoiseFit
    reset_mean: Estimate
    reset_std: Estimate
    increments: IncrementFit
    drift: DriftFit | None
    eps_model_us: float
    eps_measured_us: Estimate
    eps_by_shape: list[tuple[float, float, Estimate]]  # (amplitude uA, width ns, eps measured)
    not_measured: list[str]
    warnings: list[str] = field(default_factory=list)

    def uncertainties(self) -> dict[str, float]:
        """Standard error of each fitted PCMParams field (uS, s or dimensionless as the field)."""
        inc = self.increments
        se = {"g_min_us": 0.0 if self.bounds.min_reached else math.nan,
              "g_max_us": 0.0 if self.bounds.max_reached else math.nan,
              "set_mean_slope": inc.m1.se, "set_mean_offset_us": inc.c1.se, "set_mean_history_us": inc.a1.se,
              "set_std_slope": inc.m2.se, "set_std_offset_us": inc.c2.se, "set_std_history_us": inc.a2.se,
              "history_pulses": inc.history.se, "reset_mean_us": self.reset_mean.se, "reset_std_us": self.reset_std.se,
              "read_noise_rel": self.read_noise.rel.se, "read_noise_abs_us": self.read_noise.abs_us.se,
              "d2d_update_spread": inc.d2d.se}
        if self.drift is not None:
            se |= {"drift_t0_s": self.drift.t0.se, "drift_nu_mean": self.drift.nu_mean.se,
                   "drift_nu_std": self.drift.nu_std.se}
        return se


# ---------------------------------------------------------------------------------------------- checks
def check_reads(data: CalibrationData) -> None:
    """Refuse data that cannot be fitted: too few devices or pulses, non-finite, all zero, no response."""
    if data.n_devices < MIN_DEVICES:
        raise InsufficientData(f"{data.n_devices} devices are too few for a meaningful fit; use at least {MIN_DEVICES}")
    k = data.pulse[0].n_pulses
    if k < MIN_PULSES:
        raise InsufficientData(f"{k} SET pulses are too few to fit the pulse-history term; use at least {MIN_PULSES}")
    g = data.all_reads()
    if not np.all(np.isfinite(g)):
        raise InsufficientData(f"{int(np.sum(~np.isfinite(g)))} reads are not finite numbers")
    if np.all(g == 0):
        raise InsufficientData("every read is zero: is the array connected, and the read range right?")
    if g.max() == g.min():
        raise InsufficientData(f"every read is {g.max()} uS: the reads are saturated or stuck")
    r = data.pulse[0].reads_us
    gain = r[-1] - r[0]
    if gain.mean() <= 3 * gain.std() / math.sqrt(gain.size):
        raise InsufficientData(f"{k} SET pulses raised the mean conductance by only {gain.mean():.3g} uS "
                               f"(reads from {r[0].mean():.3g} to {r[-1].mean():.3g} uS): the pulses do not SET the "
                               "devices, or the reads are saturated")


def detect_bounds(g: np.ndarray) -> Bounds:
    """The conductance bounds (uS): a bound is reached where several reads sit exactly on the extreme value."""
    lo, hi = float(g.min()), float(g.max())
    # Continuous noise almost never repeats the extreme value exactly; a clipping chip repeats it often.
    lo_hits = int(np.count_nonzero(g == lo))
    hi_hits = int(np.count_nonzero(g == hi))
    return Bounds(lo, hi, lo_hits >= 3, hi_hits >= 3)


# ---------------------------------------------------------------------------------------------- read noise
def fit_read_noise(noise: NoiseData, bounds: Bounds) -> ReadNoiseFit:
    """Fit s(G) = rel * G + abs (uS) by maximum likelihood on per-device sample variances of repeated reads."""
    sets = [noise.after_reset_us, noise.after_pulses_us]
    means, variances = [], []
    r = noise.after_reset_us.shape[0]
    for s in sets:
        keep = ~bounds.clipped(s).any(axis=0)
        means.append(s[:, keep].mean(axis=0))
        variances.append(s[:, keep].var(axis=0, ddof=1))
    m = np.concatenate(means)
    v = np.concatenate(variances)
    if m.size < 20:
        raise InsufficientData(f"only {m.size} devices read without clipping in the read-noise experiment; "
                               "the read noise cannot be fitted")
    if np.ptp(m) < 0.1 * max(float(np.abs(m).max()), 1e-9):
        raise InsufficientData("the read-noise devices all sit at one conductance; the noise cannot be split into a "
                               "part proportional to G and a constant part")
    # Start from least squares of the sample sd on the mean.
    sd = np.sqrt(v)
    x0 = np.polyfit(m, sd, 1)
    x0 = np.maximum(x0, [1e-4, 1e-4])

    def nll(theta: np.ndarray) -> float:
        s2 = (theta[0] * m + theta[1]) ** 2
        return float(np.sum(np.log(s2) + v / s2))

    res = optimize.minimize(nll, x0, method="L-BFGS-B", bounds=[(0.0, None), (1e-9, None)])
    if not res.success:
        raise FitDidNotConverge("read-noise", str(res.message))
    rel, ab = (float(x) for x in res.x)
    s = rel * m + ab
    # Fisher information of (rel, abs) from chi-square sample variances with r - 1 degrees of freedom.
    x = np.stack([m, np.ones_like(m)], axis=1) / s[:, None]
    info = 2.0 * (r - 1) * (x.T @ x)
    cov = np.linalg.inv(info)
    return ReadNoiseFit(Estimate(rel, math.sqrt(cov[0, 0])), Estimate(ab, math.sqrt(cov[1, 1])), m, sd)


# ---------------------------------------------------------------------------------------------- RESET
def fit_reset(noise: NoiseData, rn: ReadNoiseFit, bounds: Bounds, warn: Callable[[str], None],
              bootstrap: int = 40, seed: int = 0, progress: Reporter | None = None) -> tuple[Estimate, Estimate]:
    """RESET distribution (uS) from repeated reads after RESET, read-noise variance taken off.

    Device means when no read sits at the lower bound; a normal censored at the bound (Tobit, on the
    pooled reads, errors by a bootstrap over devices) when some do.
    """
    g = noise.after_reset_us
    r, n = g.shape
    at_bound = float(bounds.clipped(g).mean())
    if at_bound <= 0.001:
        dev = g.mean(axis=0)
        mean = float(dev.mean())
        var_dev = float(dev.var(ddof=1))
        var = var_dev - float(np.mean(rn.sd(dev) ** 2)) / r
        se_mean = math.sqrt(var_dev / n)
        se_var = var_dev * math.sqrt(2.0 / (n - 1))
    else:
        warn(f"{at_bound:.0%} of the reads after RESET sit at a conductance bound ({bounds.g_min:.4g} uS): the RESET "
             "distribution is fitted as a normal censored there")
        est = _tobit_reset(g, rn, bounds)
        rng = np.random.default_rng(seed)
        resamples = max(bootstrap // 2, 2)
        with (progress or NoProgress()).task("fit: RESET distribution (censored, bootstrap)", resamples) as tick:
            boot_list = []
            for _ in range(resamples):
                boot_list.append(_tobit_reset(g[:, rng.integers(0, n, n)], rn, bounds))
                tick()
        boot = np.array(boot_list)
        mean, var = est
        se_mean, se_var = (float(x) for x in boot.std(axis=0, ddof=1))
    if var <= 0:
        warn(f"the spread of RESET conductances is below the read noise's resolution (variance {var:.3g} uS^2 "
             f"+- {se_var:.2g}); reset_std_us is set to 0")
        return Estimate(mean, se_mean), Estimate(0.0, math.sqrt(se_var))
    std = math.sqrt(var)
    return Estimate(mean, se_mean), Estimate(std, se_var / (2 * std))


def _tobit_reset(g: FloatArray, rn: ReadNoiseFit, bounds: Bounds) -> tuple[float, float]:
    """Mean and variance (less read noise) of a normal whose draws below the lower bound read as the bound."""
    from scipy.stats import norm

    x = g.ravel()
    lo = bounds.g_min
    cens = x <= lo
    xo = x[~cens]
    nc = int(cens.sum())

    def nll(th: np.ndarray) -> float:
        mu, ls = th
        sd = math.exp(ls)
        return -(norm.logpdf(xo, mu, sd).sum() + nc * norm.logcdf((lo - mu) / sd))

    x0 = np.array([float(np.median(x)), math.log(max(float(x.std()), 1e-3))])
    res = optimize.minimize(nll, x0, method="Nelder-Mead", options={"xatol": 1e-7, "fatol": 1e-9, "maxiter": 2000})
    if not res.success:
        raise FitDidNotConverge("RESET distribution", str(res.message))
    mu, sd = float(res.x[0]), math.exp(float(res.x[1]))
    return mu, sd ** 2 - float(rn.sd(max(mu, 0.0))) ** 2


# ---------------------------------------------------------------------------------------------- increments
@dataclass
class _Rows:
    """SET increments as (device, pulse number) matrices; mask: the increments used."""

    x: FloatArray  # read before the pulse (N, K)
    y: FloatArray  # increment (N, K)
    u: FloatArray  # read-noise variance of the read before (N, K)
    v: FloatArray  # read-noise variance of the read after (N, K)
    mask: npt.NDArray[np.bool_]
    n: FloatArray  # pulse numbers 1..K (K,)


def _rows(p: PulseData, rn: ReadNoiseFit, bounds: Bounds) -> _Rows:
    r = p.reads_us.T  # (N, K + 1)
    x, end = r[:, :-1], r[:, 1:]
    clipped = bounds.clipped(x) | bounds.clipped(end)
    return _Rows(x, end - x, rn.sd(x) ** 2, rn.sd(end) ** 2, ~clipped,
                 np.arange(1, p.n_pulses + 1, dtype=np.float64))


def _group_sums(rows: _Rows, w: FloatArray) -> FloatArray:
    """Per pulse number n: weighted sums of 1, x, x^2, y, xy, y^2, u over devices (device weights w). (7, K)"""
    m = rows.mask
    x = np.where(m, rows.x, 0.0)
    y = np.where(m, rows.y, 0.0)
    u = np.where(m, rows.u, 0.0)
    stack = np.stack([m.astype(np.float64), x, x * x, y, x * y, y * y, u])  # (7, N, K)
    return np.einsum("i,jik->jk", w, stack)


def _mean_given_a(s: FloatArray, n: FloatArray, a: float) -> tuple[FloatArray, float, float]:
    """Corrected least squares of (m1, c1, A1) for a given history constant a; returns beta, corrected SSE, min eig."""
    c, sx, sxx, sy, sxy, syy, su = s
    p = np.exp(-n / a)
    zz = np.array([[sxx.sum(), sx.sum(), (p * sx).sum()],
                   [sx.sum(), c.sum(), (p * c).sum()],
                   [(p * sx).sum(), (p * c).sum(), (p * p * c).sum()]])
    zy = np.array([sxy.sum(), sy.sum(), (p * sy).sum()])
    u = su.sum()
    # The read before a pulse appears in the regressor with +noise and in the increment with -noise.
    a_corr = zz.copy()
    a_corr[0, 0] -= u
    b_corr = zy.copy()
    b_corr[0] += u
    beta = np.linalg.solve(a_corr, b_corr)
    sse = syy.sum() - 2 * beta @ zy + beta @ zz @ beta - (1 + beta[0]) ** 2 * u
    return beta, float(sse), float(np.linalg.eigvalsh(a_corr).min())


def _fit_mean(rows: _Rows, w: FloatArray) -> tuple[FloatArray, float]:
    s = _group_sums(rows, w)
    k = rows.n.size
    lo, hi = math.log(0.1), math.log(5.0 * k)
    res = optimize.minimize_scalar(lambda la: _mean_given_a(s, rows.n, math.exp(la))[1], bounds=(lo, hi),
                                   method="bounded", options={"xatol": 1e-6})
    if not res.success:
        raise FitDidNotConverge("SET-increment mean", str(res.message))
    if res.x - lo < 0.01 * (hi - lo) or hi - res.x < 0.01 * (hi - lo):
        raise FitDidNotConverge("SET-increment mean", f"the history constant a ran to the edge of its range "
                                f"[{math.exp(lo):.3g}, {math.exp(hi):.3g}] pulses (a = {math.exp(res.x):.3g}): the "
                                "early-pulse excess is not resolved; measure more devices or more pulses")
    a = math.exp(float(res.x))
    beta, _, min_eig = _mean_given_a(s, rows.n, a)
    if min_eig <= 0:
        raise FitDidNotConverge("SET-increment mean", "the read-noise-corrected normal equations are not positive "
                                "definite: the read noise swamps the spread of conductances")
    return beta, a


def _spread_target(rows: _Rows, beta: FloatArray, a: float, d2d_var: float) -> tuple[FloatArray, FloatArray]:
    """Per increment: mean model mu and the squared residual less read-noise and device-factor variance."""
    p = np.exp(-rows.n / a)[None, :]
    mu = beta[0] * rows.x + beta[1] + beta[2] * p
    rho = rows.y - mu
    target = rho ** 2 - rows.v - (1 + beta[0]) ** 2 * rows.u - d2d_var * mu ** 2
    return mu, target


def _fit_spread(rows: _Rows, w: FloatArray, beta: FloatArray, a: float, d2d_var: float,
                x0: FloatArray | None) -> FloatArray:
    """Fit (m2, c2, A2) of sigma = m2 G + c2 + A2 P to squared residuals (two-step weighted least squares)."""
    _, target = _spread_target(rows, beta, a, d2d_var)
    m = rows.mask & (w[:, None] > 0)
    wt = np.broadcast_to(w[:, None], m.shape)[m]
    x, t, u = rows.x[m], target[m], rows.u[m]
    p = np.broadcast_to(np.exp(-rows.n / a)[None, :], m.shape)[m]
    sw = np.sqrt(wt)

    def model(th: np.ndarray) -> np.ndarray:
        return (th[0] * x + th[1] + th[2] * p) ** 2 + th[0] ** 2 * u

    th = np.array([0.05, 0.3, 1.0]) if x0 is None else x0
    scale = np.ones_like(t)
    for _ in range(2):  # unweighted, then weighted by the first fit's variance (sd of a squared normal ~ var)
        res = optimize.least_squares(lambda th: sw * (model(th) - t) / scale, th, method="lm")
        if not res.success:
            raise FitDidNotConverge("SET-increment spread", str(res.message))
        th = res.x
        scale = np.maximum(model(th) + rows.v[m] + rows.u[m], 1e-6)
    return th


def _fit_d2d(rows: _Rows, w: FloatArray, beta: FloatArray, a: float, sigma_th: FloatArray) -> float:
    """Variance of the per-device factor f on the mean increment (method of moments, noise variance removed)."""
    mu, _ = _spread_target(rows, beta, a, 0.0)
    p = np.exp(-rows.n / a)[None, :]
    m = rows.mask
    mu0 = np.where(m, mu, 0.0)
    smu2 = (mu0 ** 2).sum(axis=1)
    ok = (smu2 > 0) & (w > 0)
    f = (mu0 * np.where(m, rows.y, 0.0)).sum(axis=1)[ok] / smu2[ok]
    sig2 = (sigma_th[0] * rows.x + sigma_th[1] + sigma_th[2] * p) ** 2
    vrho = np.where(m, sig2 + rows.v + (1 + beta[0]) ** 2 * rows.u, 0.0)
    # Adjacent increments share one read (+noise in one, -(1 + m1) noise in the next).
    cross = (mu0[:, :-1] * mu0[:, 1:] * (1 + beta[0]) * np.where(m[:, :-1] & m[:, 1:], rows.v[:, :-1], 0.0)).sum(axis=1)
    noise = ((mu0 ** 2 * vrho).sum(axis=1) - 2 * cross)[ok] / smu2[ok] ** 2
    ww = w[ok]
    mf = np.average(f, weights=ww)
    return float(np.average((f - mf) ** 2, weights=ww) * ww.sum() / (ww.sum() - 1) - np.average(noise, weights=ww))


def _fit_increments_once(rows: _Rows, w: FloatArray, x0: FloatArray | None = None) -> FloatArray:
    beta, a = _fit_mean(rows, w)
    d2d_var = 0.0
    th = x0[4:7] if x0 is not None else None
    for _ in range(2):  # spread and device factor each need the other; two rounds reach the fixed point
        th = _fit_spread(rows, w, beta, a, max(d2d_var, 0.0), th)
        d2d_var = _fit_d2d(rows, w, beta, a, th)
    return np.array([beta[0], beta[1], beta[2], a, th[0], th[1], th[2], d2d_var])


def simulate_pulse_response(params: PCMParams, n_devices: int, n_pulses: int, seed: int) -> PulseData:
    """The pulse-response experiment on a simulated chip: reads (with read noise) after RESET and each pulse."""
    chip = PCMArray(n_devices, params, seed=seed)
    addr = np.arange(n_devices)
    ones = np.ones(n_devices, np.int64)
    reads = np.empty((n_pulses + 1, n_devices))
    t = 0.0
    chip.reset(addr, t)
    reads[0] = chip.read(addr, t)
    for k in range(1, n_pulses + 1):
        t += 1e-6  # far below the drift onset: no drift during the train, as in the experiment
        chip.set_pulses(addr, ones, t)
        reads[k] = chip.read(addr, t)
    return PulseData(PulseShapes().set, reads)


_INC_FIELDS = ("set_mean_slope", "set_mean_offset_us", "set_mean_history_us", "history_pulses",
               "set_std_slope", "set_std_offset_us", "set_std_history_us")


def _with_increments(base: PCMParams, theta: FloatArray) -> PCMParams:
    """base with the increment model theta = (m1, c1, A1, a, m2, c2, A2, d2d variance)."""
    fields = dict(zip(_INC_FIELDS, (float(v) for v in theta[:7]), strict=True))
    fields["history_pulses"] = max(fields["history_pulses"], 1e-3)
    fields["d2d_update_spread"] = min(math.sqrt(max(float(theta[7]), 0.0)), 0.49)
    # An iterate may pass through a spread that is negative somewhere in the model's box (PCMParams
    # refuses it); the simulation then runs with the offset raised just enough. The final estimate is
    # checked as it is.
    p_max = math.exp(-1.0 / fields["history_pulses"])
    lowest = min(fields["set_std_slope"] * g + fields["set_std_offset_us"] + fields["set_std_history_us"] * p
                 for g in (base.g_min_us, base.g_max_us) for p in (0.0, p_max))
    if lowest < 0:
        fields["set_std_offset_us"] += 1e-6 - lowest
    try:
        return base.model_copy(update=fields).model_validate(base.model_dump() | fields)
    except ValueError as e:
        raise FitDidNotConverge("SET-increment", f"the bias correction reached an invalid model ({e}); measure "
                                "more devices or more pulses") from e


def fit_increments(p: PulseData, rn: ReadNoiseFit, bounds: Bounds, base: PCMParams, warn: Callable[[str], None],
                   bootstrap: int = 40, seed: int = 0, sim_factor: int = 4, max_iter: int = 10,
                   progress: Reporter | None = None) -> IncrementFit:
    """Fit the SET-increment model (mean, spread, history constant, device factor) with bootstrap errors.

    A direct estimator (corrected least squares on unclipped increments) is biased where devices sit at
    the conductance bounds and by the device factor's correlation with G; the bias is removed by
    indirect inference: simulate the same experiment with the current estimate (base supplies RESET,
    read noise and bounds), rerun the direct estimator on it, and step by the difference until the
    simulated and the measured direct estimates agree (within a tenth of a standard error).
    """
    rows = _rows(p, rn, bounds)
    clipped = 1.0 - float(rows.mask.mean())
    if clipped > 0.5:
        raise InsufficientData(f"{clipped:.0%} of the measured increments start or end at a conductance bound: "
                               "the reads are saturated; use fewer pulses or a weaker SET pulse")
    n, k = rows.x.shape
    aux = _fit_increments_once(rows, np.ones(n))
    progress = progress or NoProgress()
    rng = np.random.default_rng(seed)
    boot = []
    with progress.task("fit: SET increments (bootstrap)", bootstrap) as tick:
        for _ in range(bootstrap):
            w = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
            try:
                boot.append(_fit_increments_once(rows, w, aux))
            except FitDidNotConverge:
                boot.append(np.full(8, np.nan))
            tick()
    b = np.array(boot)
    failed = float(np.isnan(b).any(axis=1).mean()) if bootstrap else 0.0
    if failed > 0.1:
        warn(f"{failed:.0%} of the bootstrap refits did not converge; the uncertainties of the increment model are rough")
    se_aux = np.nanstd(b, axis=0, ddof=1) if bootstrap > 1 else np.abs(aux) * 0.05
    n_sim = max(sim_factor * n, 20_000)
    theta = aux.copy()
    # Total: the most steps it may take; it usually settles sooner, and then the bar completes.
    with progress.task(f"fit: SET increments (bias correction, {n_sim:,} simulated devices)", max_iter) as tick:
        for _ in range(max_iter):
            sim_rows = _rows(simulate_pulse_response(_with_increments(base, theta), n_sim, k, seed + 1), rn, bounds)
            step = aux - _fit_increments_once(sim_rows, np.ones(n_sim), theta)
            theta = theta + step
            # The device-factor variance cannot go below 0; there the simulation already shows more spread.
            at_zero = theta[7] <= 0
            theta[7] = max(theta[7], 0.0)
            settled = np.abs(step) <= 0.1 * se_aux
            settled[7] |= at_zero
            tick()
            if np.all(settled):
                break
        else:
            raise FitDidNotConverge("SET-increment", f"the bias correction did not settle in {max_iter} steps (last "
                                    f"step {np.array2string(step, precision=3)})")
    # The simulated estimate adds its own sampling error, n / n_sim of the measured one's variance.
    se = se_aux * math.sqrt(1.0 + n / n_sim)
    d2d_var, d2d_var_se = float(theta[7]), float(se[7])
    if d2d_var <= 0:
        warn(f"device-to-device spread of the mean increment not resolved (variance {d2d_var:.3g} +- {d2d_var_se:.2g}); "
             "d2d_update_spread set to 0")
        d2d = Estimate(0.0, math.sqrt(max(d2d_var_se, 0.0)))
    else:
        d2d = Estimate(math.sqrt(d2d_var), d2d_var_se / (2 * math.sqrt(d2d_var)))
    e = [Estimate(float(v), float(s)) for v, s in zip(theta, se, strict=True)]
    return IncrementFit(e[0], e[1], e[2], e[3], e[4], e[5], e[6], d2d, int(rows.mask.sum()))


# ---------------------------------------------------------------------------------------------- all of it
def measured_eps(p: PulseData) -> Estimate:
    """Granularity (uS per pulse) from the measured pulse-response means (sim.response.granularity_from_means)."""
    from sim.response import granularity_from_means

    r = p.reads_us
    k = p.n_pulses
    eps = granularity_from_means(float(r[0].mean()), float(r[-1].mean()), k)
    return Estimate(eps, float((r[-1] - r[0]).std(ddof=1)) / math.sqrt(r.shape[1]) / k)


def fit_model(data: CalibrationData, *, prior: PCMParams | None = None, bootstrap: int = 40, seed: int = 0,
              eps_devices: int = 10_000, progress: Reporter | None = None) -> ModelFit:
    """Fit every part of the model to data; PCMParams of the measured chip, eps both ways, warnings.

    prior supplies the drift fields when the plan had no drift experiment (listed in not_measured).
    progress: a calibration.progress Reporter, one task per step that takes time.
    Raises InsufficientData or FitDidNotConverge (never a half-made result).
    """
    progress = progress or NoProgress()
    from sim.response import granularity_us

    check_reads(data)
    notes: list[str] = []

    def warn(msg: str) -> None:
        notes.append(msg)
        warnings.warn(msg, CalibrationWarning, stacklevel=3)

    bounds = detect_bounds(data.all_reads())
    if not bounds.min_reached:
        warn(f"no read sits at a lower clipping bound; g_min_us is the lowest read ({bounds.g_min:.4g} uS)")
    if not bounds.max_reached:
        warn(f"no read sits at an upper clipping bound; g_max_us is the highest read ({bounds.g_max:.4g} uS), "
             "the true bound is at least that")
    rn = fit_read_noise(data.noise, bounds)
    reset_mean, reset_std = fit_reset(data.noise, rn, bounds, warn, bootstrap, seed, progress)
    prior = prior if prior is not None else PCMParams()
    g_min = min(bounds.g_min, reset_mean.value)
    base = prior.model_validate(prior.model_dump() | dict(
        g_min_us=g_min, g_max_us=bounds.g_max, reset_mean_us=reset_mean.value, reset_std_us=reset_std.value,
        read_noise_rel=rn.rel.value, read_noise_abs_us=rn.abs_us.value))
    inc = fit_increments(data.pulse[0], rn, bounds, base, warn, bootstrap, seed, progress=progress)
    not_measured: list[str] = []
    drift = None
    if data.drift is not None:
        drift = fit_drift(data.drift, rn, bounds, warn, bootstrap, seed, progress)
        drift_fields = {"drift_t0_s": drift.t0.value, "drift_nu_mean": max(drift.nu_mean.value, 0.0),
                        "drift_nu_std": drift.nu_std.value}
    else:
        drift_fields = {k: getattr(prior, k) for k in ("drift_t0_s", "drift_nu_mean", "drift_nu_std")}
        not_measured += list(drift_fields)
    k = data.pulse[0].n_pulses
    fields = dict(
        g_min_us=g_min, g_max_us=bounds.g_max,
        set_mean_slope=inc.m1.value, set_mean_offset_us=inc.c1.value, set_mean_history_us=inc.a1.value,
        set_std_slope=inc.m2.value, set_std_offset_us=inc.c2.value, set_std_history_us=inc.a2.value,
        history_pulses=inc.history.value, reset_mean_us=reset_mean.value, reset_std_us=reset_std.value,
        read_noise_rel=rn.rel.value, read_noise_abs_us=rn.abs_us.value,
        d2d_update_spread=inc.d2d.value, **drift_fields)
    if fields["d2d_update_spread"] >= 0.5:
        raise FitDidNotConverge("SET-increment device factor", f"fitted spread {fields['d2d_update_spread']:.3g} is "
                                "outside the model's range [0, 0.5)")
    try:
        params = PCMParams(**fields)
    except ValueError as e:
        raise FitDidNotConverge("model", f"the fitted values do not make a valid PCMParams ({e}); with "
                                f"{data.n_devices} devices x {k} pulses the model is not pinned down: measure more "
                                "devices or more pulses") from e
    with progress.task(f"fit: eps of the fitted model ({eps_devices:,} simulated devices)", 1) as tick:
        eps_model = granularity_us(params, n_pulses=k, n_devices=eps_devices, seed=seed)
        tick()
    by_shape = [(p.shape.amplitude_ua, p.shape.width_ns, measured_eps(p)) for p in data.pulse]
    return ModelFit(params, bounds, rn, reset_mean, reset_std, inc, drift, eps_model, by_shape[0][2], by_shape,
                    not_measured, notes)
