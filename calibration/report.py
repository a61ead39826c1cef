"""Write a fit as a model-parameter file (TOML: [pcm] + [calibration]) with PNG plots beside it."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import textwrap
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import tomli_w

from .data import DRIFT_SKIPPED_ATTR, CalibrationData
from .errors import OutputExists
from .fit import ModelFit, _rows, simulate_pulse_response
from .fit_results import DriftFit
from .progress import NoProgress, Reporter

PARAMS_FILE = "pcm.toml"
PLOTS = ("increments.png", "drift.png", "read_noise.png")


def package_version() -> str:
    try:
        return metadata.version("pcm-hil")
    except metadata.PackageNotFoundError:
        return "unknown"


def describe_addresses(addresses: np.ndarray, limit: int = 20) -> str:
    """Addresses as ranges, e.g. '0-99, 200-299' (the first `limit` ranges, then a count)."""
    a = np.sort(addresses)
    if a.size == 0:
        return ""
    breaks = np.flatnonzero(np.diff(a) != 1)
    starts = np.r_[a[0], a[breaks + 1]]
    ends = np.r_[a[breaks], a[-1]]
    parts = [f"{s}" if s == e else f"{s}-{e}" for s, e in zip(starts[:limit], ends[:limit], strict=True)]
    if starts.size > limit:
        parts.append(f"... ({starts.size - limit} more ranges)")
    return ", ".join(parts)


def _num(x: float) -> float:
    return float(x)


def calibration_table(fit: ModelFit, data: CalibrationData) -> dict[str, object]:
    """The [calibration] table: eps, uncertainties, provenance."""
    drift = data.plan.drift
    table: dict[str, object] = {
        "eps_us": _num(fit.eps_model_us),
        "eps_model_us": _num(fit.eps_model_us),
        "eps_measured_us": _num(fit.eps_measured_us.value),
        "eps_measured_se_us": _num(fit.eps_measured_us.se),
        "eps_pulses": data.pulse[0].n_pulses,
        "log": data.source,
        "instrument": data.identity,
        "devices": describe_addresses(data.addresses),
        "n_devices": data.n_devices,
        "measured_utc": str(data.attrs.get("calibration_started_utc", "")),
        "fitted_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": package_version(),
        "g_min_reached": fit.bounds.min_reached,
        "g_max_reached": fit.bounds.max_reached,
        "drift_measured": drift,
        **({"drift_skipped": str(data.attrs[DRIFT_SKIPPED_ATTR])} if DRIFT_SKIPPED_ATTR in data.attrs else {}),
        "not_measured": fit.not_measured,
        "warnings": fit.warnings,
        "uncertainties": {k: _num(v) for k, v in fit.uncertainties().items()},
        "shapes": [{"set_amplitude_ua": a, "set_width_ns": w, "eps_measured_us": e.value, "eps_measured_se_us": e.se}
                   for a, w, e in fit.eps_by_shape],
    }
    return table


def write_params_toml(path: Path, fit: ModelFit, data: CalibrationData) -> None:
    """[pcm]: exactly the PCMParams fields (PCMParams.from_toml, MockDriver and the emulator load it)."""
    doc = {"pcm": fit.params.model_dump(), "calibration": calibration_table(fit, data)}
    path.write_bytes(tomli_w.dumps(doc).encode())


def write_plots(folder: Path, fit: ModelFit, data: CalibrationData, seed: int = 0,
                progress: Reporter | None = None) -> None:
    """increments.png, drift.png, read_noise.png (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (progress or NoProgress()).task("plots", len(PLOTS)) as tick:
        _plot_increments(plt, folder / PLOTS[0], fit, data, seed)
        tick()
        _plot_drift(plt, folder / PLOTS[1], fit, str(data.attrs.get(DRIFT_SKIPPED_ATTR, "")))
        tick()
        _plot_read_noise(plt, folder / PLOTS[2], fit)
        tick()


def _binned_increments(rows, m1: float, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin of G before the pulse: centre, mean increment, spread with the read noise taken off (uS)."""
    m = rows.mask
    x, y = rows.x[m], rows.y[m]
    noise = (rows.v + (1 + m1) ** 2 * rows.u)[m]
    idx = np.digitize(x, edges) - 1
    centre, mean, spread = [], [], []
    for b in range(edges.size - 1):
        sel = idx == b
        if sel.sum() < 20:
            continue
        centre.append(x[sel].mean())
        mean.append(y[sel].mean())
        spread.append(math.sqrt(max(y[sel].var() - noise[sel].mean(), 0.0)))
    return np.array(centre), np.array(mean), np.array(spread)


def _plot_increments(plt, path: Path, fit: ModelFit, data: CalibrationData, seed: int) -> None:
    p = data.pulse[0]
    rows = _rows(p, fit.read_noise, fit.bounds)
    sim = simulate_pulse_response(fit.params, max(data.n_devices, 20_000), p.n_pulses, seed + 2)
    sim_rows = _rows(sim, fit.read_noise, fit.bounds)
    lo, hi = np.quantile(rows.x[rows.mask], [0.01, 0.99])
    edges = np.linspace(lo, hi, 21)
    m1 = fit.params.set_mean_slope
    gm, mm, sm = _binned_increments(rows, m1, edges)
    gf, mf, sf = _binned_increments(sim_rows, m1, edges)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(gm, mm, "o", label="measured")
    ax[0].plot(gf, mf, "-", label="fitted model (simulated experiment)")
    ax[0].set(xlabel="G before the pulse (uS)", ylabel="mean SET increment (uS)", title="Mean increment")
    ax[1].plot(gm, sm, "o", label="measured (read noise removed)")
    ax[1].plot(gf, sf, "-", label="fitted model")
    ax[1].set(xlabel="G before the pulse (uS)", ylabel="sd of SET increment (uS)", title="Spread of the increment")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(f"{data.n_devices} devices x {p.n_pulses} pulses, all pulse numbers")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass(frozen=True)
class DriftCurve:
    """One drift level: the measured mean read at each read time, and the fitted model's on a fine grid."""

    level: int  # SET pulses from RESET
    devices: int
    tau_s: np.ndarray  # read times after programming (T,)
    measured_us: np.ndarray  # mean read of the level's devices (T,)
    model_tau_s: np.ndarray  # fine log-spaced grid over the read times, t0 on it
    model_us: np.ndarray  # mean over the level's devices of g0 (max(tau, t0) / t0) ** -nu, per device fitted


def drift_curves(d: DriftFit, points: int = 200) -> list[DriftCurve]:
    """Measured and fitted mean conductance against time, per drift level (the drift plot's data).

    The model is averaged over the devices (each with its own fitted g0 and nu), like the measured
    mean, and drawn on a fine grid: at the read times alone the onset at t0 would be a straight chord.
    """
    tau = d.tau_s
    t0 = d.t0.value
    grid = np.unique(np.r_[np.geomspace(tau[0], tau[-1], points), t0 if tau[0] < t0 < tau[-1] else tau[0]])
    scale = np.log(np.maximum(grid, t0) / t0)
    out = []
    for lv in np.unique(d.levels):
        sel = d.levels == lv
        model = (d.g0_us[sel][None, :] * np.exp(-scale[:, None] * d.nu[sel][None, :])).mean(axis=1)
        out.append(DriftCurve(int(lv), int(sel.sum()), tau, d.reads_us[:, sel].mean(axis=1), grid, model))
    return out


def draw_drift(ax, fit: ModelFit, skipped: str = "") -> None:
    """The drift plot on a matplotlib Axes: measured points and the fitted curves, per level, and t0."""
    d = fit.drift
    if d is None:
        text = "no drift experiment" + (f"\n\n{textwrap.fill(skipped, 70)}" if skipped else "")
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set_axis_off()
        return
    for c in drift_curves(d):
        (pts,) = ax.loglog(c.tau_s, c.measured_us, "o", label=f"{c.level} SET pulses: measured ({c.devices} devices)")
        ax.loglog(c.model_tau_s, c.model_us, "-", color=pts.get_color(), label=f"{c.level} SET pulses: fitted model")
    t0, nu = d.t0, d.nu_mean
    ax.axvline(t0.value, color="grey", ls=":", label=f"t0 = {t0.value:.3g} +- {t0.se:.2g} s")
    ax.set(xlabel="time after programming (s)", ylabel="mean read G (uS)",
           title=f"Drift: nu = {nu.value:.4f} +- {nu.se:.2g}, device sd {d.nu_std.value:.4f}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the axes: never over a curve


def _plot_drift(plt, path: Path, fit: ModelFit, skipped: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6, 4) if fit.drift is None else (8.5, 4))
    draw_drift(ax, fit, skipped)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_read_noise(plt, path: Path, fit: ModelFit) -> None:
    rn = fit.read_noise
    rng = np.random.default_rng(0)
    idx = rng.permutation(rn.device_mean_us.size)[:5000]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rn.device_mean_us[idx], rn.device_std_us[idx], ".", ms=2, alpha=0.4, label="measured (one device)")
    g = np.linspace(0, rn.device_mean_us.max(), 100)
    ax.plot(g, rn.sd(g), "r-", label=f"fit: {rn.rel.value:.4f} G + {rn.abs_us.value:.4f} uS")
    ax.set(xlabel="G (uS, mean of repeated reads)", ylabel="read-noise sd (uS)", title="Read noise")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_result(out: str | Path, fit: ModelFit, data: CalibrationData, *, seed: int = 0,
                 progress: Reporter | None = None) -> Path:
    """Write pcm.toml and the plots into the new folder out (refused if it exists); returns the TOML path.

    Written into a temporary folder beside out and renamed at the end: out appears complete or not at all.
    """
    out = Path(out)
    if out.exists():
        raise OutputExists(f"{out} exists already; choose a new folder (nothing is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_params_toml(tmp / PARAMS_FILE, fit, data)
        write_plots(tmp, fit, data, seed, progress)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / PARAMS_FILE


def add_result(folder: str | Path, fit: ModelFit, data: CalibrationData, *, seed: int = 0,
               progress: Reporter | None = None) -> Path:
    """Write pcm.toml and the plots into an existing folder (the one characterize made), file by file atomically."""
    folder = Path(folder)
    for name in (PARAMS_FILE, *PLOTS):
        if (folder / name).exists():
            raise OutputExists(f"{folder / name} exists already (nothing is overwritten)")
    tmp = Path(tempfile.mkdtemp(prefix=".fit.", dir=folder))
    try:
        write_params_toml(tmp / PARAMS_FILE, fit, data)
        write_plots(tmp, fit, data, seed, progress)
        for name in (*PLOTS, PARAMS_FILE):  # the TOML last: its presence means the result is complete
            os.rename(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / PARAMS_FILE
