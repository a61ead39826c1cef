"""The run config: pydantic models loaded from TOML, every field validated, unknown keys refused.

Units: conductance in microsiemens (uS), time in seconds, weights in weight units (W = beta * dG).
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

from drivers import PulseShapes, SafetyLimits, SafetyViolation
from sim.files import TomlFileError, read_toml

from .mapping import per_layer


class ConfigError(ValueError):
    """A run config is unreadable or invalid; the message names the file and the offending key."""


#: Integers and booleans as TOML writes them: `epochs = true` or `epochs = 2.0` is refused, not taken as 1 or 2.
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
#: Seeds: numpy takes non-negative integers only.
Seed = Annotated[int, Strict(), Field(ge=0, le=2**63 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=False)


class CnnConfig(_Strict):
    """network.kind = "cnn": LeNet-style, [conv, activation, 2x2 max-pool] per channels entry, then fully connected."""

    channels: list[Annotated[int, Strict(), Field(ge=1, le=4096)]] = Field([8, 16], min_length=1,
                                                                          description="Output channels per conv layer.")
    kernel: Int = Field(5, ge=1, le=15, description="Square kernel size of every conv layer.")
    padding: Int = Field(0, ge=0, le=15, description="Zero padding of every conv layer.")
    pool: Bool = Field(True, description="2x2 max-pool after each conv layer.")
    fc: list[Annotated[int, Strict(), Field(ge=1, le=100_000)]] = Field([128], description="Hidden fully connected "
                                                                                         "widths before the output.")
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"


class LstmConfig(_Strict):
    """network.kind = "lstm": a character-level language model; embedding (digital), LSTM and read-out on the array."""

    embedding: Int = Field(16, ge=1, le=4096, description="Embedding width (digital, plain SGD beside the array).")
    hidden: Int = Field(64, ge=1, le=4096, description="Hidden units of each LSTM layer.")
    layers: Literal[1, 2] = Field(1, description="LSTM layers (1 or 2), each one block on the array.")
    bptt: Int = Field(32, ge=1, le=4096, description="Characters per training item: truncated backpropagation "
                                                     "through time over this many steps.")


class GanConfig(_Strict):
    """network.kind = "gan" (hil/gan.py): generator z -> g_hidden -> image (sigmoid), discriminator image -> d_hidden
    -> 1 logit; both on the array unless network.digital names "generator" or "discriminator"."""

    z_dim: Int = Field(32, ge=1, le=4096, description="Noise inputs of the generator (standard normal).")
    g_hidden: list[Annotated[int, Strict(), Field(ge=1, le=100_000)]] = Field([128], min_length=1, description="Generator hidden widths.")
    d_hidden: list[Annotated[int, Strict(), Field(ge=1, le=100_000)]] = Field([128], min_length=1, description="Discriminator hidden widths.")
    leak: float = Field(0.2, ge=0, lt=1, description="Slope of the hidden layers' leaky ReLU below 0 (0: ReLU).")
    eval_samples: Int = Field(2000, ge=10, le=100_000, description="Generated digits (fixed noise) scored per "
                                                                   "evaluation, against as many test digits.")
    classifier_cache: str | None = Field(None, description="Folder of the metric's cached feature classifier "
                                                           "(default $PCM_HIL_CACHE/gan-classifier, else "
                                                           "~/.cache/pcm-hil/gan-classifier).")


class NetworkConfig(_Strict):
    """The network (docs/networks.md): the paper's MLP, a LeNet-style CNN, or a torch module of your own."""

    kind: Literal["mlp", "cnn", "module", "lstm", "gan"] = Field("mlp", description="mlp: inputs -> hidden -> classes, "
                                                         "sigmoid; cnn: [network.cnn]; module: network.module; "
                                                         "lstm: [network.lstm] on data.name = \"text\"; "
                                                         "gan: [network.gan] on image data.")
    hidden: list[Annotated[int, Strict(), Field(ge=1, le=100_000)]] = Field([250], description="mlp: hidden layer widths.")
    activation: Literal["sigmoid"] = Field("sigmoid", description="mlp: hidden activation (the paper's MLP uses sigmoid).")
    init_scale: float = Field(1.0, gt=0, description="mlp: initial weights ~ U(-s*sqrt(6/(fan_in+fan_out)), +...), s = this.")
    cnn: CnnConfig = Field(default_factory=CnnConfig)
    # None unless given (not a default table), so the TOML and digest of every other kind's config stay as they were
    lstm: LstmConfig | None = Field(None, description="kind = lstm: the language model's sizes (defaults if absent).")
    gan: GanConfig | None = Field(None, description="kind = gan: the GAN's sizes and metric (defaults if absent).")
    module: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                               description="kind = module: 'package.module:function', a function returning the "
                                           "torch.nn.Module to train (network.options are its keyword arguments).")
    options: dict[str, Any] = Field(default_factory=dict, description="kind = module: keyword arguments of the function.")
    digital: list[str] = Field(default_factory=list, description="Module names (as named_modules() gives them) kept "
                                                               "off the chip, trained by plain SGD.")

    @model_validator(mode="after")
    def _kind_options(self) -> Self:
        if (self.kind == "module") != (self.module is not None):
            raise ValueError("network.module names the model of kind = \"module\", and only of it")
        if self.options and self.kind != "module":
            raise ValueError("network.options are passed to network.module only (network.kind = \"module\")")
        if self.lstm is not None and self.kind != "lstm":
            raise ValueError("[network.lstm] configures network.kind = \"lstm\" only")
        if self.gan is not None and self.kind != "gan":
            raise ValueError("[network.gan] configures network.kind = \"gan\" only")
        if self.digital and self.kind == "mlp":
            raise ValueError("network.digital: the mlp has every layer on the array; use kind = \"module\" to keep "
                             "layers digital")
        return self

    @property
    def lstm_options(self) -> LstmConfig:
        """[network.lstm], or its defaults where the config has none."""
        return self.lstm if self.lstm is not None else LstmConfig()

    @property
    def gan_options(self) -> GanConfig:
        """[network.gan], or its defaults where the config has none."""
        return self.gan if self.gan is not None else GanConfig()


class DataConfig(_Strict):
    """Training data. MNIST is looked up at path, then $PCM_HIL_MNIST, then the offline copy, then downloaded."""

    name: Literal["mnist", "digits", "cifar10", "text"] = "mnist"
    path: str | None = Field(None, description="mnist: folder holding the four MNIST IDX .gz files; cifar10: the "
                                               "cifar-10-batches-py folder, the folder above it, or "
                                               "cifar-10-python.tar.gz (else $PCM_HIL_CIFAR10); text: a UTF-8 "
                                               "text file (default: Python's pydoc_data.topics); docs/data.md.")
    train_limit: Int | None = Field(None, ge=1, description="Use only the first N training samples (text: windows).")
    test_limit: Int | None = Field(None, ge=1, description="Use only the first N test samples (text: validation "
                                                           "windows).")
    download: Bool = Field(True, description="Download MNIST when no local copy exists (MNIST only).")


class DriverConfig(_Strict):
    """Which array to train on. mock: in-process simulated chip; visa / serial: a tester behind a link;
    plugin: a lab's own driver (docs/drivers.md); replay: a run log re-served read for read (docs/run-log.md)."""

    kind: Literal["mock", "visa", "serial", "plugin", "replay"] = "mock"
    resource: str | None = Field(None, description="VISA resource string (kind=visa), serial URL (kind=serial), or "
                                                   "the run log (run.h5) to replay (kind=replay).")
    plugin: str | None = Field(None, description="kind=plugin: 'package.module:Class' or a name registered under "
                                                 "the pcm_hil.drivers entry point group.")
    options: dict[str, Any] = Field(default_factory=dict, description="kind=plugin: keyword arguments of the "
                                                                     "plugin's class or function.")
    dry_run: Bool = Field(False, description="Validate and log every program against the limits in force, send none "
                                             "(reads still go to the driver).")
    params_file: str | None = Field(None, description="PCM model parameters (TOML, [pcm] table) of the mock chip; "
                                                      "a [calibration] table's eps_us sets the default eps.")
    seed: Seed = Field(0, description="Seed of the mock chip.")
    analog_mvm: Bool = Field(False, description="Mock chip does the analog multiply (capability 'mvm').")
    device: Literal["cpu", "cuda"] | None = Field(None, description="Mock chip on the torch PCM model on this torch "
                                                 "device (sim/torch_model.py); unset: the numpy model "
                                                 "(docs/pcm-model.md). Unset, it leaves the config digest as it was.")
    timeout_s: float = Field(10.0, gt=0, le=3600, description="Link timeout, s (visa / serial).")
    visa_backend: str = Field("@py", description="pyvisa backend of kind=visa: '@py' pyvisa-py (default), '@ivi' or "
                                                 "'' the installed NI-VISA / Keysight library, or a VISA library's "
                                                 "path. A link setting: not part of the config digest.")
    reconnect_window_s: float = Field(60.0, ge=0, le=86400, description="How long a lost link is retried with "
                                                                        "backoff before the run stops resumably, s.")
    limits: SafetyLimits = Field(default_factory=SafetyLimits, description="Safety limits checked before any I/O; "
                                 "the limits in force are these, the built-in defaults and the tester's (LIM?), "
                                 "whichever is strictest.")
    uncalibrated_ok: Bool = Field(False, description="Train on a tester with neither driver.params_file nor "
                                                     "update.eps = \"auto\" (the host then assumes the default model; "
                                                     "pcm-hil train --uncalibrated sets it).")
    allow_wider_limits: Bool = Field(False, description="Let driver.limits be wider than the built-in defaults "
                                                        "(logged in the run log); never wider than the tester's.")
    shapes: PulseShapes = Field(default_factory=PulseShapes, description="SET and RESET pulse shapes.")

    @model_validator(mode="after")
    def _resource_given(self) -> Self:
        if self.kind in ("visa", "serial") and not self.resource:
            raise ValueError(f"driver.kind = {self.kind!r} needs driver.resource (a VISA resource or serial URL)")
        if self.kind == "replay" and not self.resource:
            raise ValueError("driver.kind = \"replay\" needs driver.resource (the run log to replay, RUN_DIR/run.h5)")
        if (self.kind == "plugin") != (self.plugin is not None):
            raise ValueError("driver.plugin names the driver of kind = \"plugin\", and only of it")
        if self.options and self.kind != "plugin":
            raise ValueError("driver.options are passed to a plugin driver only (driver.kind = \"plugin\")")
        lim = self.limits
        wider = lim.wider_than(SafetyLimits())
        if wider and not self.allow_wider_limits:
            raise ValueError("driver.limits is wider than the built-in safety limits (" + "; ".join(wider)
                             + "); set driver.allow_wider_limits = true to insist (it is logged)")
        for name, shape, amp, width in (("set", self.shapes.set, lim.set_amplitude_ua, lim.set_width_ns),
                                        ("reset", self.shapes.reset, lim.reset_amplitude_ua, lim.reset_width_ns)):
            try:
                lim.check_shape(name, shape, amp, width)
            except SafetyViolation as e:
                raise ValueError(f"unsafe pulse shape: {e}") from None
        return self


class MappingConfig(_Strict):
    """How weights sit on the array: W = beta * (G+ - G-), one device pair per weight, bias as an extra row."""

    beta: list[Annotated[float, Field(gt=0, le=1000)]] | None = Field(
        None, description="Weight units per uS, one per layer; default: w_max / (g_range_us * devices_per_polarity).")
    w_max: list[Annotated[float, Field(gt=0, le=1000)]] = Field([0.5, 1.0], description="Largest |weight| per layer (used for the default beta); the last value repeats.")
    g_range_us: float = Field(8.0, gt=0, le=1000, description="Usable conductance range of one device, uS.")
    row0: Int = Field(0, ge=0, description="First array row used.")
    col0: Int = Field(0, ge=0, description="First array column used.")
    devices_per_polarity: Annotated[int, Strict(), Field(ge=1, le=16)] | list[Annotated[int, Strict(), Field(ge=1, le=16)]] = Field(
        1, description="Devices per polarity of each weight, W = beta * sum_k (G+_k - G-_k) (a multi-memristive "
                       "synapse): one for every layer, or one per layer (the last value repeats); each update "
                       "pulse goes to the polarity's device of lowest conductance, so write and read noise per "
                       "unit of weight fall as 1 / sqrt(N) (docs/training.md).")

    def copies(self, n_layers: int) -> list[int]:
        """devices_per_polarity of each of n_layers layers."""
        return per_layer(self.devices_per_polarity, n_layers)


class UpdateConfig(_Strict):
    """Mixed-precision update: chi accumulates -lr * grad; n = floor(|chi| / eps) SET pulses (capped)."""

    lr: float = Field(0.03, gt=0, le=10, description="Learning rate of the first epoch (above 1 is warned about).")
    lr_decay: float = Field(0.8, gt=0, le=1, description="Learning rate of epoch e (0-based) = lr * lr_decay**e.")
    batch_size: Int = Field(1, ge=1, le=4096)
    epochs: Int = Field(1, ge=1, le=1000)
    eps: list[Annotated[float, Field(gt=0)]] | Literal["auto"] | None = Field(
        None, description="Granularity in weight units per layer; default: [calibration].eps_us or the model's "
                          "granularity (uS per pulse) times beta; \"auto\": measured on the chip (a probe at start, "
                          "then the read-backs), with the open-loop pulse table (docs/training.md).")
    max_pulses_per_update: Int = Field(8, ge=1, description="Cap on n per weight per step.")
    torch_threads: Int = Field(1, ge=1, le=1024, description="torch intra-op threads of the torch model's steps "
                                                            "(batch-1 steps run fastest on one).")
    path: Literal["auto", "fast", "module"] = Field("auto", description="fast: hand-vectorized numpy MLP (batch 1, "
                                                                        "host copy); module: torch modules; auto: fast where possible.")


class ReadPolicyConfig(_Strict):
    """When the host copy of conductances is refreshed by reading the chip."""

    after_program: Bool = Field(True, description="Read back every device right after it is programmed.")
    every_steps: Int = Field(10_000, ge=0, description="Read the whole mapped array every K steps (drift); 0: never.")
    before_evaluation: Bool = Field(True, description="Read the whole mapped array before each evaluation.")
    average: Int = Field(1, ge=1, le=64, description="Reads averaged into the host copy each time devices are read "
                                                   "(read noise std / sqrt(average); each read is logged).")


class RefreshConfig(_Strict):
    """Refresh: when G+ or G- passes threshold_us, RESET both and reprogram the weight onto one device."""

    enabled: Bool = True
    threshold_us: float = Field(8.0, gt=0, le=1000, description="Refresh a pair when G+ or G- exceeds this, uS.")
    check_every_steps: Int = Field(20, ge=1, description="Check period, steps (cheap: only devices read since the last check are looked at).")
    mode: Literal["open-loop", "verify"] = Field("open-loop")
    verify_rounds: Int = Field(3, ge=1, le=20, description="Most program-and-verify rounds (mode=verify).")
    verify_tolerance_us: float = Field(0.5, gt=0, description="Verify stops once |G - target| is within this, uS.")


class ResponseConfig(_Strict):
    """The chip's measured pulse response (hil/response.py): the mismatch warning and the probe of eps = "auto"."""

    tolerance: float = Field(0.25, gt=0, le=10, description="Warn once when the measured response differs from the "
                                                           "host's by more than this fraction.")
    check_every_steps: Int = Field(100, ge=1, description="Compare measured and assumed response every N steps "
                                                          "(and at each checkpoint).")
    min_pulses: Int = Field(200, ge=1, description="SET pulses (per layer) or devices after RESET measured before "
                                                   "the figures are judged or followed.")
    probe_devices: Int = Field(256, ge=2, le=100_000, description="eps = \"auto\": devices of the mapped area "
                                                                  "probed at start.")
    probe_pulses: Int = Field(20, ge=4, le=1000, description="eps = \"auto\": SET pulses given one at a time after "
                                                             "the probe's RESET, each read back.")


class LoggingConfig(_Strict):
    """The HDF5 run log (run.h5): every read and every program."""

    enabled: Bool = True
    flush_interval_s: float = Field(2.0, gt=0, le=3600)


class CheckpointConfig(_Strict):
    every_steps: Int = Field(5000, ge=1, description="Atomic checkpoint every N steps (and at the end).")
    journal_fsync: Literal["auto", "always", "never"] = Field(
        "auto", description="fsync each journal record before its program is sent (survives a host crash or power "
                            "cut); auto: always on a tester, never on the in-process mock (whose chip dies with the host).")
    audit: Bool = Field(False, description="Also keep the float64 sum of all updates per weight in the checkpoint "
                                           "(accounting tests: chi + eps * net SET pulses must equal it).")


class RunConfig(_Strict):
    """Everything a training run needs; resolved and written to RUN_DIR/config.toml."""

    seed: Seed = Field(0, description="Seed of initialization and data order.")
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    driver: DriverConfig = Field(default_factory=DriverConfig)
    mapping: MappingConfig = Field(default_factory=MappingConfig)
    update: UpdateConfig = Field(default_factory=UpdateConfig)
    read_policy: ReadPolicyConfig = Field(default_factory=ReadPolicyConfig)
    refresh: RefreshConfig = Field(default_factory=RefreshConfig)
    response: ResponseConfig = Field(default_factory=ResponseConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _data_fits_network(self) -> Self:
        if (self.network.kind == "lstm") != (self.data.name == "text"):
            raise ValueError("network.kind = \"lstm\" (the character-level language model) trains on data.name = "
                             "\"text\", and text data only on it")
        return self

    def to_toml(self) -> str:
        """The config as TOML (None fields left out, so it loads back to an equal config)."""
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))

    def digest(self) -> str:
        """sha256 of the TOML form without the link settings (driver.resource, .timeout_s, .visa_backend,
        .reconnect_window_s, .options): a resume refuses a run whose config differs, but a tester may come back at another
        address (its identity is checked instead)."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["driver"].pop("resource", None)
        data["driver"].pop("timeout_s", None)
        data["driver"].pop("visa_backend", None)
        data["driver"].pop("reconnect_window_s", None)
        data["driver"].pop("options", None)  # a plugin's link settings; its identity is checked instead
        net = data["network"]
        if net.get("kind") == "mlp":
            # the other kinds' options came later: an MLP run's digest stays what it was (old runs resume)
            for k in ("kind", "cnn", "module", "options", "digital"):
                net.pop(k, None)
            if data["update"].get("torch_threads") == 1:
                data["update"].pop("torch_threads")
        # came later: the runs made before them keep their digest
        if data["read_policy"].get("average") == 1:
            data["read_policy"].pop("average")
        if data["mapping"].get("devices_per_polarity") == 1:
            data["mapping"].pop("devices_per_polarity")
        return hashlib.sha256(tomli_w.dumps(data).encode()).hexdigest()

    def with_overrides(self, **dotted: Any) -> RunConfig:
        """A copy with dotted keys replaced, e.g. {"update.epochs": 3}; validated like a file."""
        data = self.model_dump(mode="json", exclude_none=True)
        for key, value in dotted.items():
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"invalid run config command-line options:\n  {key}: {p} is not a table")
            node[leaf] = value
        return validate_config(data, "command-line options")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(e["loc"])
        lines.append(f"  {where}: {msg}")
    return f"invalid run config {source}:\n" + "\n".join(lines)


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    """' (did you mean 'x'?)' for a mistyped key, from the fields of the model it sits in."""
    model: Any = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate_config(data: dict[str, Any], source: str = "") -> RunConfig:
    """Validate a dict (as parsed from TOML) into a RunConfig; ConfigError names every bad key."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | Path) -> RunConfig:
    """Load and validate a run config TOML file."""
    try:
        data = read_toml(path, "run config file")
    except TomlFileError as e:
        raise ConfigError(str(e)) from None
    return validate_config(data, str(Path(path)))


def config_warnings(cfg: RunConfig) -> list[str]:
    """What a config allows but is unusual enough to say out loud before the first pulse."""
    out = []
    if cfg.update.lr > 1:
        out.append(f"update.lr = {cfg.update.lr:g} is unusually large (the paper's MLP uses 0.03)")
    if max(cfg.mapping.w_max) > 10:
        out.append(f"mapping.w_max = {cfg.mapping.w_max} is unusually large (default [0.5, 1.0])")
    if cfg.driver.allow_wider_limits:
        wider = cfg.driver.limits.wider_than(SafetyLimits())
        if wider:
            out.append("safety limits wider than the built-in defaults, by driver.allow_wider_limits: " + "; ".join(wider))
    if cfg.refresh.enabled and cfg.refresh.threshold_us > cfg.mapping.g_range_us:
        out.append(f"refresh.threshold_us = {cfg.refresh.threshold_us:g} lies above mapping.g_range_us = "
                   f"{cfg.mapping.g_range_us:g}")
    if cfg.driver.kind != "mock" and cfg.checkpoint.journal_fsync == "never":
        out.append("checkpoint.journal_fsync = \"never\" on a tester: a host crash can lose journal records, and "
                   "the run then cannot be resumed")
    return out
