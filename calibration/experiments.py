"""Characterization experiments through the driver contract only: pulse response, read noise, drift.

Every read goes to the run log (RunLogWriter through LoggedDriver) with a calibration reason, so a
characterization is a run log like any training run: replay and plots work on it. The cost in
pulses and reads is known before the first pulse and checked against the safety limits and each
device's remaining pulse budget; nothing is sent when it does not fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import numpy.typing as npt
from rich.progress import Progress

from drivers.base import ArrayDriver
from drivers.errors import SafetyViolation
from drivers.mock import MockDriver
from drivers.program import PulseProgram, PulseShape, PulseShapes
from drivers.replay import ReplayDriver, ReplayMismatch

from .data import (ADDRESSES_ARRAY, DRIFT_SKIPPED_ATTR, LEVELS_ARRAY, MIN_DEVICES, PLAN_ATTR, REASON_DRIFT,
                   REASON_NOISE, REASON_PULSE, T_PROG_ATTR, CalibrationData, CharacterizationPlan, DriftData,
                   NoiseData, PulseData)
from .errors import CalibrationError, InsufficientData, ReplayDiverged
from .progress import Reporter, as_reporter

Wait = Callable[[float], None]
#: How the reason a drift experiment was skipped starts (the log's calibration_drift_skipped attribute).
DRIFT_SKIPPED_PREFIX = "drift experiment skipped: "


@dataclass(frozen=True)
class Cost:
    """What a characterization costs: pulses per device and in all, reads, and waiting time (s)."""

    n_devices: int
    set_pulses_per_device: int  # the most any device gets
    reset_pulses_per_device: int
    set_pulses: int
    reset_pulses: int
    read_calls: int
    device_reads: int
    wait_s: float

    def describe(self) -> str:
        return (f"{self.n_devices:,} devices: {self.set_pulses:,} SET + {self.reset_pulses:,} RESET pulses "
                f"(at most {self.set_pulses_per_device} SET + {self.reset_pulses_per_device} RESET per device), "
                f"{self.read_calls:,} read calls = {self.device_reads:,} device reads, "
                f"{self.wait_s:,.0f} s of waiting for drift")


def per_device_pulses(plan: CharacterizationPlan, n_devices: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """SET and RESET pulses each of n_devices will get (drift levels go round-robin over the devices)."""
    shapes = len(plan.set_shapes)
    set_p = np.full(n_devices, shapes * plan.n_pulses, np.int64)
    reset_p = np.full(n_devices, shapes, np.int64)
    if plan.drift:
        set_p += drift_levels(plan, n_devices)
        reset_p += 1
    return set_p, reset_p


def drift_levels(plan: CharacterizationPlan, n_devices: int) -> npt.NDArray[np.int64]:
    """SET pulse count from RESET of each device in the drift experiment."""
    lv = np.asarray(plan.levels(), np.int64)
    return lv[np.arange(n_devices) % lv.size]


def cost(plan: CharacterizationPlan, n_devices: int) -> Cost:
    """Pulses and reads the plan costs on n_devices devices (known before anything is sent)."""
    set_p, reset_p = per_device_pulses(plan, n_devices)
    shapes = len(plan.set_shapes)
    calls = shapes * (plan.n_pulses + 1) + 2 * plan.noise_reads + (plan.drift_reads if plan.drift else 0)
    return Cost(n_devices, int(set_p.max()), int(reset_p.max()), int(set_p.sum()), int(reset_p.sum()),
                calls, calls * n_devices, plan.drift_span_s if plan.drift else 0.0)


def check_feasible(driver: ArrayDriver, plan: CharacterizationPlan, addresses: npt.NDArray[np.int64]) -> Cost:
    """Refuse (typed error, nothing sent) a plan the devices, the limits or the pulse budget cannot take."""
    addr = driver.geometry.check_addresses(addresses)
    if addr.size < MIN_DEVICES:
        raise InsufficientData(f"{addr.size} devices are too few for a meaningful fit; use at least {MIN_DEVICES}")
    lim = driver.limits
    for shape in plan.set_shapes:
        lim.check_shape("set", shape, lim.set_amplitude_ua, lim.set_width_ns)
    lim.check_shape("reset", plan.reset_shape, lim.reset_amplitude_ua, lim.reset_width_ns)
    hi = driver.geometry.n_devices - 1 if lim.address_max is None else min(lim.address_max, driver.geometry.n_devices - 1)
    bad = np.flatnonzero((addr < lim.address_min) | (addr > hi))
    if bad.size:
        raise SafetyViolation("address range", f"address outside the allowed range {lim.address_min} .. {hi}",
                              int(addr[bad[0]]))
    set_p, reset_p = per_device_pulses(plan, addr.size)
    after = driver.lifetime_pulses[addr] + set_p + reset_p
    over = np.flatnonzero(after > lim.lifetime_pulse_budget)
    if over.size:
        i = int(over[0])
        raise SafetyViolation("lifetime_pulse_budget",
                              f"calibration would bring the device to {int(after[i])} pulses, budget "
                              f"{lim.lifetime_pulse_budget} ({over.size} devices over budget)", int(addr[i]))
    return cost(plan, addr.size)


def wait_for(driver: ArrayDriver) -> Wait:
    """How to let time pass on this driver: simulated time on a MockDriver, nothing on a ReplayDriver (its
    clock is the log's: the logged reads carry the times the logged run waited for), wall time on anything else."""
    if isinstance(driver, (MockDriver, ReplayDriver)):
        return driver.advance
    return time.sleep


def clock_stands_still(driver: ArrayDriver, wait: Wait, probe_s: float = 0.2) -> str | None:
    """Why drift cannot be measured on this driver (wait(s) does not move its clock), or None when it can.

    An emulated tester keeps simulated time that only its operations advance, and the tester protocol
    has no command to advance it: the host can sleep, but every drift read would come at once.
    On a ReplayDriver the logged run decided: its reason if it skipped drift (the log's
    calibration_drift_skipped attribute), else None (no probe: its clock is the log's, which waiting
    does not move, and the probe's wait was never a logged operation).
    """
    if isinstance(driver, ReplayDriver):
        logged = driver.log_attrs.get(DRIFT_SKIPPED_ATTR)
        return None if logged is None else str(logged).removeprefix(DRIFT_SKIPPED_PREFIX)
    t = driver.now()
    wait(probe_s)
    moved = driver.now() - t
    if moved >= 0.5 * probe_s:
        return None
    return (f"the clock of {driver.identity!r} moved {moved:.3g} s while the host waited {probe_s:g} s (an emulated "
            "tester keeps simulated time that only its operations advance, and nothing can advance it)")


def check_clock_follows_wait(driver: ArrayDriver, wait: Wait, probe_s: float = 0.2) -> None:
    """Refuse a drift experiment when wait(s) does not move the driver's clock: its reads would all come at once."""
    why = clock_stands_still(driver, wait, probe_s)
    if why is not None:
        raise CalibrationError(f"{why}: drift cannot be measured on this driver; run without the drift experiment "
                               "(--no-drift)")


def runnable_plan(driver: ArrayDriver, plan: CharacterizationPlan,
                  wait: Wait | None = None) -> tuple[CharacterizationPlan, str | None]:
    """The plan this driver can run: without drift, and why, where waiting does not move its clock."""
    if not plan.drift:
        return plan, None
    why = clock_stands_still(driver, wait if wait is not None else wait_for(driver))
    if why is None:
        return plan, None
    return plan.model_copy(update={"drift": False}), f"{DRIFT_SKIPPED_PREFIX}{why}"


class _Session:
    """The driver the experiments talk to, its read log, program ids and progress."""

    def __init__(self, driver: ArrayDriver, progress: Reporter) -> None:
        self.driver = driver
        self.progress_task = progress.task
        self.step = 0
        self.stage = "setting up"           # the experiment running now, for messages
        last = driver.last_program_id()
        self.next_id = (last or 0) + 1

    def task(self, label: str, total: int):
        """The progress task of one experiment (label: what it is), which is also the stage messages name."""
        self.stage = label
        return self.progress_task(label, total)

    def read(self, addresses: npt.NDArray[np.int64], reason: str) -> tuple[npt.NDArray[np.float64], float]:
        d = self.driver
        if hasattr(d, "reading"):
            d.step = self.step
            with d.reading(reason):
                r = d.read(addresses)
        else:
            r = d.read(addresses)
        self.step += 1
        return np.asarray(r.conductances_us, np.float64), float(r.t_s)

    def apply(self, addresses: npt.NDArray[np.int64], set_counts: npt.NDArray[np.int64],
              reset: npt.NDArray[np.bool_], shapes: PulseShapes) -> None:
        """Apply, split into programs the limits allow (devices per program, SET pulses per program)."""
        lim = self.driver.limits
        per = lim.max_devices_per_program
        remaining = set_counts.copy()
        first = True
        while first or remaining.any():
            take = np.minimum(remaining, lim.max_set_pulses_per_device)
            rst = reset if first else np.zeros_like(reset)
            for lo in range(0, addresses.size, per):
                sl = slice(lo, lo + per)
                if not (take[sl].any() or rst[sl].any()):
                    continue
                if hasattr(self.driver, "reading"):
                    self.driver.step = self.step
                self.driver.apply(PulseProgram(self.next_id, addresses[sl], take[sl], rst[sl], shapes))
                self.next_id += 1
            remaining -= take
            first = False


def run_characterization(driver: ArrayDriver, addresses: npt.ArrayLike, plan: CharacterizationPlan, *,
                         writer=None, wait: Wait | None = None, progress: Reporter | Progress | None = None,
                         check_clock: bool = True) -> CalibrationData:
    """Run pulse response (per SET shape), read noise and drift on addresses; return what was read.

    writer: a drivers.runlog.RunLogWriter; every read and program goes to it through LoggedDriver.
    wait(seconds) lets time pass between drift reads (default: wait_for(driver)); check_clock=False skips
    the check that it moves the driver's clock (benchmarks that time the reads only, and callers that
    checked it already). progress: a calibration.progress Reporter or a started rich Progress.
    """
    addr = driver.geometry.check_addresses(addresses)
    check_feasible(driver, plan, addr)
    wait = wait if wait is not None else wait_for(driver)
    # Before anything is written or sent: a refused drift experiment leaves no log behind.
    if plan.drift and check_clock:
        check_clock_follows_wait(driver, wait)
    reporter = as_reporter(progress)
    if writer is not None:
        from drivers.logged import LoggedDriver
        session = _Session(LoggedDriver(driver, writer), reporter)
        writer.set_attrs(**{PLAN_ATTR: plan.model_dump_json(), "calibration_identity": driver.identity,
                            "calibration_started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "calibration_limits": driver.limits.model_dump_json()})
        writer.write_array(ADDRESSES_ARRAY, addr)
        if plan.drift:
            writer.write_array(LEVELS_ARRAY, drift_levels(plan, addr.size))
    else:
        session = _Session(driver, reporter)
    pulse: list[PulseData] = []
    noise: NoiseData | None = None
    try:
        for i, shape in enumerate(plan.set_shapes):
            reads, noise_i = _pulse_response(session, addr, plan, shape, with_noise=(i == 0))
            pulse.append(PulseData(shape, reads))
            noise = noise if noise is not None else noise_i
        assert noise is not None
        drift = _drift(session, addr, plan, wait) if plan.drift else None
    except ReplayMismatch as e:
        where = driver.log_path if isinstance(driver, ReplayDriver) else driver.identity
        raise ReplayDiverged(f"the replay of {where} diverged at calibration step {session.step} "
                             f"({session.stage}): {e}") from e
    if isinstance(driver, ReplayDriver) and driver.remaining:
        raise ReplayDiverged(f"the replay of {driver.log_path} ended at calibration step {session.step} with "
                             f"{driver.remaining} of the log's {driver.replayed + driver.remaining} operations not "
                             f"replayed (the log's next: {driver.next_operation()}): the plan differs from the "
                             f"logged run's")
    if writer is not None and drift is not None:
        writer.set_attrs(**{T_PROG_ATTR: drift.t_prog_s})
    if writer is not None:
        writer.flush()
    return CalibrationData(plan, addr, pulse, noise, drift, driver.identity)


def _pulse_response(s: _Session, addr: np.ndarray, plan: CharacterizationPlan, shape: PulseShape,
                    with_noise: bool) -> tuple[np.ndarray, NoiseData | None]:
    k = plan.n_pulses
    r = plan.noise_reads if with_noise else 0
    shapes = PulseShapes(set=shape, reset=plan.reset_shape)
    n = addr.size
    zeros = np.zeros(n, np.int64)
    ones = np.ones(n, np.int64)
    reads = np.empty((k + 1, n))
    after_reset = np.empty((r, n))
    after_pulses = np.empty((r, n))
    label = f"pulse response {shape.amplitude_ua:g} uA x {shape.width_ns:g} ns"
    with s.task(label, k + 1 + 2 * r) as tick:
        s.apply(addr, zeros, np.ones(n, np.bool_), shapes)
        reads[0], _ = s.read(addr, REASON_PULSE)
        tick()
        for j in range(r):
            after_reset[j], _ = s.read(addr, REASON_NOISE)
            tick()
        for p in range(1, k + 1):
            s.apply(addr, ones, np.zeros(n, np.bool_), shapes)
            reads[p], _ = s.read(addr, REASON_PULSE)
            tick()
        for j in range(r):
            after_pulses[j], _ = s.read(addr, REASON_NOISE)
            tick()
    return reads, (NoiseData(after_reset, after_pulses) if with_noise else None)


def _drift(s: _Session, addr: np.ndarray, plan: CharacterizationPlan, wait: Wait) -> DriftData:
    levels = drift_levels(plan, addr.size)
    shapes = PulseShapes(set=plan.set_shapes[0], reset=plan.reset_shape)
    targets = plan.drift_times_s()
    reads = np.empty((targets.size, addr.size))
    times = np.empty(targets.size)
    with s.task(f"drift over {plan.drift_span_s:g} s", targets.size) as tick:
        t_prog = s.driver.now()
        s.apply(addr, levels, np.ones(addr.size, np.bool_), shapes)
        for j, target in enumerate(targets):
            remaining = target - (s.driver.now() - t_prog)
            if remaining > 0:
                wait(remaining)
            reads[j], times[j] = s.read(addr, REASON_DRIFT)
            tick()
    return DriftData(levels, float(t_prog), times, reads)


def plan_summary(plan: CharacterizationPlan, c: Cost) -> str:
    """One paragraph for the console: what will be done and what it costs."""
    shapes = ", ".join(f"{s.amplitude_ua:g} uA x {s.width_ns:g} ns" for s in plan.set_shapes)
    drift = (f"drift at {plan.drift_reads} log-spaced times {plan.drift_first_s:g} .. {plan.drift_span_s:g} s, levels "
             f"{plan.levels()} SET pulses" if plan.drift else "no drift experiment")
    return (f"pulse response: RESET, {plan.n_pulses} SET pulses one at a time ({shapes}); read noise: "
            f"{plan.noise_reads} reads after RESET and after the train; {drift}.\nCost: {c.describe()}.")
