"""`pcm-hil emulator`: the emulated tester (drivers/server.py)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's sub-commands to the pcm-hil app."""
