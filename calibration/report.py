"""Write a fit as a model-parameter file (TOML: [pcm] + [calibration]) with PNG plots beside it."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import tomli_w

from .data import CalibrationData
from .errors import OutputExists
from .fit import ModelFit, _rows, simulate_pulse_response

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


def write_plots(folder: Path, fit: ModelFit, data: CalibrationData, seed: int = 0) -> None:
    """increments.png, drift.png, read_noise.png (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _plot_increments(plt, folder / PLOTS[0], fit, data, seed)
    _plot_drift(plt, folder / PLOTS[1], fit)
    _plot_read_noise(plt, folder / PLOTS[2], fit)


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


def _plot_drift(plt, path: Path, fit: ModelFit) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    d = fit.drift
    if d is None:
        ax.text(0.5, 0.5, "no drift experiment", ha="center", va="center", transform=ax.transAxes)
    else:
        tau = d.tau_s
        t0, nu = d.t0.value, d.nu_mean.value
        for lv in np.unique(d.levels):
            sel = d.levels == lv
            (line,) = ax.loglog(tau, d.reads_us[:, sel].mean(axis=1), "o", label=f"{lv} SET pulses (measured)")
            g0 = float(np.mean(d.g0_us[sel]))
            ax.loglog(tau, g0 * (np.maximum(tau, t0) / t0) ** (-nu), "-", color=line.get_color())
        ax.axvline(t0, color="grey", ls=":", label=f"t0 = {t0:.3g} s")
        ax.set(xlabel="time after programming (s)", ylabel="mean read G (uS)",
               title=f"Drift: nu = {nu:.4f} +- {fit.drift.nu_std.value:.4f} (device sd)")
        ax.legend(fontsize=7)
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


def write_result(out: str | Path, fit: ModelFit, data: CalibrationData, *, seed: int = 0) -> Path:
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
        write_plots(tmp, fit, data, seed)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / PARAMS_FILE


def add_result(folder: str | Path, fit: ModelFit, data: CalibrationData, *, seed: int = 0) -> Path:
    """Write pcm.toml and the plots into an existing folder (the one characterize made), file by file atomically."""
    folder = Path(folder)
    for name in (PARAMS_FILE, *PLOTS):
        if (folder / name).exists():
            raise OutputExists(f"{folder / name} exists already (nothing is overwritten)")
    tmp = Path(tempfile.mkdtemp(prefix=".fit.", dir=folder))
    try:
        write_params_toml(tmp / PARAMS_FILE, fit, data)
        write_plots(tmp, fit, data, seed)
        for name in (*PLOTS, PARAMS_FILE):  # the TOML last: its presence means the result is complete
            os.rename(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / PARAMS_FILE
