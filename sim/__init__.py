"""Behavioral PCM model: pure physics, vectorized, no I/O beyond saving its own state."""

from .errors import AddressError, ClockError, PulseCountError, SimError, StateFileError
from .model import PCMArray
from .params import PCMParams

__all__ = ["AddressError", "ClockError", "PCMArray", "PCMParams", "PulseCountError", "SimError", "StateFileError"]
