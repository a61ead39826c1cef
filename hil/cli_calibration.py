"""`pcm-hil characterize` and `pcm-hil fit`: calibration (calibration/ does the work)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _shapes(specs: list[str]):
    from drivers.program import PulseShape

    out = []
    for s in specs:
        try:
            amp, width = (float(x) for x in s.split(":"))
            out.append(PulseShape(amplitude_ua=amp, width_ns=width))
        except ValueError as e:
            raise typer.BadParameter(f"pulse shape {s!r}: expected AMPLITUDE_UA:WIDTH_NS, e.g. 100:50 ({e})") from e
    return out


def _open_driver(spec: str, devices: int, rows: Optional[int], cols: Optional[int], seed: int,
                 params: Optional[Path], timeout_s: float):
    """mock (a simulated chip) or a tester by VISA resource / serial URL (TesterDriver)."""
    if spec == "mock":
        from drivers.mock import MockDriver
        from sim import PCMParams

        p = PCMParams.from_toml(params) if params else None
        c = cols or min(devices, 1000)
        r = rows or math.ceil(devices / c)
        return MockDriver(r, c, params=p, seed=seed)
    from drivers.tester import TesterDriver

    return TesterDriver.open(spec, timeout_s=timeout_s)


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
    console.print(table)
    console.print(f"eps (fitted model, sim.response.granularity_us): {fit.eps_model_us:.4f} uS per SET pulse")
    console.print(f"eps (measured means, granularity_from_means):   {fit.eps_measured_us.value:.4f} "
                  f"+- {fit.eps_measured_us.se:.4f} uS per SET pulse")
    for amp, width, e in fit.eps_by_shape[1:]:
        console.print(f"eps (measured, SET {amp:g} uA x {width:g} ns): {e.value:.4f} +- {e.se:.4f} uS per pulse")
    for w in fit.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    console.print(f"wrote {result.params_file} and plots beside it (log: {result.log})")


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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from calibration.data import CharacterizationPlan
    from calibration.errors import CalibrationError
    from calibration.experiments import check_feasible, plan_summary
    from calibration.run import characterize
    from drivers.errors import DriverError
    from drivers.runlog import RunLogError
    from sim import PCMParams

    if out.exists():
        console.print(f"[red]error:[/red] {out} exists already; choose a new folder (nothing is overwritten)")
        raise typer.Exit(2)
    try:
        kw = {"set_shapes": _shapes(set_shape)} if set_shape else {}
        plan = CharacterizationPlan(n_pulses=pulses, noise_reads=noise_reads, drift=drift, drift_first_s=drift_first,
                                    drift_span_s=drift_span, drift_reads=drift_reads, **kw)
    except ValidationError as e:
        console.print(f"[red]error:[/red] bad experiment settings: {e}")
        raise typer.Exit(2)
    try:
        drv = _open_driver(driver, first_address + devices, rows, cols, seed, params, timeout)
    except (DriverError, OSError, ValueError) as e:
        console.print(f"[red]error:[/red] cannot open driver {driver!r}: {e}")
        raise typer.Exit(1)
    try:
        addr = np.arange(first_address, first_address + devices)
        cost = check_feasible(drv, plan, addr)
        console.print(f"{drv.identity}\n{plan_summary(plan, cost)}")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            result = characterize(drv, addr, plan, out, progress=progress, bootstrap=bootstrap, seed=seed,
                                  prior=PCMParams.from_toml(prior) if prior else None)
    except (CalibrationError, DriverError, RunLogError) as e:
        console.print(f"[red]error:[/red] {e}")
        if (out / "calibration.h5").exists():
            console.print(f"the measurements are kept in {out / 'calibration.h5'}; fit them with `pcm-hil fit`")
        raise typer.Exit(1)
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
    from sim import PCMParams

    try:
        result = fit_log(log, out, prior=PCMParams.from_toml(prior) if prior else None, bootstrap=bootstrap, seed=seed)
    except CalibrationError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1)
    _report(result)


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the pcm-hil app."""
    app.command("characterize")(characterize_cmd)
    app.command("fit")(fit_cmd)
