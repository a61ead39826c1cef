"""Typed errors of calibration. Each message names the problem and what to do about it."""

from __future__ import annotations


class CalibrationError(Exception):
    """Base class of every calibration error."""


class InsufficientData(CalibrationError, ValueError):
    """Too few devices, pulses or reads for a meaningful fit, or the reads carry no information."""


class NotACalibrationLog(CalibrationError):
    """The file is not a run log of this schema, or a run log without a calibration plan."""


class FitDidNotConverge(CalibrationError):
    """A fit did not converge (or ran to the edge of its search range); nothing is reported for it."""

    def __init__(self, what: str, why: str) -> None:
        self.what = what
        self.why = why
        super().__init__(f"the {what} fit did not converge: {why}")


class OutputExists(CalibrationError, FileExistsError):
    """The output folder exists already; nothing is overwritten."""


class ReplayDiverged(CalibrationError):
    """A characterization over a replayed calibration log asked for something the log does not hold next, or
    ended before the log did; the message says at which calibration step, in which experiment and what differs."""
