"""`pcm-hil emulator`: the emulated tester (drivers/server.py), and a helper to run it as a subprocess.

Ready line: once listening, the emulator prints exactly one line to stdout, flushed:
`LISTENING tcp HOST:PORT` or `LISTENING pty PATH`. With `--listen 127.0.0.1:0` the system picks a
free port and the line says which.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

READY_PREFIX = "LISTENING "


def emulator_cmd(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on (port 0: any free port).")] = "127.0.0.1:5025",
    pty: Annotated[bool, typer.Option("--pty", help="Serve on a new pseudo-terminal instead (serial); prints its path.")] = False,
    rows: Annotated[int, typer.Option(min=1, help="Array rows.")] = 512,
    cols: Annotated[int, typer.Option(min=1, help="Array columns.")] = 784,
    seed: Annotated[int, typer.Option(help="Seed of the simulated chip.")] = 0,
    state: Annotated[Optional[Path], typer.Option(help="Keep chip, clock, last program id and lifetime counts in "
                                                       "this file across restarts (saved after every program).")] = None,
    params: Annotated[Optional[Path], typer.Option(help="PCM model parameters (TOML).")] = None,
    limits: Annotated[Optional[Path], typer.Option(help="Safety limits the emulator enforces (TOML).")] = None,
    fault_lose: Annotated[float, typer.Option(min=0, max=1, help="Per-query probability: close the link on receipt, command not run.")] = 0.0,
    fault_drop: Annotated[float, typer.Option(min=0, max=1, help="Per-query probability: close the link instead of replying.")] = 0.0,
    fault_delay: Annotated[float, typer.Option(min=0, max=1, help="Per-query probability: reply after --fault-delay-s.")] = 0.0,
    fault_corrupt: Annotated[float, typer.Option(min=0, max=1, help="Per-query probability: flip one byte of the reply.")] = 0.0,
    fault_error: Annotated[float, typer.Option(min=0, max=1, help="Per-query probability: instrument error 200, command not run.")] = 0.0,
    fault_delay_s: Annotated[float, typer.Option(min=0, help="Lateness of a delayed reply, s.")] = 1.0,
    fault_seed: Annotated[int, typer.Option(help="Seed of the fault draws.")] = 0,
) -> None:
    """Serve the tester wire protocol (docs/protocol.md) in front of a simulated chip."""
    import tomllib

    from drivers import MockDriver, SafetyLimits
    from drivers.server import Emulator, Endpoint, FaultPlan, Server, print_ready
    from sim import PCMParams

    p = PCMParams.from_toml(params) if params else None
    lim = SafetyLimits.model_validate(tomllib.loads(limits.read_text())) if limits else None
    faults = FaultPlan(lose=fault_lose, drop=fault_drop, delay=fault_delay, corrupt=fault_corrupt, error=fault_error,
                       delay_s=fault_delay_s, seed=fault_seed)
    from drivers import DriverError

    driver = MockDriver(rows, cols, params=p, seed=seed, limits=lim)
    try:
        endpoint = Endpoint.parse("pty" if pty else listen)
        server = Server(Emulator(driver, faults=faults, state_path=state), endpoint)
        server.bind()
    except (DriverError, ValueError, OSError) as e:
        typer.echo(f"pcm-hil emulator: {e}", err=True)
        raise typer.Exit(2) from None

    def _stop(signum: int, frame: object) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print_ready(server)
    server.serve_forever()  # saves the state file (if any) on the way out


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the pcm-hil app."""
    app.command("emulator")(emulator_cmd)


class EmulatorProcess:
    """`pcm-hil emulator` in a subprocess; `address`, `resource` (VISA) and `serial_url` once started.

    with EmulatorProcess(["--rows", "8", "--cols", "8"]) as emu:
        drv = TesterDriver.open(emu.resource)
    """

    def __init__(self, args: list[str] | None = None, *, listen: str = "127.0.0.1:0", start_timeout_s: float = 60.0) -> None:
        extra = list(args or [])
        self.kind = "pty" if "--pty" in extra else "tcp"
        cmd = [sys.executable, "-m", "hil.cli", "emulator", *([] if self.kind == "pty" else ["--listen", listen]), *extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # stderr to a file, not a pipe: nobody drains it while the emulator runs, and a full pipe would stall it.
        self._stderr = tempfile.TemporaryFile("w+")
        self._stderr_final = ""
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env,
                                     cwd=Path(__file__).resolve().parent.parent)
        self.address = self._wait_ready(start_timeout_s)

    def _wait_ready(self, timeout_s: float) -> str:
        import selectors

        sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            self.stop()
            raise RuntimeError(f"emulator printed no ready line within {timeout_s} s")
        line = self.proc.stdout.readline()
        if not line.startswith(READY_PREFIX):
            err = ""
            if not line:  # stdout closed: the emulator is exiting; its stderr says why
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
                err = self.stderr_text()
            self.stop()
            raise RuntimeError(f"emulator did not start: {line!r} {err[-2000:]}")
        return line.split()[2]

    @property
    def resource(self) -> str:
        """VISA resource string (TCP) or the pty path."""
        if self.kind == "pty":
            return self.address
        host, _, port = self.address.rpartition(":")
        return f"TCPIP::{host}::{port}::SOCKET"

    @property
    def serial_url(self) -> str:
        """pyserial URL: socket://HOST:PORT (TCP) or the pty path."""
        return self.address if self.kind == "pty" else f"socket://{self.address}"

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM (the emulator saves its state and exits), SIGKILL if it does not within timeout_s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not self._stderr.closed:
            self._stderr_final = self.stderr_text()
            self._stderr.close()
        return self.proc.returncode

    def stderr_text(self) -> str:
        """What the emulator wrote to stderr so far (all of it once stopped)."""
        if self._stderr.closed:
            return self._stderr_final
        self._stderr.seek(0)
        return self._stderr.read()

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
