"""What the host sends: a PulseProgram with its kind, as the journal and the run log name it."""

from __future__ import annotations

from dataclasses import dataclass

from drivers import PulseProgram

#: Kinds of programs, as the journal names them.
UPDATE, REFRESH, INIT, PROBE = "update", "refresh", "init", "probe"


@dataclass
class ProgramRecord:
    """A program about to be sent, with its kind (update / refresh / init / probe)."""

    kind: str
    program: PulseProgram
