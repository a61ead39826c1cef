"""`pcm-hil characterize` and `pcm-hil fit`: calibration (calibration/ does the work)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .consoles import print_unwrapped

# soft_wrap: rich never breaks a line itself (a path broken across lines cannot be copied or matched);
# highlight off: numbers and paths print as they are.
console = Console(soft_wrap=True, highlight=False)
progress_console = Console(stderr=True, soft_wrap=True, highlight=False)

#: CharacterizationPlan field -> the option that sets it, for one-line messages about bad settings.
_PLAN_OPTIONS = {"n_pulses": "--pulses", "set_shapes": "--set-shape", "noise_reads": "--noise-reads",
                 "drift_first_s": "--drift-first", "drift_span_s": "--drift-span", "drift_reads": "--drift-reads"}


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line on stderr, unwrapped and as is (no markup); return the exit to raise."""
    typer.echo(f"{typer.style('error:', fg='red')} {message}", err=True)
    return typer.Exit(code)


def _say(message: str) -> None:
    console.print(message, markup=False)


def _one_line(e: Exception) -> str:
    """A pydantic ValidationError as 'where: what; ...' (no URLs, no line breaks); other errors as they print."""
    from pydantic import ValidationError

    if not isinstance(e, ValidationError):
        return re.sub(r"\s*\n\s*", " ", str(e).strip())
    parts = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        where = _PLAN_OPTIONS.get(loc[0], ".".join(loc)) if loc else "(top level)"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _params(path: Optional[Path], option: str):
    """PCMParams from a TOML file given with `option`, or None; a bad file is one error line."""
    if path is None:
        return None
    from sim import PCMParams

    try:
        return PCMParams.from_toml(path)
    except OSError as e:
        raise _fail(f"{option} {path}: {e.strerror or e}", 2) from None
    except ValueError as e:  # tomllib.TOMLDecodeError and pydantic's ValidationError are ValueErrors
        raise _fail(f"{option} {path} is not a PCM parameter file: {_one_line(e)}", 2) from None


@contextmanager
def _progress() -> Iterator[object]:
    """Bars on stderr when it is a terminal; plain lines on stderr otherwise (pipes, logs, tests)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from calibration.progress import LineProgress, RichProgress

    if not progress_console.is_terminal:
        yield LineProgress()
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=progress_console) as bars:
        yield RichProgress(bars)


def _shapes(specs: list[str]):
    from drivers.program import PulseShape

    out = []
    for s in specs:
        try:
            amp, width = (float(x) for x in s.split(":"))
            out.append(PulseShape(amplitude_ua=amp, width_ns=width))
        except ValueError as e:
            raise _fail(f"--set-shape {s!r}: expected AMPLITUDE_UA:WIDTH_NS, e.g. 100:50 ({_one_line(e)})", 2) from None
    return out


def _open_driver(spec: str, devices: int, rows: Optional[int], cols: Optional[int], seed: int,
                 params: Optional[Path], timeout_s: float):
    """mock (a simulated chip) or a tester by VISA resource / serial URL (TesterDriver)."""
    if spec == "mock":
        from drivers.mock import MockDriver

        p = _params(params, "--params")
        c = cols or min(devices, 1000)
        r = rows or math.ceil(devices / c)
        return MockDriver(r, c, params=p, seed=seed)
    from drivers.tester import TesterDriver

    return TesterDriver.open(spec, timeout_s=timeout_s)


def _print_unwrapped(renderable: object) -> None:
    print_unwrapped(console, renderable)


def _report(result) -> None:
    fit = result.fit
    se = fit.uncertainties()
    table = Table(title=f"Fitted PCM model ({result.data.n_devices} devices, {result.data.plan.n_pulses} pulses)")
    table.add_column("parameter")
    table.add_column("value", justify="right")
    table.add_column("std error", justify="right")
    for k, v in fit.params.model_dump().items():
        s = se.get(k, math.nan)
        note = "" if k not in fit.not_measured else " (not measured: prior)"
        table.add_row(k + note, f"{v:.5g}", "-" if math.isnan(s) else f"{s:.2g}")
    _print_unwrapped(table)
    _say(f"eps (fitted model, sim.response.granularity_us): {fit.eps_model_us:.4f} uS per SET pulse")
    _say(f"eps (measured means, granularity_from_means):   {fit.eps_measured_us.value:.4f} "
         f"+- {fit.eps_measured_us.se:.4f} uS per SET pulse")
    for amp, width_ns, e in fit.eps_by_shape[1:]:
        _say(f"eps (measured, SET {amp:g} uA x {width_ns:g} ns): {e.value:.4f} +- {e.se:.4f} uS per pulse")
    if result.drift_skipped:
        _say(f"note: {result.drift_skipped}; the drift fields are the prior's (calibration.not_measured)")
    for w in fit.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")
    _say(f"wrote {result.params_file} and plots beside it (log: {result.log})")


def characterize_cmd(
    out: Annotated[Path, typer.Option(help="New folder for the log, pcm.toml and the plots (must not exist).")],
    driver: Annotated[str, typer.Option(help="'mock' (simulated chip), a VISA resource "
                                             "('TCPIP::host::5025::SOCKET') or a serial URL ('socket://host:port', '/dev/ttyUSB0').")] = "mock",
    devices: Annotated[int, typer.Option(min=1, help="Devices to characterize (addresses first-address .. +N-1).")] = 1000,
    pulses: Annotated[int, typer.Option(min=1, help="SET pulses after RESET, one at a time, read after each.")] = 20,
    first_address: Annotated[int, typer.Option(min=0, help="First device address.")] = 0,
    set_shape: Annotated[Optional[list[str]], typer.Option(help="SET pulse shape AMPLITUDE_UA:WIDTH_NS; repeat for several (the first is fitted).")] = None,
    noise_reads: Annotated[int, typer.Option(min=1, help="Repeated reads per device for the read noise.")] = 16,
    drift: Annotated[bool, typer.Option("--drift/--no-drift", help="Run the drift experiment.")] = True,
    drift_first: Annotated[float, typer.Option(help="First drift read, s after programming.")] = 1.0,
    drift_span: Annotated[float, typer.Option(help="Last drift read, s after programming (a real tester waits this long).")] = 1.0e4,
    drift_reads: Annotated[int, typer.Option(min=1, help="Drift reads, log-spaced.")] = 12,
    seed: Annotated[int, typer.Option(help="Seed of the simulated chip (mock) and of the fit's bootstrap.")] = 0,
    params: Annotated[Optional[Path], typer.Option(help="Mock only: PCM model parameters of the simulated chip (TOML).")] = None,
    rows: Annotated[Optional[int], typer.Option(min=1, help="Mock only: array rows (default: enough for the devices).")] = None,
    cols: Annotated[Optional[int], typer.Option(min=1, help="Mock only: array columns (default: min(devices, 1000)).")] = None,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the uncertainties.")] = 40,
    prior: Annotated[Optional[Path], typer.Option(help="PCM parameters (TOML) for what is not measured (drift with --no-drift).")] = None,
    timeout: Annotated[float, typer.Option(help="Tester reply timeout, s.")] = 10.0,
) -> None:
    """Characterize a chip (pulse response, read noise, drift), fit the PCM model, derive eps."""
    import numpy as np
    from pydantic import ValidationError

    from calibration.data import CharacterizationPlan
    from calibration.errors import CalibrationError
    from calibration.experiments import check_feasible, cost, plan_summary, runnable_plan
    from calibration.run import characterize
    from drivers.errors import DriverError
    from drivers.runlog import RunLogError

    if out.exists():
        raise _fail(f"{out} exists already; choose a new folder (nothing is overwritten)", 2)
    try:
        kw = {"set_shapes": _shapes(set_shape)} if set_shape else {}
        plan = CharacterizationPlan(n_pulses=pulses, noise_reads=noise_reads, drift=drift, drift_first_s=drift_first,
                                    drift_span_s=drift_span, drift_reads=drift_reads, **kw)
    except ValidationError as e:
        raise _fail(f"bad experiment settings: {_one_line(e)}", 2) from None
    prior_params = _params(prior, "--prior")
    try:
        drv = _open_driver(driver, first_address + devices, rows, cols, seed, params, timeout)
    except (DriverError, OSError, ValueError) as e:
        raise _fail(f"cannot open driver {driver!r}: {_one_line(e)}", 1) from None
    try:
        addr = np.arange(first_address, first_address + devices)
        check_feasible(drv, plan, addr)
        # Before the plan is shown: its cost must be what will run.
        plan, skipped = runnable_plan(drv, plan)
        _say(drv.identity)
        if skipped:
            _say(f"note: {skipped}; the drift fields will come from "
                 f"{'--prior' if prior else 'the default model'} (--no-drift skips this probe of the clock)")
        _say(plan_summary(plan, cost(plan, addr.size)))
        with _progress() as bar:
            result = characterize(drv, addr, plan, out, progress=bar, bootstrap=bootstrap, seed=seed,
                                  prior=prior_params, drift_skipped=skipped)
    except (CalibrationError, DriverError, RunLogError, OSError) as e:
        exit_ = _fail(_one_line(e), 1)
        if (out / "calibration.h5").exists():
            typer.echo(f"the measurements are kept in {out / 'calibration.h5'}; fit them with `pcm-hil fit`", err=True)
        raise exit_ from None
    finally:
        drv.close()
    _report(result)


def fit_cmd(
    log: Annotated[Path, typer.Argument(help="Calibration run log (HDF5) written by `pcm-hil characterize`.")],
    out: Annotated[Path, typer.Option(help="New folder for pcm.toml and the plots (must not exist).")],
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the uncertainties.")] = 40,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap and of the simulations in the fit.")] = 0,
    prior: Annotated[Optional[Path], typer.Option(help="PCM parameters (TOML) for what the log did not measure (drift).")] = None,
) -> None:
    """Fit the PCM model to a calibration log; write pcm.toml (+ plots) and print eps."""
    from calibration.errors import CalibrationError
    from calibration.run import fit_log

    if out.exists():
        raise _fail(f"{out} exists already; choose a new folder (nothing is overwritten)", 2)
    prior_params = _params(prior, "--prior")
    try:
        with _progress() as bar:
            result = fit_log(log, out, prior=prior_params, bootstrap=bootstrap, seed=seed, progress=bar)
    except (CalibrationError, OSError) as e:
        raise _fail(_one_line(e), 1) from None
    _report(result)


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the pcm-hil app."""
    app.command("characterize")(characterize_cmd)
    app.command("fit")(fit_cmd)
