"""Characterize a chip end to end: experiments logged to HDF5, the fit, the parameter file and plots."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from rich.progress import Progress

from drivers.base import ArrayDriver
from sim import PCMParams

from .data import CalibrationData, CharacterizationPlan, load_calibration_log
from .errors import OutputExists
from .experiments import Wait, check_feasible, run_characterization
from .fit import CalibrationWarning, ModelFit, fit_model
from .report import add_result, write_result

LOG_FILE = "calibration.h5"


@dataclass(frozen=True)
class Characterization:
    log: Path
    params_file: Path
    fit: ModelFit
    data: CalibrationData


def characterize(driver: ArrayDriver, addresses: npt.ArrayLike, plan: CharacterizationPlan, out: str | Path, *,
                 wait: Wait | None = None, progress: Progress | None = None, prior: PCMParams | None = None,
                 bootstrap: int = 40, seed: int = 0) -> Characterization:
    """Run the experiments into out/calibration.h5, fit the log, write out/pcm.toml and the plots.

    out must not exist. If the fit fails, the log stays in out (fit it again with fit_log) and the
    error propagates.
    """
    out = Path(out)
    if out.exists():
        raise OutputExists(f"{out} exists already; choose a new folder (nothing is overwritten)")
    addr = driver.geometry.check_addresses(np.asarray(addresses))
    check_feasible(driver, plan, addr)  # before the folder exists: a refused plan leaves nothing behind
    from drivers.runlog import RunLogWriter

    out.mkdir(parents=True)
    log = out / LOG_FILE
    with RunLogWriter(log, attrs={"run_kind": "calibration"}) as writer:
        run_characterization(driver, addr, plan, writer=writer, wait=wait, progress=progress)
    data = load_calibration_log(log)
    fit = _fit_quietly(data, prior, bootstrap, seed)
    params_file = add_result(out, fit, data, seed=seed)
    return Characterization(log, params_file, fit, data)


def fit_log(log: str | Path, out: str | Path, *, prior: PCMParams | None = None, bootstrap: int = 40,
            seed: int = 0) -> Characterization:
    """Fit a calibration log; write out/pcm.toml and the plots (out must not exist)."""
    out = Path(out)
    if out.exists():
        raise OutputExists(f"{out} exists already; choose a new folder (nothing is overwritten)")
    data = load_calibration_log(log)
    fit = _fit_quietly(data, prior, bootstrap, seed)
    params_file = write_result(out, fit, data, seed=seed)
    return Characterization(Path(log), params_file, fit, data)


def _fit_quietly(data: CalibrationData, prior: PCMParams | None, bootstrap: int, seed: int) -> ModelFit:
    # The warnings are kept in fit.warnings (and the TOML); the caller shows them once.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        return fit_model(data, prior=prior, bootstrap=bootstrap, seed=seed)
