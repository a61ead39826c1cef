"""Array drivers: one contract (ArrayDriver); mock, tester (VISA / serial), replay, dry run; the emulated
tester; the run log."""

from .base import MVM, ArrayDriver
from .dryrun import DryRunDriver
from .errors import (AddressError, Disconnected, DriverError, DriverTimeout, InstrumentError, ProgramError,
                     ProtocolError, SafetyViolation)
from .logged import LoggedDriver
from .mock import MockDriver, MockTiming
from .program import Block, Geometry, PulseProgram, PulseShape, PulseShapes, ReadResult
from .replay import ReplayDriver, ReplayMismatch
from .runlog import SCHEMA_VERSION, RunLogError, RunLogReader, RunLogWriter
from .safety import Range, SafetyLimits
from .server import Emulator, Endpoint, FaultPlan, Server, serve
from .tester import LinkStats, TesterDriver
from .transport import SerialTransport, Transport, VisaTransport

__all__ = [
    "MVM", "SCHEMA_VERSION", "AddressError", "ArrayDriver", "Block", "Disconnected", "DriverError", "DriverTimeout",
    "DryRunDriver", "Emulator", "Endpoint", "FaultPlan", "Geometry", "InstrumentError", "LinkStats", "LoggedDriver",
    "MockDriver", "MockTiming", "ProgramError", "ProtocolError", "PulseProgram", "PulseShape", "PulseShapes", "Range",
    "ReadResult", "ReplayDriver", "ReplayMismatch", "RunLogError", "RunLogReader", "RunLogWriter", "SafetyLimits",
    "SafetyViolation", "SerialTransport", "Server", "TesterDriver", "Transport", "VisaTransport", "serve",
]
