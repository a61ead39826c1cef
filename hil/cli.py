"""The `pcm-hil` command line. Each sub-command is a thin shell over a library function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import cli_calibration, cli_emulator, cli_energy, cli_replay, cli_report, cli_sweep, cli_train

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train neural networks on phase-change-memory chips.")
console = Console()


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"pcm-hil {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output on stderr (-v: info, -vv: debug).")] = 0,
    log_level: Annotated[Optional[str], typer.Option(help="Log level on stderr: debug, info, warning, error.")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Train neural networks on phase-change-memory chips: real testers, simulated chips, replayed logs."""
    from .logs import setup_console_logging

    try:
        setup_console_logging(verbose, log_level)
    except ValueError as e:
        typer.echo(f"pcm-hil: {e}", err=True)
        raise typer.Exit(2) from None


@app.command("pulse-response")
def pulse_response_cmd(
    devices: Annotated[int, typer.Option(min=2, help="Number of simulated devices.")] = 10_000,
    pulses: Annotated[int, typer.Option(min=1, max=1000, help="SET pulses applied one at a time from RESET.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the simulated chip.")] = 0,
    params: Annotated[Optional[Path], typer.Option(help="PCM model parameters (TOML); default: published fit.")] = None,
) -> None:
    """Print mean and spread of G after 1..N SET pulses from RESET on the simulated chip."""
    from sim import PCMParams
    from sim.response import pulse_response

    p = PCMParams.from_toml(params) if params else PCMParams()
    r = pulse_response(p, devices, pulses, seed)
    table = Table(title=f"Simulated pulse response ({r.n_devices} devices, seed {seed})")
    table.add_column("SET pulses", justify="right")
    table.add_column("mean G (uS)", justify="right")
    table.add_column("std G (uS)", justify="right")
    for n, m, s in zip(r.pulses, r.mean_us, r.std_us, strict=True):
        table.add_row(str(n) + (" (RESET)" if n == 0 else ""), f"{m:.3f}", f"{s:.3f}")
    console.print(table)
    console.print(f"device granularity: {r.granularity_us:.4f} uS per SET pulse (mean gain over {pulses} pulses from RESET)")


# Each family of sub-commands lives in its own module with register(app); add new ones here.
for _module in (cli_emulator, cli_train, cli_calibration, cli_report, cli_replay, cli_energy, cli_sweep):
    _module.register(app)


def main() -> None:
    """The pcm-hil command; a usage mistake is one line on stderr (typer's framed panel would wrap a path)."""
    import sys

    try:
        rv = app(standalone_mode=False, prog_name="pcm-hil")
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except typer.TyperException as e:  # typer's click exceptions: usage errors, bad parameters, no arguments
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":
            typer.echo(e.format_message(), err=True)  # type: ignore[attr-defined]
        else:
            where = ctx.command_path if ctx is not None else "pcm-hil"
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            typer.echo(f"{where}: error: {message} (see {where} --help)", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
