"""`pcm-hil energy`: energy and time of a run, counted from what it did to the chip (analysis/energy.py; docs/energy.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .consoles import print_unwrapped

# soft_wrap: a path is never broken across lines; highlight off: numbers and paths print as they are.
console = Console(soft_wrap=True, highlight=False)
FORMATS = ("table", "json")


def _fail(message: str, code: int = 1) -> typer.Exit:
    """One error line on stderr; return the exit to raise."""
    typer.echo(f"{typer.style('error:', fg='red')} {' '.join(str(message).split())}", err=True)
    return typer.Exit(code)


def _say(text: str) -> None:
    console.print(text, markup=False)


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return _json_safe(x.item())
    return x


def energy_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (pcm-hil train's RUN_DIR, or its run.h5); finished, "
                                                 "stopped, killed or still running (the rows flushed so far).")],
    table: Annotated[Optional[Path], typer.Option(help="TOML file of per-operation entries replacing the shipped "
                                                       "ones (each entry a table with value, unit, source; low and "
                                                       "high for an uncertain one); see docs/energy.md.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table (readable) or json (the same, machine-readable).")] = "table",
) -> None:
    """Energy per training sample and per epoch of the chip and of a fully digital 32-bit implementation, the
    ratio and its sensitivity, and the chip's time per sample, from the run's log."""
    from analysis import AnalysisError
    from analysis.energy import estimate

    f = fmt.strip().lower()
    if f not in FORMATS:
        raise _fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}", 2)
    try:
        est = estimate(run_dir, table)
    except AnalysisError as e:
        raise _fail(str(e), e.exit_code) from None
    if f == "json":
        typer.echo(json.dumps(_json_safe(est.as_dict()), indent=2, allow_nan=False))
        return
    _print_table(est, table)


def _n(x: float) -> str:
    """A count: thousands separated; a fraction with 3 significant digits."""
    if float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.3g}"


def _x(r: float) -> str:
    """A ratio with enough digits to show a sensitivity's small moves: 3.572x, 172.4x."""
    if not math.isfinite(r):
        return "inf"
    return f"{r:.3f}x" if r < 100 else f"{r:.1f}x"


def _print_table(est: Any, table_file: Path | None) -> None:
    from analysis.energy import PAPER_RATIO, REFERENCE_NOTE, REFRESH, SETUP, UPDATE, si

    c = est.counts
    n = max(c.samples, 1)
    ep = c.epochs_done
    epoch = (f", {ep:.3g} epoch{'' if ep == 1 else 's'} of {c.samples_per_epoch:,} samples" if c.samples_per_epoch
             else "")
    _say(f"pcm-hil energy: {c.run_dir} ({c.state})")
    shapes = ", ".join(f"{lc.fan_in + 1}x{lc.fan_out}" + (f" x {lc.uses:,} uses" if lc.uses > 1 else "")
                       for lc in c.layers)
    _say(f"run: {c.network_kind}, layers {shapes}; {c.samples:,} training samples in {c.steps:,} steps (batch "
         f"{c.batch_size}){epoch}")

    t = Table(title="counted per training sample (from the run log)", title_justify="left")
    t.add_column("quantity")
    t.add_column("per sample", justify="right")
    t.add_column("whole run", justify="right")
    fwd = sum(lc.forward_macs for lc in c.layers)
    bwd = sum(lc.backward_macs for lc in c.layers)
    t.add_row("multiply-accumulates, forward / backward", f"{fwd:,} / {bwd:,}", "")
    dac = sum(lc.forward_dac + lc.backward_dac for lc in c.layers)
    adc = sum(lc.forward_adc + lc.backward_adc for lc in c.layers)
    t.add_row("multiply conversions, DAC / ADC", f"{dac:,} / {adc:,}", "")
    for lc in c.layers:
        t.add_row(f"layer {lc.index} update inputs (nonzero, bias incl.) of {lc.uses * (lc.fan_in + 1):,}",
                  _n(lc.update_inputs), "")
    t.add_row("chi multiply-adds (nonzero inputs)", _n(sum(lc.update_macs for lc in c.layers)), "")
    t.add_row("chi words read and written", _n(sum(lc.update_words for lc in c.layers)), "")
    for label, key in (("update", UPDATE), ("refresh", REFRESH)):
        p = c.programs[key]
        t.add_row(f"{label} programs", _n(p.programs / n), f"{p.programs:,}")
        t.add_row(f"{label} SET / RESET pulses", f"{_n(p.set_pulses / n)} / {_n(p.reset_pulses / n)}",
                  f"{p.set_pulses:,} / {p.reset_pulses:,}")
    rd = c.training_reads()
    t.add_row("device reads (read-backs, periodic)", _n(rd.devices / n), f"{rd.devices:,}")
    s = c.programs[SETUP]
    t.add_row("set-up: SET / RESET pulses (not per sample)", "", f"{s.set_pulses:,} / {s.reset_pulses:,}")
    t.add_row("mean conductance over the full reads", "" if c.mean_g_us is None else f"{c.mean_g_us:.3f} uS", "")
    print_unwrapped(console, t)

    e = Table(title="energy per training sample", title_justify="left")
    e.add_column("chip (mixed precision)")
    e.add_column("", justify="right")
    e.add_column("fully digital 32-bit")
    e.add_column("", justify="right")
    chip, dig = list(est.chip_pj.items()), list(est.digital_pj.items())
    for i in range(max(len(chip), len(dig))):
        a = chip[i] if i < len(chip) else ("", None)
        b = dig[i] if i < len(dig) else ("", None)
        e.add_row(escape(a[0]), "" if a[1] is None else si(a[1] * 1e-12, "J"),
                  escape(b[0]), "" if b[1] is None else si(b[1] * 1e-12, "J"))
    e.add_section()
    e.add_row("total per sample", si(est.chip_total_pj * 1e-12, "J"), "total per sample",
              si(est.digital_total_pj * 1e-12, "J"))
    if c.samples_per_epoch:
        k = c.samples_per_epoch * 1e-12
        e.add_row(f"per epoch ({c.samples_per_epoch:,} samples)", si(est.chip_total_pj * k, "J"),
                  f"per epoch ({c.samples_per_epoch:,} samples)", si(est.digital_total_pj * k, "J"))
    print_unwrapped(console, e)
    top_c = max(est.chip_pj.items(), key=lambda kv: kv[1])
    top_d = max(est.digital_pj.items(), key=lambda kv: kv[1])
    _say(f"ratio (digital / chip): {_x(est.ratio)} (largest part: chip {top_c[0]} "
         f"{100 * top_c[1] / max(est.chip_total_pj, 1e-300):.1f}%, digital {top_d[0]} "
         f"{100 * top_d[1] / max(est.digital_total_pj, 1e-300):.1f}%)")
    if est.sensitivity:
        _say("sensitivity (the ratio with each uncertain entry at its low .. high): "
             + ", ".join(f"{x.entry} {x.low:g}..{x.high:g} {x.unit}: {_x(x.ratio_low)}..{_x(x.ratio_high)}"
                         for x in est.sensitivity))
    _say(f"reference: the paper reports {PAPER_RATIO:g}x (Nandakumar et al., Front. Neurosci. 2020); {REFERENCE_NOTE}")
    here = est.chip_pj["analog multiply (array)"] + est.chip_pj["multiply conversions (DAC, ADC)"]
    _say(f"cross-check: the multiplies at pcm_core_mac (a published PCM core, converters included) would take "
         f"{si(est.core_mac_pj * 1e-12, 'J')} per sample, against {si(here * 1e-12, 'J')} here (array + converters)")
    _say(f"one-off, not per sample: the set-up programs and reads (initial programming) {si(est.setup_pj * 1e-12, 'J')}")

    tt = Table(title="time per training sample on a chip (logged pulse widths, stated read time and link latency)",
               title_justify="left")
    tt.add_column("part")
    tt.add_column("time", justify="right")
    for k, v in est.time_ns.items():
        tt.add_row(escape(k), si(v * 1e-9, "s"))
    tt.add_section()
    tt.add_row("total", si(est.time_total_ns * 1e-9, "s"))
    measured = c.measured_us_per_sample
    tt.add_row("measured here (summary.json us_per_sample)", "-" if measured is None else si(measured * 1e-6, "s"))
    print_unwrapped(console, tt)
    swapped = sorted(k for k, v in est.table.items() if v.origin != "default")
    _say(f"table: {len(est.table)} entries (analysis/energy_table.toml)"
         + (f"; from {table_file}: {', '.join(swapped)}" if swapped else ""))
    for x in est.not_counted:
        _say(f"not counted: {x}")
    for x in est.notes:
        _say(f"note: {x}")


def register(app: typer.Typer) -> None:
    """Add this module's sub-command to the pcm-hil app."""
    app.command("energy")(energy_cmd)
