"""Typed errors of the driver layer. Callers catch DriverError or one of its kinds."""

from __future__ import annotations


class DriverError(Exception):
    """Base class of every error a driver raises."""


class DriverTimeout(DriverError, TimeoutError):
    """The instrument did not answer within the transport's timeout."""


class Disconnected(DriverError, ConnectionError):
    """The link to the instrument is closed or broke."""


class LinkLost(Disconnected):
    """The tester stayed unreachable for the whole reconnect window (or, while connecting, one reconnect).

    Raised instead of retrying further: the caller stops (a training run checkpoints and can be resumed).
    """


class NoAnswer(LinkLost, DriverTimeout):
    """While connecting, the tester answered nothing: neither the first query nor SYNC? after one reconnect."""


class BadResource(DriverError, ValueError):
    """A resource string that names no tester (malformed VISA resource or serial URL)."""


class InstrumentError(DriverError):
    """The instrument reported an error in its error queue (SCPI `SYST:ERR?`)."""

    def __init__(self, code: int, message: str, command: str | None = None) -> None:
        self.code = code
        self.message = message
        self.command = command
        where = f" after {command!r}" if command else ""
        super().__init__(f"instrument error {code}, {message!r}{where}")


class ProtocolError(DriverError):
    """A reply did not follow the wire protocol (malformed, wrong length, wrong type)."""


class SafetyViolation(DriverError):
    """A program breaks a safety limit; nothing of it was sent."""

    def __init__(self, limit: str, detail: str, device: int | None = None) -> None:
        self.limit = limit
        self.device = device
        self.detail = detail
        at = f" at device {device}" if device is not None else ""
        super().__init__(f"safety limit {limit!r} refused the program{at}: {detail}")


class AddressError(DriverError, IndexError):
    """A device address is outside the array or repeated in one request."""


class ProgramError(DriverError, ValueError):
    """A pulse program is malformed (shapes of its arrays, types, id)."""
