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
#: --driver replay:PATH re-serves a calibration log (drivers.replay.ReplayDriver).
REPLAY_PREFIX = "replay:"

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
                 params: Optional[Path], timeout_s: float, visa_backend: str = "@py"):
    """mock (a simulated chip), replay:PATH (a calibration log re-served: ReplayDriver) or a tester by VISA
    resource / serial URL (TesterDriver)."""
    if spec.startswith(REPLAY_PREFIX):
        from drivers.replay import ReplayDriver

        return ReplayDriver(spec[len(REPLAY_PREFIX):])
    if spec == "mock":
        from drivers.mock import MockDriver

        p = _params(params, "--params")
        c = cols or min(devices, 1000)
        r = rows or math.ceil(devices / c)
        return MockDriver(r, c, params=p, seed=seed)
    from drivers.tester import TesterDriver

    return TesterDriver.open(spec, timeout_s=timeout_s, backend=visa_backend)


def _replay_settings(ctx: typer.Context, drv, given: dict[str, object]) -> tuple[object, object, dict[str, int]]:
    """(plan, addresses, fit settings) of a characterization over a replayed calibration log: the logged run's.

    given: option name -> value as the command line has it; an option given explicitly that differs from the
    logged run is refused (the replay would diverge at its first pulse or read). --seed and --bootstrap
    (the fit's) default to the logged run's where its log says them.
    """
    import numpy as np

    from calibration.data import ADDRESSES_ARRAY, PLAN_ATTR, CharacterizationPlan
    from calibration.run import FIT_BOOTSTRAP_ATTR, FIT_SEED_ATTR
    from drivers.runlog import RunLogError

    attrs = drv.log_attrs
    if PLAN_ATTR not in attrs:
        raise _fail(f"{drv.log_path} is a run log but not a calibration log (no {PLAN_ATTR!r} attribute): replay a "
                    f"training run with `pcm-hil replay` or `pcm-hil train --driver replay:PATH`", 2)
    try:
        plan = CharacterizationPlan.model_validate_json(str(attrs[PLAN_ATTR]))
        addr = np.asarray(drv.log_array(ADDRESSES_ARRAY), np.int64)
    except (ValueError, RunLogError) as e:
        raise _fail(f"{drv.log_path}: its calibration plan or addresses cannot be read: {_one_line(e)}", 2) from None
    logged: dict[str, object] = {
        "devices": int(addr.size), "first_address": int(addr[0]) if addr.size else 0, "pulses": plan.n_pulses,
        "set_shape": [f"{x.amplitude_ua:g}:{x.width_ns:g}" for x in plan.set_shapes], "noise_reads": plan.noise_reads,
        "drift": plan.drift, "drift_first": plan.drift_first_s, "drift_span": plan.drift_span_s,
        "drift_reads": plan.drift_reads}
    def explicit(name: str) -> bool:
        # By name: typer may bring its own click, whose ParameterSource is another enum than click's.
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    for name, want in logged.items():
        if not explicit(name):
            continue
        have = given[name]
        if name == "set_shape":
            have = [f"{a:g}:{w:g}" for a, w in (tuple(float(x) for x in v.split(":")) for v in have)]
        elif name == "drift" and not want and attrs.get("calibration_drift_skipped") is not None:
            continue   # the logged run asked for drift and its driver could not: the replay skips it as it did
        if have != want:
            option = "--drift/--no-drift" if name == "drift" else "--" + name.replace("_", "-")
            raise _fail(f"{option} {have} differs from the logged run's {want}: a replay runs the logged plan "
                        f"(leave the option out, or give the logged value)", 2)
    fit = {}
    for name, key in (("seed", FIT_SEED_ATTR), ("bootstrap", FIT_BOOTSTRAP_ATTR)):
        fit[name] = int(given[name]) if explicit(name) or key not in attrs else int(attrs[key])
    return plan, addr, fit


def _compare_with_logged_fit(drv, params) -> None:
    """Say whether the replay's fitted parameters equal those of the pcm.toml beside the replayed log."""
    from calibration.report import PARAMS_FILE
    from sim import PCMParams

    old = Path(drv.log_path).parent / PARAMS_FILE
    if not old.is_file():
        return
    try:
        before = PCMParams.from_toml(old).model_dump()
    except (OSError, ValueError) as e:
        _say(f"note: {old} cannot be read to compare with ({_one_line(e)})")
        return
    now = params.model_dump()
    differ = [k for k in now if before.get(k) != now[k]]
    if not differ:
        _say(f"the fitted parameters equal those of {old} (all {len(now)})")
    else:
        _say(f"the fitted parameters differ from {old} in {len(differ)} of {len(now)}: " +
             ", ".join(f"{k} {now[k]:.6g} (logged run {before.get(k)})" for k in differ))


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
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="New folder for the log, pcm.toml and the plots (must not exist).")],
    driver: Annotated[str, typer.Option(help="'mock' (simulated chip), a VISA resource "
                                             "('TCPIP::host::5025::SOCKET'), a serial URL ('socket://host:port', '/dev/ttyUSB0') "
                                             "or 'replay:DIR/calibration.h5' (a calibration log re-served; its plan and fit "
                                             "settings are used).")] = "mock",
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
    visa_backend: Annotated[str, typer.Option(help="pyvisa backend of a VISA resource: '@py' (pyvisa-py), '@ivi' "
                                                   "(NI-VISA / Keysight) or a VISA library's path.")] = "@py",
) -> None:
    """Characterize a chip (pulse response, read noise, drift), fit the PCM model, derive eps."""
    import numpy as np
    from pydantic import ValidationError

    from calibration.data import DRIFT_SKIPPED_ATTR, CharacterizationPlan
    from calibration.errors import CalibrationError, ReplayDiverged
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
        drv = _open_driver(driver, first_address + devices, rows, cols, seed, params, timeout, visa_backend)
    except (DriverError, RunLogError, OSError, ValueError) as e:
        raise _fail(f"cannot open driver {driver!r}: {_one_line(e)}", 1) from None
    replay = driver.startswith(REPLAY_PREFIX)
    try:
        addr = np.arange(first_address, first_address + devices)
        if replay:
            given = {"devices": devices, "first_address": first_address, "pulses": pulses,
                     "set_shape": set_shape or [], "noise_reads": noise_reads, "drift": drift,
                     "drift_first": drift_first, "drift_span": drift_span, "drift_reads": drift_reads,
                     "seed": seed, "bootstrap": bootstrap}
            plan, addr, fit_settings = _replay_settings(ctx, drv, given)
            seed, bootstrap = fit_settings["seed"], fit_settings["bootstrap"]
        check_feasible(drv, plan, addr)
        # Before the plan is shown: its cost must be what will run.
        plan, skipped = runnable_plan(drv, plan)
        if replay and skipped is None:
            skipped = drv.log_attrs.get(DRIFT_SKIPPED_ATTR)   # the logged run skipped drift; its plan says no drift
        _say(drv.identity)
        if replay:
            _say(f"replaying the logged run: {addr.size} devices from address {int(addr[0])}, fit with --seed {seed} "
                 f"--bootstrap {bootstrap}")
        if skipped:
            _say(f"note: {skipped}; the drift fields will come from "
                 f"{'--prior' if prior else 'the default model'} (--no-drift skips this probe of the clock)")
        _say(plan_summary(plan, cost(plan, addr.size)))
        with _progress() as bar:
            result = characterize(drv, addr, plan, out, progress=bar, bootstrap=bootstrap, seed=seed,
                                  prior=prior_params, drift_skipped=skipped)
    except (CalibrationError, DriverError, RunLogError, OSError) as e:
        exit_ = _fail(_one_line(e) + (f"; nothing written ({out} not made)" if isinstance(e, ReplayDiverged) else ""),
                      1)
        if (out / "calibration.h5").exists():
            typer.echo(f"the measurements are kept in {out / 'calibration.h5'}; fit them with `pcm-hil fit`", err=True)
        raise exit_ from None
    finally:
        drv.close()
    _report(result)
    if replay:
        _compare_with_logged_fit(drv, result.fit.params)


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
