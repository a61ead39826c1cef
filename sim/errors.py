"""Typed errors of the behavioral PCM model.

Every error is raised before any state changes: a refused call leaves the chip as it was.
"""


class SimError(Exception):
    """Base class of every error the simulated chip raises."""


class AddressError(SimError, IndexError):
    """A device address is out of range, duplicated in one call, or not an integer."""


class PulseCountError(SimError, ValueError):
    """A SET pulse count is negative, not an integer, or does not match the addresses."""


class ClockError(SimError, ValueError):
    """The caller's time is not finite or runs backward past an earlier event."""


class StateFileError(SimError, OSError):
    """A saved chip state is missing, truncated, from another format, or inconsistent."""
