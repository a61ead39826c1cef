"""Chip characterization through any driver, model fitting, and eps (docs/calibration.md).

characterize(driver, addresses, plan, out) runs the experiments into out/calibration.h5 and writes
out/pcm.toml with plots; fit_log(log, out) fits an existing calibration log.
"""

from .data import CalibrationData, CharacterizationPlan, load_calibration_log
from .errors import CalibrationError, FitDidNotConverge, InsufficientData, NotACalibrationLog, OutputExists
from .experiments import Cost, check_feasible, cost, run_characterization, runnable_plan
from .fit import CalibrationWarning, ModelFit, fit_model
from .run import Characterization, characterize, fit_log

__all__ = ["CalibrationData", "CalibrationError", "CalibrationWarning", "Characterization", "CharacterizationPlan",
           "Cost", "FitDidNotConverge", "InsufficientData", "ModelFit", "NotACalibrationLog", "OutputExists",
           "characterize", "check_feasible", "cost", "fit_log", "fit_model", "load_calibration_log",
           "run_characterization", "runnable_plan"]
