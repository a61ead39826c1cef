"""Array drivers: one contract (ArrayDriver); mock, tester (VISA / serial), dry run; the emulated tester."""

from .base import MVM, ArrayDriver
from .errors import (AddressError, Disconnected, DriverError, DriverTimeout, InstrumentError, ProgramError,
                     ProtocolError, SafetyViolation)
from .dryrun import DryRunDriver
from .mock import MockDriver, MockTiming
from .program import Block, Geometry, PulseProgram, PulseShape, PulseShapes, ReadResult
from .safety import Range, SafetyLimits
from .server import Emulator, Endpoint, FaultPlan, Server, serve
from .tester import LinkStats, TesterDriver
from .transport import SerialTransport, Transport, VisaTransport
from .runlog import SCHEMA_VERSION, RunLogError, RunLogReader, RunLogWriter
from .logged import LoggedDriver
from .replay import ReplayDriver, ReplayMismatch

__all__ = ["MVM", "AddressError", "ArrayDriver", "Block", "Disconnected", "DriverError", "DriverTimeout",
           "DryRunDriver", "Geometry", "LoggedDriver", "InstrumentError", "MockDriver", "MockTiming", "ProgramError", "ProtocolError",
           "PulseProgram", "PulseShape", "PulseShapes", "Range", "ReadResult", "ReplayDriver", "ReplayMismatch", "RunLogError", "RunLogReader",
           "RunLogWriter", "SCHEMA_VERSION", "SafetyLimits", "SafetyViolation"]
