"""Characterize a chip end to end: experiments logged to HDF5, the fit, the parameter file and plots."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from rich.progress import Progress

from drivers.base import ArrayDriver
from sim import PCMParams

from .data import DRIFT_SKIPPED_ATTR, CalibrationData, CharacterizationPlan, load_calibration_log
from .errors import OutputExists, ReplayDiverged
from .experiments import Wait, check_feasible, run_characterization, runnable_plan
from .fit import CalibrationWarning, ModelFit, fit_model
from .progress import Reporter, as_reporter
from .report import add_result, write_result

LOG_FILE = "calibration.h5"
#: Root attributes of a calibration log: the seed and bootstrap resamples its fit was made with (what
#: `characterize --driver replay:LOG` takes by default, so the replay's fit is the logged run's).
FIT_SEED_ATTR = "calibration_fit_seed"
FIT_BOOTSTRAP_ATTR = "calibration_fit_bootstrap"


@dataclass(frozen=True)
class Characterization:
    log: Path
    params_file: Path
    fit: ModelFit
    data: CalibrationData
    drift_skipped: str | None = None  # why the plan's drift experiment was not run


def characterize(driver: ArrayDriver, addresses: npt.ArrayLike, plan: CharacterizationPlan, out: str | Path, *,
                 wait: Wait | None = None, progress: Reporter | Progress | None = None,
                 prior: PCMParams | None = None, bootstrap: int = 40, seed: int = 0,
                 drift_skipped: str | None = None) -> Characterization:
    """Run the experiments into out/calibration.h5, fit the log, write out/pcm.toml and the plots.

    out must not exist. If the fit fails, the log stays in out (fit it again with fit_log) and the
    error propagates. Over a ReplayDriver (a calibration log re-served) a replay that departs from the
    log raises ReplayDiverged and leaves no out; the log records seed and bootstrap for such a replay.
    A drift experiment the driver cannot run (waiting does not move its clock: runnable_plan) is skipped
    with a CalibrationWarning; the reason goes to the log, pcm.toml and result.drift_skipped.
    drift_skipped: the reason, where the caller ran runnable_plan itself.
    """
    out = Path(out)
    if out.exists():
        raise OutputExists(f"{out} exists already; choose a new folder (nothing is overwritten)")
    addr = driver.geometry.check_addresses(np.asarray(addresses))
    check_feasible(driver, plan, addr)  # before the folder exists: a refused plan leaves nothing behind
    if plan.drift:
        plan, drift_skipped = runnable_plan(driver, plan, wait)
        if drift_skipped is not None:
            warnings.warn(drift_skipped, CalibrationWarning, stacklevel=2)
    from drivers.runlog import RunLogWriter

    out.mkdir(parents=True)
    log = out / LOG_FILE
    attrs: dict[str, object] = {"run_kind": "calibration", FIT_SEED_ATTR: int(seed),
                                FIT_BOOTSTRAP_ATTR: int(bootstrap)}
    if drift_skipped is not None:
        attrs[DRIFT_SKIPPED_ATTR] = drift_skipped
    reporter = as_reporter(progress)
    try:
        with RunLogWriter(log, attrs=attrs) as writer:
            # runnable_plan probed the clock already (or the plan has no drift).
            run_characterization(driver, addr, plan, writer=writer, wait=wait, progress=reporter, check_clock=False)
    except ReplayDiverged:
        # out holds a part of a copy of the replayed log, nothing measured: the original is the record.
        shutil.rmtree(out, ignore_errors=True)
        raise
    data = load_calibration_log(log)
    fit = _fit_quietly(data, prior, bootstrap, seed, reporter)
    params_file = add_result(out, fit, data, seed=seed, progress=reporter)
    return Characterization(log, params_file, fit, data, drift_skipped)


def fit_log(log: str | Path, out: str | Path, *, prior: PCMParams | None = None, bootstrap: int = 40,
            seed: int = 0, progress: Reporter | Progress | None = None) -> Characterization:
    """Fit a calibration log; write out/pcm.toml and the plots (out must not exist)."""
    out = Path(out)
    if out.exists():
        raise OutputExists(f"{out} exists already; choose a new folder (nothing is overwritten)")
    reporter = as_reporter(progress)
    data = load_calibration_log(log)
    fit = _fit_quietly(data, prior, bootstrap, seed, reporter)
    params_file = write_result(out, fit, data, seed=seed, progress=reporter)
    skipped = data.attrs.get(DRIFT_SKIPPED_ATTR)
    return Characterization(Path(log), params_file, fit, data, None if skipped is None else str(skipped))


def _fit_quietly(data: CalibrationData, prior: PCMParams | None, bootstrap: int, seed: int,
                 progress: Reporter) -> ModelFit:
    # The warnings are kept in fit.warnings (and the TOML); the caller shows them once.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        return fit_model(data, prior=prior, bootstrap=bootstrap, seed=seed, progress=progress)
