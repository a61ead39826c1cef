"""The MNIST GAN on the array (network.kind = "gan"): a generator and a discriminator, both analog by default.

Generator: z (network.gan.z_dim, standard normal) -> g_hidden (leaky ReLU) -> one image (sigmoid, pixels in
[0, 1] like the data). Discriminator: image -> d_hidden (leaky ReLU) -> one logit. The defaults, z 32 -> 128
-> 784 and 784 -> 128 -> 1, are a small MLP GAN: a step's torch work stays small on a 2-core host, it draws
digit-like strokes after 3 epochs of plain SGD, and the array is 785 x 2,082 devices (the generator's output
layer, 129 x 784 weights, is the largest block). network.digital = ["generator"] or ["discriminator"] keeps
that side off the chip (a torch layer trained by plain SGD), to show which side the chip hurts; its layers are
then absent from the mapping.

One training step (GanTask.step), from the weights of the step's start: the discriminator's loss on the
real batch and on the generator's fakes (detached), softplus cross-entropy, mean over each half; and the
generator's non-saturating loss -log D(G(z)). The discriminator's analog layers also see the generator
loss's backward (the gradient flows through them to the generator): those factors are dropped, so each
network is updated by its own loss only; the step's factors of both networks go to the array as one
program. The noise is drawn from step_rng(seed, step), so a resume's recomputation of a step is exact.

The metric (hil/gan_metric.py): the Frechet distance between generated and test digits in the feature
space of a small classifier trained once and cached, and the entropy of the generated digits' predicted
classes (bits, at most log2(10) = 3.32). Each evaluation draws a grid of 100 digits from fixed noise:
RUN_DIR/gan/epoch_NNN.png (the float baseline's: RUN_DIR/baseline/gan/epoch_NNN.png). See docs/networks.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .analog import AnalogLayer, ConvertError, convert
from .config import ConfigError, GanConfig, RunConfig
from .data import Dataset, load_dataset
from .gan_metric import (Classifier, class_entropy_bits, classifier_cache_dir, feature_stats, frechet_distance,
                         load_classifier, save_grid)
from .networks import Network, _network
from .tasks import Task, TaskStep, step_rng

if TYPE_CHECKING:
    from .trainer import Trainer

#: step_rng stream of a training step's noise.
NOISE_STREAM = 1
#: Seed tag of the fixed evaluation noise (the same at every evaluation, so grids and distances compare).
EVAL_NOISE_TAG = 0x6A4E
#: Digits in each evaluation's PNG grid (10 x 10).
GRID_DIGITS = 100
#: The two networks, as module names (network.digital takes them).
SIDES = ("generator", "discriminator")


class GanModel(nn.Module):
    """The generator and the discriminator in one module (model(z) generates); both are Sequentials."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)


def _mlp(sizes: list[int], leak: float, out: nn.Module | None) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i:
            mods.append(nn.LeakyReLU(leak) if leak > 0 else nn.ReLU())
        mods.append(nn.Linear(a, b))
    if out is not None:
        mods.append(out)
    return nn.Sequential(*mods)


def gan_module(n_pixels: int, opts: GanConfig) -> GanModel:
    """The torch GAN (float layers, torch's default init under the caller's seed) for images of n_pixels."""
    g = _mlp([opts.z_dim, *opts.g_hidden, n_pixels], opts.leak, nn.Sigmoid())
    d = _mlp([n_pixels, *opts.d_hidden, 1], opts.leak, None)
    return GanModel(g, d)


def build_network(cfg: RunConfig, data: Dataset) -> Network:
    """The run's GAN, converted to analog layers except the sides (or layers) named in network.digital;
    initialized from torch's default init under torch.manual_seed(cfg.seed)."""
    if data.input_shape is None:
        raise ConfigError(f"network.kind = \"gan\" needs image data; {data.name!r} is not images")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        raw = gan_module(data.n_features, cfg.network.gan_options)
    try:
        model = convert(raw, cfg.network.digital)
    except ConvertError as e:
        if set(SIDES) <= set(cfg.network.digital):
            raise ConfigError("network.digital keeps both the generator and the discriminator off the chip: "
                              "nothing is left for the array") from None
        raise ConfigError(str(e)) from None
    return _network("gan", model)


def _side(name: str) -> str:
    return name.partition(".")[0]


#: Classifiers already loaded in this process, by data set and cache folder (a PCM run and its baseline share one).
_CLASSIFIERS: dict[tuple[str, str | None, Path], Classifier] = {}


def metric_classifier(cfg: RunConfig, n_classes: int) -> Classifier:
    """The feature classifier of the run's data set (hil/gan_metric.py), trained on its full training split
    (data.train_limit does not apply; digits: the split of seed 0) and cached."""
    d = cfg.data
    folder = classifier_cache_dir(cfg.network.gan_options.classifier_cache)
    key = (d.name, d.path, folder)
    if key not in _CLASSIFIERS:
        full = load_dataset(d.name, d.path, d.download, 0)
        _CLASSIFIERS[key] = load_classifier(d.name, full.x_train, full.y_train, full.x_test, full.y_test, n_classes,
                                            folder)
    return _CLASSIFIERS[key]


class GanTask(Task):
    """The GAN's training step, its Frechet distance and its class entropy (see the module docstring)."""

    name = "gan"
    metric = "frechet_distance"
    label = "Frechet distance"
    higher_is_better = False
    train_metric = "train_d_loss"
    running_metric = "running_d_loss"
    running_label = "running D loss"
    running_title = "running discriminator loss"
    short = "FD"

    def __init__(self, cfg: RunConfig, data: Dataset, net: Network) -> None:
        super().__init__(cfg, data, net)
        self.opts = cfg.network.gan_options
        assert net.model is not None
        self.d_layers = [m for n, m in net.model.named_modules()
                         if isinstance(m, AnalogLayer) and _side(n) == "discriminator"]
        self.d_digital = [p for n, p in net.digital.items() if _side(n) == "discriminator"]
        n_eval = min(self.opts.eval_samples, len(data.y_test))
        self.z_eval = np.random.default_rng([cfg.seed, EVAL_NOISE_TAG]).standard_normal((n_eval, self.opts.z_dim))
        self._classifier: Classifier | None = None
        self._reference: tuple[np.ndarray, np.ndarray] | None = None
        self.last_entropy_bits = float("nan")

    def noise(self, step: int, n: int) -> np.ndarray:
        """The generator's input of a training step (n, z_dim): fixed by (seed, step)."""
        return step_rng(self.cfg.seed, step, NOISE_STREAM).standard_normal((n, self.opts.z_dim))

    def step(self, trainer: Trainer, idx: np.ndarray, step: int) -> TaskStep:
        model = trainer.model
        assert isinstance(model, GanModel)
        x = torch.from_numpy(np.ascontiguousarray(self.data.x_train[idx], np.float64))
        z = torch.from_numpy(self.noise(step, len(idx)))
        ones = torch.ones(len(idx), 1, dtype=torch.float64)
        fake = model.generator(z)
        # the discriminator's loss: real batch as real, fakes (no gradient to the generator) as fake
        loss_d = (F.binary_cross_entropy_with_logits(model.discriminator(x), ones)
                  + F.binary_cross_entropy_with_logits(model.discriminator(fake.detach()), 0 * ones))
        loss_d.backward()
        d_factors = {id(layer): layer.take_factors() for layer in self.d_layers}
        d_grads = [p.grad for p in self.d_digital]
        for p in self.d_digital:
            p.grad = None
        # the generator's non-saturating loss, from the same weights (D not yet updated)
        F.binary_cross_entropy_with_logits(model.discriminator(fake), ones).backward()
        for layer in self.d_layers:
            layer.take_factors()  # the generator loss's factors are not the discriminator's update
        for p, g in zip(self.d_digital, d_grads, strict=True):
            p.grad = g
        factors = [d_factors[id(layer)] if id(layer) in d_factors else layer.take_factors()
                   for layer in trainer.net.layers]
        return TaskStep(factors, float(loss_d.detach()) * len(idx))

    # ------------------------------------------------------------------ the metric
    def classifier(self) -> Classifier:
        if self._classifier is None:
            self._classifier = metric_classifier(self.cfg, self.data.n_classes)
        return self._classifier

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of the features of the first len(z_eval) test digits."""
        if self._reference is None:
            self._reference = feature_stats(self.classifier().features(self.data.x_test[:len(self.z_eval)]))
        return self._reference

    def generate(self, trainer: Trainer, z: np.ndarray) -> np.ndarray:
        """Images (n, pixels) in [0, 1] that the generator draws for noise z (n, z_dim), at its current weights."""
        model = trainer.model
        assert isinstance(model, GanModel)
        with torch.no_grad():
            return model.generator(torch.from_numpy(np.ascontiguousarray(z, np.float64))).numpy()

    def evaluate(self, trainer: Trainer) -> float:
        """Frechet distance of len(z_eval) generated digits (fixed noise) to as many test digits; draws the grid."""
        clf = self.classifier()
        fake = self.generate(trainer, self.z_eval)
        fd = frechet_distance(*feature_stats(clf.features(fake)), *self.reference())
        self.last_entropy_bits = class_entropy_bits(clf.predict(fake), self.data.n_classes)
        out = grid_path(trainer)
        if out is not None and self.data.input_shape is not None:
            _, h, w = self.data.input_shape
            if self.data.input_shape[0] == 1:
                save_grid(fake[:GRID_DIGITS], (h, w), out, f"{out.stem}: Frechet distance {fd:.1f}, "
                          f"class entropy {self.last_entropy_bits:.2f} bits")
        return fd

    def epoch_extras(self, trainer: Trainer) -> dict[str, float]:
        return {"class_entropy_bits": self.last_entropy_bits}


def grid_path(trainer: Trainer) -> Path | None:
    """Where this evaluation's grid goes: ARTIFACT_DIR/gan/epoch_NNN.png (the chip's: RUN_DIR/gan, the float
    baseline's: RUN_DIR/baseline/gan); None where the trainer has no artifact_dir."""
    d = trainer.artifact_dir
    if d is None:
        return None
    return Path(d) / "gan" / f"epoch_{trainer.at.epoch + 1:03d}.png"
