"""What the host assumes about the chip, and how it reaches it: the model and eps per layer, the limits in
force, the driver a run config names, and the checks made before a run touches anything.

hil/run.py builds runs from these; calibration of a real chip is in calibration/ (docs/calibration.md).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass

import numpy as np

from drivers import ArrayDriver, MockDriver, SafetyLimits
from sim import PCMParams
from sim.response import granularity_us, pulse_response

from .config import ConfigError, RunConfig, config_warnings
from .data import Dataset
from .mapping import Mapping
from .response import ResponseLaw
from .sizing import MOCK_BYTES_PER_DEVICE, TORCH_MOCK_BYTES_PER_DEVICE, check_run_fits


@dataclass
class ChipModel:
    """What the host assumes about the chip: model parameters, mean pulse response, and eps per layer."""

    params: PCMParams
    granularity_us: float
    calibrated_eps_us: float | None
    mean_response_us: np.ndarray

    @property
    def law(self) -> ResponseLaw:
        """The mean SET increment the host assumes (what the read-backs are compared with)."""
        return ResponseLaw.from_params(self.params)


def chip_model(cfg: RunConfig) -> ChipModel:
    """Model parameters from driver.params_file (or the published fit); [calibration].eps_us if present."""
    path = cfg.driver.params_file
    eps_us = None
    if path:
        try:
            params = PCMParams.from_toml(path)
            with open(path, "rb") as f:
                cal = tomllib.load(f).get("calibration", {})
        except FileNotFoundError:
            raise ConfigError(f"driver.params_file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, ValueError) as e:
            raise ConfigError(f"driver.params_file {path} is not a valid PCM parameter file: {e}") from None
        if "eps_us" in cal:
            eps_us = float(cal["eps_us"])
            if not eps_us > 0:
                raise ConfigError(f"{path}: [calibration].eps_us must be positive, got {eps_us}")
    else:
        params = PCMParams()
    cap = cfg.driver.limits.max_set_pulses_per_device
    resp = pulse_response(params, n_devices=2000, n_pulses=cap, seed=0)
    return ChipModel(params, granularity_us(params), eps_us, resp.mean_us)


def layer_shapes(cfg: RunConfig, data: Dataset) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of each analog layer of the run's network (hil/networks.py); for the MLP without making
    its weights (a network too large for the array or the memory is refused by its shapes alone)."""
    if cfg.network.kind == "mlp":
        sizes = [data.n_features, *cfg.network.hidden, data.n_classes]
        return list(zip(sizes[:-1], sizes[1:], strict=True))
    from .networks import build_network

    return build_network(cfg, data).shapes


def betas(cfg: RunConfig, n_layers: int) -> list[float]:
    """Weight units per uS per layer: mapping.beta, else w_max / g_range_us (the last w_max repeats)."""
    m = cfg.mapping
    if m.beta is not None:
        if len(m.beta) != n_layers:
            raise ConfigError(f"mapping.beta has {len(m.beta)} values, the network has {n_layers} layers")
        return list(m.beta)
    w = [m.w_max[min(i, len(m.w_max) - 1)] for i in range(n_layers)]
    return [x / (m.g_range_us * n) for x, n in zip(w, m.copies(n_layers), strict=True)]


def eps_per_layer(cfg: RunConfig, model: ChipModel, beta: list[float]) -> list[float]:
    """update.eps, else (calibrated eps_us, else the model's granularity) times beta, per layer.

    With update.eps = "auto" this is where eps starts until the probe (probe_response) measured the chip.
    """
    if isinstance(cfg.update.eps, list):
        if len(cfg.update.eps) != len(beta):
            raise ConfigError(f"update.eps has {len(cfg.update.eps)} values, the network has {len(beta)} layers")
        return list(cfg.update.eps)
    g = model.calibrated_eps_us if model.calibrated_eps_us is not None else model.granularity_us
    return [g * b for b in beta]


def require_calibration(cfg: RunConfig) -> None:
    """ConfigError for a new run on a tester the host knows nothing about: no driver.params_file, eps not "auto".

    The host would program the default model's response, which no real chip has (docs/training.md).
    """
    d = cfg.driver
    if d.kind in ("mock", "replay") or d.params_file or cfg.update.eps == "auto" or d.uncalibrated_ok \
            or getattr(d, "dry_run", False):
        return
    raise ConfigError("this chip is not calibrated: the host would assume the default PCM model's pulse response "
                      "(eps and the open-loop table), which no real chip has. Either characterize it first "
                      "(pcm-hil characterize --driver RESOURCE --out DIR, then driver.params_file = "
                      "\"DIR/pcm.toml\"), or measure it during the run (update.eps = \"auto\"), or pass "
                      "--uncalibrated (driver.uncalibrated_ok = true) to train on the default model anyway")


def limits_in_force(cfg: RunConfig) -> SafetyLimits:
    """The host's limits: the config's, never wider than the built-in defaults unless driver.allow_wider_limits.

    A tester's own LIM? narrows them further (TesterDriver intersects them).
    """
    lim = cfg.driver.limits
    return lim if cfg.driver.allow_wider_limits else lim.intersect(SafetyLimits())


def make_driver(cfg: RunConfig, shapes: list[tuple[int, int]], model: ChipModel) -> ArrayDriver:
    """The array the config names: an in-process mock sized to the network's layers (fan_in, fan_out), or a
    tester over VISA / serial, or a plugin, or a replay of a run log (which checks the programs of a dry run
    too, so it is never wrapped in a DryRunDriver)."""
    d = cfg.driver
    if d.device is not None and d.kind != "mock":
        raise ConfigError(f'driver.device = "{d.device}" selects the torch model of the simulated chip '
                          f'(driver.kind = "mock"); driver.kind = "{d.kind}" has a chip of its own')
    if d.kind == "replay":
        from drivers.replay import ReplayDriver

        assert d.resource is not None
        replay = ReplayDriver(d.resource)
        try:
            replay.narrow_limits(limits_in_force(cfg))
        except BaseException:
            replay.close()
            raise
        return replay
    if d.kind == "mock":
        g = Mapping.geometry_for(shapes, cfg.mapping.row0, cfg.mapping.col0, cfg.mapping.copies(len(shapes)))
        # the torch model on "cpu" keeps float64 state in host memory; on "cuda" the state is on the GPU
        per_device = TORCH_MOCK_BYTES_PER_DEVICE if d.device == "cpu" else MOCK_BYTES_PER_DEVICE
        check_run_fits(g.n_devices, n_weights(shapes), simulated_chip=True, what=f"a {g.rows} x {g.cols} simulated chip",
                       chip_bytes_per_device=per_device)
        mock = MockDriver(g.rows, g.cols, params=model.params, seed=d.seed, limits=limits_in_force(cfg),
                          analog_mvm=d.analog_mvm, device=d.device)
        if d.dry_run:
            from drivers import DryRunDriver

            return DryRunDriver(mock)
        return mock
    if d.kind == "plugin":
        from drivers.plugins import make_plugin_driver

        assert d.plugin is not None
        inner: ArrayDriver = make_plugin_driver(d.plugin, d.options)
        try:
            # The plugin's own limits, narrowed by the host's: a plugin cannot widen what the config allows.
            inner.narrow_limits(limits_in_force(cfg))
        except BaseException:
            inner.close()
            raise
    else:
        from drivers.tester import TesterDriver

        assert d.resource is not None
        inner = TesterDriver.open(d.resource, timeout_s=d.timeout_s, limits=limits_in_force(cfg),
                                  reconnect_window_s=d.reconnect_window_s, backend=d.visa_backend)
    if d.dry_run:
        from drivers import DryRunDriver

        return DryRunDriver(inner)
    return inner


def n_weights(shapes: list[tuple[int, int]]) -> int:
    """Weights of layers with these (fan_in, fan_out), bias rows included."""
    return sum((a + 1) * b for a, b in shapes)


def check_shapes(cfg: RunConfig, limits: SafetyLimits) -> None:
    """SafetyViolation if the configured pulse shapes break the limits in force (checked before RUN_DIR exists)."""
    sh = cfg.driver.shapes
    limits.check_shape("set", sh.set, limits.set_amplitude_ua, limits.set_width_ns)
    limits.check_shape("reset", sh.reset, limits.reset_amplitude_ua, limits.reset_width_ns)


def run_warnings(cfg: RunConfig, model: ChipModel, beta: list[float], eps: list[float]) -> list[str]:
    """What is allowed but unusual enough to say before the first pulse."""
    out = config_warnings(cfg)
    gran = model.calibrated_eps_us if model.calibrated_eps_us is not None else model.granularity_us
    for i, (e, b) in enumerate(zip(eps, beta, strict=True)):
        ratio = e / (gran * b)
        if not 0.1 <= ratio <= 10:
            out.append(f"update.eps[{i}] = {e:g} is {ratio:.3g}x the chip's granularity ({gran:.3g} uS x beta "
                       f"{b:.3g}); one pulse then moves a weight by much {'more' if ratio < 1 else 'less'} than eps")
    return out


def journal_fsync(cfg: RunConfig) -> bool:
    """Whether each journal record is fsynced before its program is sent (docs/checkpoint.md)."""
    mode = cfg.checkpoint.journal_fsync
    return mode == "always" or (mode == "auto" and cfg.driver.kind not in ("mock", "replay"))

