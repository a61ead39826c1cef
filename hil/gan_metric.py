"""How good a GAN's digits are, without a download: the Frechet distance in the feature space of a small
classifier that the harness trains once and caches, the entropy of the digits' predicted classes, a PNG grid.

The classifier (FeatureNet: inputs -> 256 -> 64 -> classes, ReLU, float32 torch) is trained on the data set's
full training split by a fixed recipe (CLASSIFIER_RECIPE: seed, epochs, Adam, batch) and cached in
classifier_cache_dir() (network.gan.classifier_cache, else $PCM_HIL_CACHE/gan-classifier, else
~/.cache/pcm-hil/gan-classifier), one file per recipe: <data>-<hash>.npz, the hash of the recipe, the
data set's digest and torch's version. A file that does not load, or whose recorded key differs, is
retrained and replaced, never trusted. The same file scores a PCM run and its float baseline.

The Frechet distance compares the mean and covariance of the 64 penultimate features of generated
digits with those of the test split's digits (Heusel et al. 2017, as FID does with Inception features):
FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). Lower is better; 0 for identical statistics.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import nn
from torch.nn import functional as F

from sim.files import npz_bytes, read_npz, write_atomic

log = logging.getLogger(__name__)

#: How the feature classifier is trained; part of the cache key (change it and the cache is retrained).
CLASSIFIER_RECIPE: dict[str, Any] = {"version": 1, "hidden": [256, 64], "seed": 0, "optimizer": "adam", "lr": 1e-3,
                                     "batch_size": 128, "samples": 180_000, "min_epochs": 3}
#: Environment variable of the cache's root folder (the classifier goes into its gan-classifier folder).
CACHE_ENV = "PCM_HIL_CACHE"


def classifier_cache_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """Folder of the cached feature classifiers: configured, else $PCM_HIL_CACHE/gan-classifier, else
    $XDG_CACHE_HOME/pcm-hil/gan-classifier (~/.cache/pcm-hil/gan-classifier)."""
    if configured:
        return Path(configured).expanduser()
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "gan-classifier"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pcm-hil" / "gan-classifier"


class FeatureNet(nn.Module):
    """inputs -> 256 -> 64 -> classes (ReLU); features() is the 64-wide penultimate layer."""

    def __init__(self, n_features: int, n_classes: int, hidden: list[int]) -> None:
        super().__init__()
        sizes = [n_features, *hidden]
        self.body = nn.Sequential(*[m for a, b in zip(sizes[:-1], sizes[1:], strict=True)
                                    for m in (nn.Linear(a, b), nn.ReLU())])
        self.head = nn.Linear(sizes[-1], n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class Classifier:
    """The cached feature classifier of one data set; test_accuracy on its test split (0..1)."""

    net: FeatureNet
    test_accuracy: float
    path: Path
    retrained: bool

    def features(self, x: np.ndarray, batch: int = 2000) -> np.ndarray:
        """x (n, features) in [0, 1] -> (n, 64) penultimate features, float64."""
        with torch.no_grad():
            return np.concatenate([self.net.features(torch.from_numpy(np.asarray(x[i:i + batch], np.float32))).double()
                                   .numpy() for i in range(0, len(x), batch)] or [np.zeros((0, 64))])

    def predict(self, x: np.ndarray, batch: int = 2000) -> np.ndarray:
        """Predicted classes (n,) of x (n, features)."""
        with torch.no_grad():
            return np.concatenate([self.net(torch.from_numpy(np.asarray(x[i:i + batch], np.float32))).argmax(1)
                                   .numpy() for i in range(0, len(x), batch)] or [np.zeros(0, np.int64)])


def data_digest(x: np.ndarray, y: np.ndarray) -> str:
    """sha256 of a split's inputs (as 8-bit pixels: the data sets hold k/255 or k/16 exactly) and labels."""
    h = hashlib.sha256()
    h.update(str(x.shape).encode())
    h.update(np.round(np.asarray(x) * 255.0).astype(np.uint8).tobytes())
    h.update(np.asarray(y, np.int64).tobytes())
    return h.hexdigest()


def classifier_key(name: str, x_train: np.ndarray, y_train: np.ndarray, n_classes: int) -> tuple[str, dict[str, Any]]:
    """(hash, what it hashes): the recipe, the data set and its digest, torch's version."""
    what = {"recipe": CLASSIFIER_RECIPE, "data": name, "n_features": int(x_train.shape[1]), "n_classes": int(n_classes),
            "data_sha256": data_digest(x_train, y_train), "torch": torch.__version__.split("+")[0]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest(), what


def train_classifier(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                     n_classes: int) -> tuple[FeatureNet, float]:
    """The feature classifier trained by CLASSIFIER_RECIPE (seeded, one torch thread); its test accuracy."""
    r = CLASSIFIER_RECIPE
    n = len(y_train)
    epochs = max(r["min_epochs"], -(-r["samples"] // max(n, 1)))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(r["seed"])
            net = FeatureNet(x_train.shape[1], n_classes, r["hidden"])
            opt = torch.optim.Adam(net.parameters(), lr=r["lr"])
            x = torch.from_numpy(np.asarray(x_train, np.float32))
            y = torch.from_numpy(np.asarray(y_train, np.int64))
            rng = np.random.default_rng([r["seed"], 1])
            for _ in range(epochs):
                order = torch.from_numpy(rng.permutation(n))
                for lo in range(0, n, r["batch_size"]):
                    b = order[lo:lo + r["batch_size"]]
                    opt.zero_grad()
                    F.cross_entropy(net(x[b]), y[b]).backward()
                    opt.step()
        net.eval()
        with torch.no_grad():
            pred = net(torch.from_numpy(np.asarray(x_test, np.float32))).argmax(1).numpy()
    finally:
        torch.set_num_threads(old_threads)
    return net, float(np.mean(pred == y_test)) if len(y_test) else float("nan")


def load_classifier(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                    n_classes: int, cache_dir: str | os.PathLike[str] | None = None) -> Classifier:
    """The data set's feature classifier from the cache, trained (and cached) if it is missing or does not load.

    x_train, y_train: the data set's full training split (what the classifier learns; part of the key).
    """
    key, what = classifier_key(name, x_train, y_train, n_classes)
    folder = classifier_cache_dir(cache_dir)
    path = folder / f"{name}-{key[:16]}.npz"
    net = _load_cached(path, key, x_train.shape[1], n_classes)
    if net is not None:
        meta, _ = read_npz(path)
        return Classifier(net, float(meta["test_accuracy"]), path, False)
    log.info("training the GAN metric's feature classifier for %s (cached in %s)", name, path)
    net, acc = train_classifier(x_train, y_train, x_test, y_test, n_classes)
    arrays = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, npz_bytes({"key": key, "what": what, "test_accuracy": acc}, arrays))
    return Classifier(net, acc, path, True)


def _load_cached(path: Path, key: str, n_features: int, n_classes: int) -> FeatureNet | None:
    """The cached net, or None (missing, unreadable, another key, arrays that do not fit: all retrained)."""
    if not path.is_file():
        return None
    try:
        meta, arrays = read_npz(path)
        if meta.get("key") != key:
            raise ValueError("its key differs")
        net = FeatureNet(n_features, n_classes, CLASSIFIER_RECIPE["hidden"])
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=True)
        float(meta["test_accuracy"])
    except Exception as e:  # noqa: BLE001 - any damage to a cache file means: train again
        log.warning("the cached feature classifier %s is not usable (%s); training it again", path, e)
        return None
    net.eval()
    return net


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (k,) and covariance (k, k) of features (n, k), n >= 2 (unbiased, as np.cov)."""
    f = np.asarray(features, np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Frechet distance between N(mu1, s1) and N(mu2, s2): |mu1 - mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^(1/2)).

    The matrix square root is scipy.linalg.sqrtm; a nearly singular product (features that never vary) gets
    1e-6 on the diagonals first (as the reference FID code does); the tiny imaginary part rounding leaves is dropped.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(s1).astype(np.float64), np.atleast_2d(s2).astype(np.float64)
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if caught or not np.all(np.isfinite(covmean)):
        # dead features (a ReLU unit never on) make the product singular
        off = np.eye(s1.shape[0]) * 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def class_entropy_bits(predicted: np.ndarray, n_classes: int) -> float:
    """Entropy of the histogram of predicted classes, bits: log2(n_classes) when every class is as frequent,
    0 when one class takes all (mode collapse)."""
    counts = np.bincount(np.asarray(predicted, np.int64), minlength=n_classes).astype(np.float64)
    if counts.sum() == 0:
        return 0.0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def save_grid(images: np.ndarray, shape: tuple[int, int], path: Path, title: str = "", columns: int = 10) -> None:
    """A PNG of images (n, h * w) in [0, 1] as a grid, columns per row, written atomically (matplotlib Agg)."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    h, w = shape
    n = len(images)
    rows = -(-n // columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1), 0.3)  # light grey lines between digits
    for i, img in enumerate(np.clip(np.asarray(images, np.float64), 0.0, 1.0)):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = img.reshape(h, w)
    fig = Figure(figsize=(columns * 0.45 + 0.2, rows * 0.45 + (0.4 if title else 0.2)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1 - (0.35 / (rows * 0.45 + 0.4) if title else 0)))
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=8, y=0.995)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())
