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
from typing import Annotated, Any, Callable, NoReturn, Optional, TypeVar

import typer

READY_PREFIX = "LISTENING "
T = TypeVar("T")


def emulator_cmd(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on (port 0: any free port). Not loopback: anyone on "
                                             "the network can program the chip.")] = "127.0.0.1:5025",
    pty: Annotated[bool, typer.Option("--pty", help="Serve on a new pseudo-terminal instead (serial); prints its path.")] = False,
    rows: Annotated[int, typer.Option(min=1, help="Array rows.")] = 512,
    cols: Annotated[int, typer.Option(min=1, help="Array columns.")] = 784,
    seed: Annotated[int, typer.Option(help="Seed of the simulated chip.")] = 0,
    state: Annotated[Optional[Path], typer.Option(help="Keep chip, clock, last program id and lifetime counts in "
                                                       "this file across restarts (each program appended to FILE.ledger "
                                                       "before it is acknowledged).")] = None,
    params: Annotated[Optional[Path], typer.Option(help="PCM model parameters (TOML).")] = None,
    limits: Annotated[Optional[Path], typer.Option(help="Safety limits the emulator enforces (TOML).")] = None,
    idle_timeout_s: Annotated[float, typer.Option(min=0.01, help="Close a TCP connection that sends nothing for this "
                                                               "long, s (the next client is served).")] = 30.0,
    message_deadline_s: Annotated[float, typer.Option(min=0.01, help="Abandon a message not complete this long after its "
                                                                   "first byte (error -100), s.")] = 10.0,
    fault_lose: Annotated[float, typer.Option(min=0, max=1, help="Per-query probability: close the link on receipt, command not run.")] = 0.0,
    fault_drop: Annotated[float, typer.Option(min=0, max=1, help="Per-query probability: close the link instead of replying.")] = 0.0,
    fault_delay: Annotated[float, typer.Option(min=0, max=1, help="Per-query probability: reply after --fault-delay-s.")] = 0.0,
    fault_corrupt: Annotated[float, typer.Option(min=0, max=1, help="Per-query probability: flip one byte of the reply.")] = 0.0,
    fault_error: Annotated[float, typer.Option(min=0, max=1, help="Per-query probability: instrument error 200, command not run.")] = 0.0,
    fault_delay_s: Annotated[float, typer.Option(min=0, help="Lateness of a delayed reply, s.")] = 1.0,
    fault_seed: Annotated[int, typer.Option(help="Seed of the fault draws.")] = 0,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="Log each client connecting and leaving "
                                                                          "on stderr (as pcm-hil -v emulator).")] = 0,
) -> None:
    """Serve the tester wire protocol (docs/protocol.md) in front of a simulated chip."""
    if verbose:
        from .logs import setup_console_logging

        setup_console_logging(verbose)
    from drivers import DriverError, MockDriver, SafetyLimits
    from drivers.server import Emulator, Endpoint, FaultPlan, Server, check_size, exposed, print_ready
    from sim import PCMParams

    try:
        endpoint = Endpoint.parse("pty" if pty else listen)
        check_size(rows, cols)
    except ValueError as e:
        _fail(str(e))
    p = _load_toml(params, "--params", lambda path: PCMParams.from_toml(path))
    lim = _load_toml(limits, "--limits", lambda path: SafetyLimits.model_validate(_read_toml(path)))
    if state is not None:
        _check_state_path(state)
    faults = FaultPlan(lose=fault_lose, drop=fault_drop, delay=fault_delay, corrupt=fault_corrupt, error=fault_error,
                       delay_s=fault_delay_s, seed=fault_seed)
    try:
        driver = MockDriver(rows, cols, params=p, seed=seed, limits=lim)
        emulator = Emulator(driver, faults=faults, state_path=state)
    except (DriverError, ValueError) as e:
        _fail(str(e))
    except MemoryError:
        _fail(f"not enough memory for a {rows} x {cols} array")
    if state is not None:
        try:
            emulator.save()  # a state file that cannot be written must stop us now, not after the first program
        except OSError as e:
            _fail(f"--state {state}: cannot write it: {e.strerror or e}")
    server = Server(emulator, endpoint, idle_timeout_s=idle_timeout_s, message_deadline_s=message_deadline_s)
    try:
        server.bind()
    except OSError as e:
        _fail(f"cannot listen on {listen}: {e.strerror or e}")
    if endpoint.kind == "tcp" and exposed(server.address.rpartition(":")[0]):
        typer.echo(f"pcm-hil emulator: warning: listening on {server.address}, beyond this machine: anyone on the "
                   "network can program the chip (the protocol has no authentication)", err=True)

    def _stop(signum: int, frame: object) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print_ready(server)
    try:
        server.serve_forever()  # saves the state file (if any) on the way out
    finally:
        if faults.any:
            typer.echo(f"pcm-hil emulator: {emulator.fault_summary()}", err=True)


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit status 2: what a mistake on the command line gets, never a traceback."""
    typer.echo(f"pcm-hil emulator: {message}", err=True)
    raise typer.Exit(2)


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


def _load_toml(path: Optional[Path], option: str, load: Callable[[Path], T]) -> T | None:
    """load(path), with every way a TOML file can be wrong turned into one line naming the option and file."""
    import tomllib

    from pydantic import ValidationError

    if path is None:
        return None
    where = f"{option} {path}"
    try:
        return load(path)
    except FileNotFoundError:
        _fail(f"{where}: no such file")
    except IsADirectoryError:
        _fail(f"{where}: is a folder, not a TOML file")
    except UnicodeDecodeError:
        _fail(f"{where}: not UTF-8 text")
    except tomllib.TOMLDecodeError as e:
        _fail(f"{where}: invalid TOML: {e}")
    except ValidationError as e:
        _fail(f"{where}: {_validation_line(e)}")
    except OSError as e:
        _fail(f"{where}: cannot read it: {e.strerror or e}")


def _validation_line(err: Any) -> str:
    """A pydantic ValidationError as one line, key by key (pydantic's own text spans lines and links to its docs)."""
    import difflib

    parts = []
    fields = list(getattr(err, "title", None) and _model_fields(err.title) or [])
    for e in err.errors(include_url=False):
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), fields, n=1)
            msg = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("missing",) and "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r:.40})"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def _model_fields(title: str) -> list[str]:
    from drivers import SafetyLimits
    from sim import PCMParams

    model = {"SafetyLimits": SafetyLimits, "PCMParams": PCMParams}.get(title)
    return list(model.model_fields) if model is not None else []


def _check_state_path(state: Path) -> None:
    """Refuse at start what would only fail after the first program (a folder that does not exist)."""
    folder = state.parent if str(state.parent) else Path(".")
    if state.is_dir():
        _fail(f"--state {state}: is a folder; name a file in it")
    if not folder.exists():
        _fail(f"--state {state}: the folder {folder} does not exist")
    if not folder.is_dir():
        _fail(f"--state {state}: {folder} is not a folder")


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
