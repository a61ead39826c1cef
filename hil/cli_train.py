"""`pcm-hil train`: mixed-precision training on the array."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the pcm-hil app."""
