"""Printing a rich table on the command line at its natural width."""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement


def print_unwrapped(console: Console, renderable: object) -> None:
    """At the renderable's natural width: a narrow terminal then wraps whole lines instead of rich squeezing or
    breaking every cell (a path is never split, whatever the terminal width)."""
    need = Measurement.get(console, console.options.update_width(10_000), renderable).maximum
    if need <= console.width:
        console.print(renderable)
        return
    Console(file=console.file, width=need, force_terminal=console.is_terminal, color_system=console.color_system,
            soft_wrap=True, highlight=False).print(renderable)
