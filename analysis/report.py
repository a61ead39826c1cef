"""`pcm-hil report`: PNG figures of one run and one self-contained report.html (docs/report.md).

Figures are drawn with matplotlib's Agg backend (no display needed). report.html embeds every image
as a base64 data URI and forbids loading anything else (a Content-Security-Policy of
default-src 'none'), so it opens from disk, offline, and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .runs import FULL_READ_REASONS, AnalysisError, Run, load_run

REPORT_DIR = "report"
HTML_FILE = "report.html"
#: Per-step series longer than this are summed into bins (a plot cannot show more points anyway).
MAX_POINTS = 1000
#: The Content-Security-Policy of report.html: images only from data: URIs, inline style, nothing else.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
#: Array name under which the trainer would log the baseline's weights of layer i (not logged today).
BASELINE_WEIGHTS = "baseline/layer{i}_weights"


@dataclass
class Figure:
    """One PNG of the report and what it shows."""

    file: str
    title: str
    caption: str


@dataclass
class Report:
    """What write_report wrote: the folder, report.html, the figures, the notes and the summary rows."""

    out: Path
    html: Path
    figures: list[Figure]
    notes: list[str]
    summary: list[tuple[str, str]]
    run: Run = field(repr=False)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return str(v)


def summary_rows(run: Run) -> list[tuple[str, str]]:
    """The console's and the page's summary of the run: (quantity, value)."""
    rows: list[tuple[str, str]] = [("run", str(run.path)), ("state", run.state)]
    if run.kind == "calibration":
        cd = run.calibration
        rows += [("kind", "calibration (pcm-hil characterize)"),
                 ("devices", _fmt(cd.n_devices) if cd is not None else "-"),
                 ("SET pulses per device", _fmt(cd.plan.n_pulses) if cd is not None else "-"),
                 ("reads logged", _fmt(run.counts["reads"])), ("programs logged", _fmt(run.counts["programs"]))]
    else:
        planned = run.epochs_planned
        rows += [("epochs", f"{run.epochs_done} of {planned}" if planned else str(run.epochs_done)),
                 ("steps", _fmt(run.last_step)),
                 (f"{run.metric['label']} (chip, last epoch)", _fmt(run.final_metric)),
                 (f"{run.metric['label']} (baseline)", _fmt(run.baseline_metric)),
                 ("programs applied", _fmt(run.prog_id.size)),
                 ("SET pulses", _fmt(run.set_pulses)), ("RESET pulses", _fmt(run.reset_pulses)),
                 ("refreshed pairs", _fmt(run.refreshes)),
                 ("reads logged (devices)", _fmt(run.counts["reads"])),
                 ("full reads", _fmt(run.full_reads_total)),
                 ("us per sample", "-" if run.us_per_sample is None else f"{run.us_per_sample:,.1f}")]
    if run.pulses_per_device.size and run.pulses_per_device.max() > 0:
        p = run.pulses_per_device
        worn = int(np.argmax(p))
        rows.append(("most pulsed device", f"{int(p[worn]):,} pulses at address {worn}"
                     + (f" (row {worn // run.geometry[1]}, col {worn % run.geometry[1]})" if run.geometry else "")))
    return rows


# ---------------------------------------------------------------------------------------------- figures
def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, wrap=True)
    ax.set_axis_off()


def _per_step(steps: np.ndarray, values: np.ndarray, last_step: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Sum of values per step (x: step), or per bin of steps where there are more than MAX_POINTS steps."""
    n = max(int(last_step), int(steps.max()) if steps.size else 0) + 1
    width = max(1, math.ceil(n / MAX_POINTS))
    sums = np.bincount(steps // width, weights=values.astype(np.float64), minlength=math.ceil(n / width))
    return np.arange(sums.size) * width, sums / width, width


def fig_accuracy(plt: Any, run: Run, path: Path, notes: list[str]) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    e = run.epochs
    b = run.baseline_epochs
    if not e["epoch"].size and b is None:
        _empty(ax, "no epoch has finished yet: test accuracy is logged at each epoch's end")
    else:
        if "test_accuracy" in e:
            ax.plot(e["epoch"], e["test_accuracy"], "o-", label="chip: test accuracy")
        if "train_accuracy" in e:
            ax.plot(e["epoch"], e["train_accuracy"], "s--", alpha=0.6, label="chip: train accuracy (running)")
        if b is not None:
            ax.plot(b["epoch"], b["test_accuracy"], "^-", label=f"baseline: test accuracy ({b['name'][0]})")
        elif run.baseline_accuracy is not None:
            ax.axhline(run.baseline_accuracy, color="C2", ls=":",
                       label=f"baseline: final test accuracy {run.baseline_accuracy:.4f} (summary.json)")
            notes.append("the baseline's per-epoch accuracy is not in the run log: only its final test accuracy "
                         "(summary.json) is drawn")
        ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy per epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if b is None and run.baseline_accuracy is None:
        notes.append("no baseline in this run (train with --baseline to have one)")
    _save(plt, fig, path)
    return Figure(path.name, "Accuracy per epoch",
                  "Test accuracy of the network on the chip at each epoch's end (and the running train accuracy "
                  "of that epoch), against the float64 software baseline trained on the same data in the same order.")


def fig_metric(plt: Any, run: Run, path: Path, notes: list[str]) -> Figure:
    """The task's metric per epoch (a task other than classify: bits per character, ...), chip and baseline."""
    m = run.metric
    label, name, train = m["label"], m["name"], m["train"]
    fig, ax = plt.subplots(figsize=(7, 4))
    e, b = run.epochs, run.baseline_epochs
    if not e["epoch"].size and b is None:
        _empty(ax, f"no epoch has finished yet: {label} is logged at each epoch's end")
    else:
        if name in e:
            ax.plot(e["epoch"], e[name], "o-", label=f"chip: {label}")
        if train in e:
            ax.plot(e["epoch"], e[train], "s--", alpha=0.6, label=f"chip: {label}, training (running)")
        if b is not None and name in b:
            ax.plot(b["epoch"], b[name], "^-", label=f"baseline: {label} ({b['name'][0]})")
        elif run.baseline_metric is not None:
            ax.axhline(run.baseline_metric, color="C2", ls=":",
                       label=f"baseline: final {label} {run.baseline_metric:.4f} (summary.json)")
        better = "higher" if m["higher_is_better"] else "lower"
        ax.set(xlabel="epoch", ylabel=f"{label} ({better} is better)", title=f"{label.capitalize()} per epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if b is None and run.baseline_metric is None:
        notes.append("no baseline in this run (train with --baseline to have one)")
    _save(plt, fig, path)
    return Figure(path.name, f"{label.capitalize()} per epoch",
                  f"The {label} of the network on the chip at each epoch's end on the evaluation split (and its "
                  "running value over that epoch's training items), against the float64 software baseline trained "
                  "on the same data in the same order.")


def fig_pulses(plt: Any, run: Run, path: Path) -> Figure:
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    if not run.prog_step.size:
        _empty(ax[0], "no program logged yet")
        _empty(ax[1], "")
    else:
        # The initial programming (step 0) is far above any training step's pulses: told, not drawn.
        later = run.prog_step > 0 if (run.prog_step > 0).any() else np.ones(run.prog_step.size, bool)
        first = ~later
        for values, label in ((run.prog_set, "SET"), (run.prog_reset, "RESET")):
            x, y, width = _per_step(run.prog_step[later], values[later], run.last_step)
            x, y = (x[1:], y[1:]) if first.any() and width == 1 else (x, y)
            at0 = f", {int(values[first].sum()):,} at step 0 (not drawn)" if first.any() else ""
            ax[0].plot(x, y, lw=0.8, label=f"{label}{at0}")
            order = np.argsort(run.prog_step, kind="stable")
            ax[1].plot(run.prog_step[order], np.cumsum(values[order]), label=f"{label}: {int(values.sum()):,}")
        per = "per step" if width == 1 else f"per step (mean over {width}-step bins)"
        ax[0].set(xlabel="step", ylabel=f"pulses {per}", title="Pulses per step")
        ax[1].set(xlabel="step", ylabel="pulses so far", title="Cumulative pulses")
        for a in ax:
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
    _save(plt, fig, path)
    return Figure(path.name, "SET and RESET pulses",
                  "Pulses of every applied program (programs a resume found unapplied are left out), by the step "
                  "that sent them: per step (the initial programming at step 0 is counted in the legend, not drawn) "
                  "and summed from the start.")


def fig_refreshes(plt: Any, run: Run, path: Path) -> Figure:
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    mode = _text_attr(run, "refresh_mode")
    if not run.refresh_step.size:
        _empty(ax[0], "no refresh in the log" + (f" (refresh mode {mode})" if mode else ""))
        _empty(ax[1], "")
    else:
        ax[0].vlines(run.refresh_step, 0, run.refresh_pairs, lw=1)
        ax[0].plot(run.refresh_step, run.refresh_pairs, ".", ms=3)
        ax[0].set(xlabel="step", ylabel="device pairs refreshed", title="Refreshed pairs per refresh check")
        order = np.argsort(run.refresh_step, kind="stable")
        ax[1].plot(np.r_[0, run.refresh_step[order]], np.r_[0, np.cumsum(run.refresh_pairs[order])], drawstyle="steps-post",
                   label=f"total {run.refreshes:,}")
        e = run.epochs
        if "refreshes" in e and e["refreshes"].size:
            ax[1].plot(e["step"], e["refreshes"], "o", label="trainer's counter at each epoch's end")
        ax[1].set(xlabel="step", ylabel="pairs refreshed so far", title="Cumulative refreshes")
        ax[1].legend(fontsize=8)
        for a in ax:
            a.grid(alpha=0.3)
    _save(plt, fig, path)
    thr = _text_attr(run, "refresh_threshold_us")
    return Figure(path.name, "Refreshes",
                  "Device pairs refreshed (see docs/training.md) at each "
                  "refresh check that refreshed any (metric refreshed_pairs), and their running total"
                  + (f"; threshold {thr} uS" if thr else "") + (f", mode {mode}" if mode else "") + ".")


def _text_attr(run: Run, name: str) -> str:
    v = run.attrs.get(name)
    return "" if v is None else (v.decode() if isinstance(v, bytes) else str(v))


def fig_conductance(plt: Any, run: Run, path: Path) -> Figure:
    reads = run.full_reads
    plus = np.concatenate([lm.plus.ravel() for lm in run.layers]) if run.layers else np.zeros(0, np.int64)
    minus = np.concatenate([lm.minus.ravel() for lm in run.layers]) if run.layers else np.zeros(0, np.int64)
    n = max(len(reads), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    if not reads:
        _empty(axes[0][0], "no full read in the log yet")
    g_all = np.concatenate([r.g_us for r in reads]) if reads else np.zeros(0)
    hi = float(np.nanmax(g_all)) if g_all.size else 1.0
    edges = np.linspace(min(0.0, float(np.nanmin(g_all)) if g_all.size else 0.0), hi if hi > 0 else 1.0, 41)
    for k, r in enumerate(reads):
        ax = axes[k // cols][k % cols]
        g = np.full(max(run.n_devices, int(r.addresses.max()) + 1 if r.addresses.size else 0), np.nan)
        g[r.addresses] = r.g_us
        for addr, label in ((plus, "G+"), (minus, "G-")):
            vals = g[addr[addr < g.size]] if addr.size else r.g_us
            vals = vals[np.isfinite(vals)]
            ax.hist(vals, bins=edges, histtype="step", lw=1.3, label=f"{label} ({vals.size:,})")
        ax.set(title=f"{r.reason} read, step {r.step:,}", xlabel="G (uS)", ylabel="devices")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for k in range(len(reads), rows * cols):
        axes[k // cols][k % cols].set_axis_off()
    _save(plt, fig, path)
    shown = "" if run.full_reads_total <= len(reads) else (
        f" The log holds {run.full_reads_total} full reads; {len(reads)} are shown (every initial, evaluation and "
        "resume read, periodic ones evenly spaced).")
    return Figure(path.name, "Conductance histograms at each full read",
                  "G+ and G- devices of every layer at each read of the whole array (reasons "
                  + ", ".join(FULL_READ_REASONS) + ")." + shown)


def _baseline_weights(run: Run) -> list[np.ndarray | None]:
    from drivers.runlog import RunLogReader

    names = [BASELINE_WEIGHTS.format(i=lm.index) for lm in run.layers]
    out: list[np.ndarray | None] = [None] * len(names)
    try:
        with RunLogReader(run.log) as r:
            have = set(r.array_names())
            for i, n in enumerate(names):
                if n in have:
                    out[i] = np.asarray(r.array(n), np.float64)
    except Exception:  # noqa: BLE001 - the report goes on without them
        pass
    return out


def fig_weights(plt: Any, run: Run, path: Path, notes: list[str]) -> Figure:
    layers = run.layers
    n = max(len(layers), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    base = _baseline_weights(run)
    initial = next((r for r in run.full_reads if r.reason == "initial"), None)
    g0 = None
    if initial is not None:
        g0 = np.full(run.n_devices, np.nan)
        g0[initial.addresses[initial.addresses < run.n_devices]] = initial.g_us[initial.addresses < run.n_devices]
    if not layers:
        _empty(axes[0][0], "no mapping in the log: weights cannot be computed")
    for lm, ax, wb in zip(layers, axes[0], base, strict=False):
        w = lm.weights(run.final_g)
        ok = np.isfinite(w)
        if wb is not None and wb.shape == w.shape:
            ax.plot(wb[ok], w[ok], ".", ms=2, alpha=0.5)
            lim = [float(np.nanmin(np.r_[wb.ravel(), w[ok]])), float(np.nanmax(np.r_[wb.ravel(), w[ok]]))]
            ax.plot(lim, lim, "k:", lw=1)
            err = w[ok] - wb[ok]
            ax.set(xlabel="baseline weight", ylabel="chip weight",
                   title=f"layer {lm.name}: chip vs baseline (rms error {np.sqrt(np.mean(err ** 2)):.3g})")
        else:
            edges = np.histogram_bin_edges(w[ok], bins=40) if ok.any() else 10
            if g0 is not None:
                w0 = lm.weights(g0)
                ax.hist(w0[np.isfinite(w0)], bins=edges, histtype="step", lw=1.2, label="initial (initial read)")
            ax.hist(w[ok], bins=edges, histtype="step", lw=1.5, label=f"last read (step {run.last_read_step:,})")
            ax.set(xlabel="weight = beta (G+ - G-)", ylabel="weights",
                   title=f"layer {lm.name}: {w.shape[0]} x {w.shape[1]}, beta {lm.beta:g}")
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if layers and all(b is None for b in base):
        notes.append("the baseline's weights are not in the run log: the weights figure shows the chip's weight "
                     "distribution per layer (first read and last read) instead of chip against baseline")
    _save(plt, fig, path)
    return Figure(path.name, "Weights read from the chip",
                  "Per layer, W = beta (G+ - G-) from the last conductance read of every device (beta from the log's "
                  "beta_per_layer_json, devices from its mapping arrays), against the baseline's weights where the "
                  "log holds them, else as a distribution beside the initial weights.")


def fig_endurance(plt: Any, run: Run, path: Path) -> Figure:
    p = run.pulses_per_device
    fig, ax = plt.subplots(figsize=(7, 5))
    if run.geometry is not None and p.size == run.geometry[0] * run.geometry[1]:
        img = p.reshape(run.geometry)
        where = f"{run.geometry[0]} x {run.geometry[1]} array"
    else:
        cols = max(1, math.ceil(math.sqrt(max(p.size, 1))))
        img = np.full(cols * math.ceil(max(p.size, 1) / cols), -1, np.int64)
        img[:p.size] = p
        img = np.ma.masked_less(img.reshape(-1, cols), 0)
        where = f"{p.size} device addresses, {cols} per row (the log has no geometry)"
    if not p.size:
        _empty(ax, "no device address in the log")
    else:
        im = ax.imshow(img, cmap="magma", interpolation="nearest", aspect="auto" if img.shape[1] > 4 * img.shape[0]
                       or img.shape[0] > 4 * img.shape[1] else "equal")
        fig.colorbar(im, ax=ax, label="SET + RESET pulses")
        ax.set(xlabel="column", ylabel="row",
               title=f"Lifetime pulses per device: max {int(p.max()):,}, mean over pulsed {p[p > 0].mean() if (p > 0).any() else 0:.1f}")
    _save(plt, fig, path)
    return Figure(path.name, "Endurance: pulses per device",
                  f"SET + RESET pulses every device received in this run ({where}), from the log's applied programs: "
                  "what the chip's own lifetime counters should show for this run.")


# ---------------------------------------------------------------------------------------------- calibration
def calibration_figures(plt: Any, run: Run, out: Path, notes: list[str]) -> list[Figure]:
    """The calibration plots: those `pcm-hil characterize` / `fit` wrote beside the log, else a fresh fit's."""
    from calibration.report import PLOTS

    figs = []
    cd = run.calibration
    if cd is not None:
        path = out / "pulse_response.png"
        fig, ax = plt.subplots(figsize=(7, 4))
        for pd in cd.pulse:
            g = pd.reads_us
            k = np.arange(g.shape[0])
            ax.errorbar(k, g.mean(axis=1), yerr=g.std(axis=1), fmt="o-", capsize=2,
                        label=f"SET {pd.shape.amplitude_ua:g} uA x {pd.shape.width_ns:g} ns")
        ax.set(xlabel="SET pulses from RESET", ylabel="G (uS): mean and sd over devices",
               title=f"Measured pulse response ({cd.n_devices:,} devices)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _save(plt, fig, path)
        figs.append(Figure(path.name, "Measured pulse response",
                           "Conductance after RESET and after each SET pulse, one at a time: mean and spread over the "
                           "devices, per pulse shape (straight from the log's reads)."))
    beside = [run.path / name for name in PLOTS]
    captions = {"increments.png": ("SET increments", "Mean and spread of the SET increment against G before the "
                                   "pulse: measured, and the fitted model's (simulated experiment)."),
                "drift.png": ("Drift", "Mean read conductance against time after programming, per level: measured "
                              "points and the fitted drift model."),
                "read_noise.png": ("Read noise", "Read-noise sd against G per device, with the fitted line.")}
    if all(p.is_file() for p in beside):
        for p in beside:
            shutil.copyfile(p, out / p.name)
        notes.append(f"the calibration plots are those written beside the log ({', '.join(PLOTS)})")
    elif cd is not None:
        try:
            import warnings

            from calibration.fit import fit_model
            from calibration.report import write_plots

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit = fit_model(cd, bootstrap=0)
                write_plots(out, fit, cd)
            notes.append("no calibration plots beside the log: fitted it here (bootstrap 0) for the plots")
        except Exception as e:  # noqa: BLE001 - a failed fit leaves the measured figures
            notes.append(f"no calibration plots beside the log, and the fit for them failed: "
                         f"{' '.join(str(e).split())}")
            return figs
    else:
        return figs
    for name in PLOTS:
        if (out / name).is_file():
            figs.append(Figure(name, *captions[name]))
    return figs


# ---------------------------------------------------------------------------------------------- html
def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(run: Run, out: Path, figures: list[Figure], notes: list[str], summary: list[tuple[str, str]]) -> str:
    esc = html.escape
    rows = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary)
    note_items = "\n".join(f"<li>{esc(n)}</li>" for n in notes)
    figs = "\n".join(
        f'<section><h2>{esc(f.title)}</h2><figure><img src="{_data_uri(out / f.file)}" alt="{esc(f.title)}">'
        f"<figcaption>{esc(f.caption)} <span class=file>({esc(f.file)})</span></figcaption></figure></section>"
        for f in figures)
    config = _text_attr(run, "config_toml") if run.kind == "train" else _text_attr(run, "calibration_plan")
    config_block = f"<section><h2>Config</h2><pre>{esc(config)}</pre></section>" if config else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pcm-hil report: {esc(run.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ text-align: left; padding: 0.25em 1em 0.25em 0; border-bottom: 1px solid #ddd; vertical-align: top; }}
th {{ font-weight: 600; white-space: nowrap; }}
img {{ max-width: 100%; height: auto; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: 0.92em; margin-top: 0.3em; }}
.file {{ color: #999; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }}
</style>
</head>
<body>
<h1>pcm-hil report: {esc(run.name)}</h1>
<table>
{rows}
</table>
{f"<h2>Notes</h2><ul>{note_items}</ul>" if notes else ""}
{figs}
{config_block}
</body>
</html>
"""


def write_report(run_dir: str | Path | Run, out: str | Path | None = None) -> Report:
    """Draw the figures of a run into out (default RUN_DIR/report) and write out/report.html.

    Files already in out with the same names are replaced (each atomically: a reader of the folder sees
    an old or a new file, never half of one).
    """
    run = run_dir if isinstance(run_dir, Run) else load_run(run_dir)
    out = Path(out) if out is not None else run.path / REPORT_DIR
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out} exists and is not a folder", 2)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".report.", dir=out))
    except OSError as e:
        raise AnalysisError(f"cannot write the report into {out}: {e.strerror or e}") from None
    notes = list(run.notes)
    try:
        plt = _plt()
        if run.kind == "calibration":
            figures = calibration_figures(plt, run, tmp, notes)
            figures.append(fig_endurance(plt, run, tmp / "endurance.png"))
        else:
            figures = [fig_accuracy(plt, run, tmp / "accuracy.png", notes) if run.metric["name"] == "test_accuracy"
                       else fig_metric(plt, run, tmp / "metric.png", notes),
                       fig_pulses(plt, run, tmp / "pulses.png"),
                       fig_refreshes(plt, run, tmp / "refreshes.png"),
                       fig_conductance(plt, run, tmp / "conductance.png"),
                       fig_weights(plt, run, tmp / "weights.png", notes),
                       fig_endurance(plt, run, tmp / "endurance.png")]
        summary = summary_rows(run)
        (tmp / HTML_FILE).write_text(render_html(run, tmp, figures, notes, summary), encoding="utf-8")
        for f in figures:
            os.replace(tmp / f.file, out / f.file)
        os.replace(tmp / HTML_FILE, out / HTML_FILE)
    except OSError as e:
        raise AnalysisError(f"cannot write the report into {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Report(out, out / HTML_FILE, figures, notes, summary, run)
