"""What the characterization experiments measured, as arrays: from a live run or from its HDF5 log."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drivers.program import PulseShape, PulseShapes

from .errors import NotACalibrationLog

#: Read reasons the experiments log (the run-log schema's `reason` column).
REASON_PULSE = "calibration-pulse"
REASON_DRIFT = "calibration-drift"
REASON_NOISE = "calibration-noise"

#: Root attribute of the run log that holds the plan (JSON); its presence marks a calibration log.
PLAN_ATTR = "calibration_plan"
T_PROG_ATTR = "calibration_drift_t_prog_s"
#: Root attribute: why the drift experiment of the requested plan was skipped (absent when it was not).
DRIFT_SKIPPED_ATTR = "calibration_drift_skipped"
ADDRESSES_ARRAY = "calibration/addresses"
LEVELS_ARRAY = "calibration/drift_levels"

#: Least devices / SET pulses / repeated reads / drift reads for a fit worth reporting (below 300 devices x 10
#: pulses the increment model of a default chip often cannot be pinned down: fits fail to settle).
MIN_DEVICES = 300
MIN_PULSES = 10
MIN_NOISE_READS = 5
MIN_DRIFT_READS = 6

_DEFAULT_SET = PulseShapes().set
_DEFAULT_RESET = PulseShapes().reset


class CharacterizationPlan(BaseModel):
    """What the experiments do to each device. Times in seconds; pulse shapes in uA and ns."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    n_pulses: int = Field(20, ge=MIN_PULSES, le=10_000, description="SET pulses after RESET, one at a time, read after each.")
    set_shapes: list[PulseShape] = Field(default_factory=lambda: [_DEFAULT_SET], min_length=1,
                                         description="SET pulse shapes; the first one is fitted, each one gets its eps.")
    reset_shape: PulseShape = Field(_DEFAULT_RESET, description="RESET pulse shape.")
    noise_reads: int = Field(16, ge=MIN_NOISE_READS, le=10_000, description="Reads of each device in quick succession, after RESET and after the pulse train.")
    drift: bool = Field(True, description="Run the drift experiment.")
    drift_levels: list[int] = Field(default_factory=list, description="SET pulse counts from RESET that set the drift levels; empty: n_pulses/4, n_pulses/2, n_pulses.")
    drift_first_s: float = Field(1.0, gt=0, description="First drift read, seconds after programming.")
    drift_span_s: float = Field(1.0e4, gt=0, description="Last drift read, seconds after programming.")
    drift_reads: int = Field(12, ge=MIN_DRIFT_READS, le=1000, description="Drift reads, log-spaced in time.")

    def levels(self) -> list[int]:
        """The SET pulse counts that set the drift levels."""
        if self.drift_levels:
            return sorted(set(int(x) for x in self.drift_levels))
        k = self.n_pulses
        return sorted({max(1, round(k / 4)), max(1, round(k / 2)), k})

    def drift_times_s(self) -> npt.NDArray[np.float64]:
        """Target read times after programming, s (log-spaced)."""
        return np.geomspace(self.drift_first_s, self.drift_span_s, self.drift_reads)


@dataclass(frozen=True)
class PulseData:
    """Reads (uS) after RESET (row 0) and after each of K SET pulses (rows 1..K), one column per device."""

    shape: PulseShape
    reads_us: npt.NDArray[np.float64]  # (K + 1, N)

    @property
    def n_pulses(self) -> int:
        return self.reads_us.shape[0] - 1


@dataclass(frozen=True)
class NoiseData:
    """Repeated reads (uS) of the same devices: right after RESET and right after the pulse train."""

    after_reset_us: npt.NDArray[np.float64]  # (R, N)
    after_pulses_us: npt.NDArray[np.float64]  # (R, N)


@dataclass(frozen=True)
class DriftData:
    """Reads (uS) of devices programmed at t_prog_s to several levels, at times t_s (s, driver clock)."""

    levels: npt.NDArray[np.int64]  # (N,) SET pulses from RESET per device
    t_prog_s: float
    t_s: npt.NDArray[np.float64]  # (T,)
    reads_us: npt.NDArray[np.float64]  # (T, N)


@dataclass(frozen=True)
class CalibrationData:
    """Everything the experiments measured on one set of devices, plus where it came from."""

    plan: CharacterizationPlan
    addresses: npt.NDArray[np.int64]
    pulse: list[PulseData]
    noise: NoiseData
    drift: DriftData | None
    identity: str = ""
    source: str = "live run"
    attrs: dict[str, object] = field(default_factory=dict)

    @property
    def n_devices(self) -> int:
        return int(self.addresses.size)

    def all_reads(self) -> npt.NDArray[np.float64]:
        """Every read of every experiment, flat (for the conductance bounds)."""
        parts = [p.reads_us.ravel() for p in self.pulse]
        parts += [self.noise.after_reset_us.ravel(), self.noise.after_pulses_us.ravel()]
        if self.drift is not None:
            parts.append(self.drift.reads_us.ravel())
        return np.concatenate(parts)


def load_calibration_log(path: str | Path) -> CalibrationData:
    """Rebuild what the experiments measured from a run log written by the characterization.

    Raises NotACalibrationLog when the file is not a run log of this schema, lacks the plan, or holds
    fewer reads than the plan says (a truncated or interrupted run).
    """
    from drivers.runlog import RunLogError, RunLogReader

    path = Path(path)
    if not path.is_file():
        raise NotACalibrationLog(f"{path}: no such file")
    try:
        reader = RunLogReader(path)
    except RunLogError as e:
        raise NotACalibrationLog(f"{path} is not a pcm-hil run log of this schema: {e}") from e
    except OSError as e:
        raise NotACalibrationLog(f"{path} is not a readable HDF5 run log: {e}") from e
    with reader:
        attrs = dict(reader.attrs)
        if PLAN_ATTR not in attrs:
            raise NotACalibrationLog(f"{path} is a run log but not a calibration log (no {PLAN_ATTR!r} attribute); "
                                     "fit only logs that `pcm-hil characterize` wrote")
        try:
            plan = CharacterizationPlan.model_validate(json.loads(_text(attrs[PLAN_ATTR])))
        except (ValueError, ValidationError) as e:
            raise NotACalibrationLog(f"{path}: the calibration plan attribute is unreadable: {e}") from e
        try:
            addresses = np.asarray(reader.array(ADDRESSES_ARRAY), np.int64)
        except Exception as e:  # the reader's error for a missing array is its own business
            raise NotACalibrationLog(f"{path}: no {ADDRESSES_ARRAY!r} array: {e}") from e
        reads = reader.reads()
        events = reader.read_events()
        levels = None
        if plan.drift:
            try:
                levels = np.asarray(reader.array(LEVELS_ARRAY), np.int64)
            except Exception as e:
                raise NotACalibrationLog(f"{path}: the plan has drift but no {LEVELS_ARRAY!r} array: {e}") from e
    return _from_reads(path, plan, addresses, levels, reads, events, attrs)


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _from_reads(path: Path, plan: CharacterizationPlan, addresses: np.ndarray, levels: np.ndarray | None,
                reads: dict[str, np.ndarray], events: dict[str, np.ndarray], attrs: dict[str, object]) -> CalibrationData:
    n = addresses.size
    reasons = np.asarray([_text(r) for r in events["reason"]])
    starts = np.asarray(events["start"], np.int64)
    counts = np.asarray(events["count"], np.int64)
    g = np.asarray(reads["conductance_us"], np.float64)
    addr = np.asarray(reads["address"], np.int64)

    def block(reason: str, expected: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(reasons == reason)
        if idx.size != expected:
            raise NotACalibrationLog(f"{path}: {idx.size} read events with reason {reason!r}, the plan says {expected} "
                                     "(truncated or interrupted run?)")
        rows = np.empty((expected, n))
        for j, e in enumerate(idx):
            s, c = starts[e], counts[e]
            if c != n or not np.array_equal(addr[s:s + c], addresses):
                raise NotACalibrationLog(f"{path}: read event {int(e)} ({reason}) does not read the calibrated devices "
                                         "in their order")
            rows[j] = g[s:s + c]
        return rows, np.asarray(events["t_s"], np.float64)[idx]

    k1 = plan.n_pulses + 1
    pulse_rows, _ = block(REASON_PULSE, k1 * len(plan.set_shapes))
    pulse = [PulseData(shape, pulse_rows[i * k1:(i + 1) * k1]) for i, shape in enumerate(plan.set_shapes)]
    noise_rows, _ = block(REASON_NOISE, 2 * plan.noise_reads)
    noise = NoiseData(noise_rows[:plan.noise_reads], noise_rows[plan.noise_reads:])
    drift = None
    if plan.drift:
        if T_PROG_ATTR not in attrs:
            raise NotACalibrationLog(f"{path}: the plan has drift but the log lacks {T_PROG_ATTR!r} (interrupted run?)")
        rows, t = block(REASON_DRIFT, plan.drift_reads)
        drift = DriftData(np.asarray(levels, np.int64), float(attrs[T_PROG_ATTR]), t, rows)
    identity = _text(attrs.get("calibration_identity", attrs.get("identity", "")))
    return CalibrationData(plan, addresses, pulse, noise, drift, identity, str(path), attrs)
