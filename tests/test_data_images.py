"""Image data sets: input_shape of MNIST / digits, and the CIFAR-10 loader on small fake python-version copies."""

from __future__ import annotations

import builtins
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

import hil.data as d
from hil.data import DataError, Dataset, load_cifar10, load_dataset, load_digits, load_mnist

TRAIN_SIZES = (3, 4, 2, 5, 1)  # any number of samples per batch
TEST_SIZE = 6
# a pixel with a value found nowhere else: data_batch_2, its sample 1, green channel, row 5, column 7
MARK = ("data_batch_2", 1, 1, 5, 7)
MARK_VALUE = 201


def _batches(seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    out: dict[str, dict] = {}
    for name, n in [*zip(d.CIFAR10_TRAIN, TRAIN_SIZES), (d.CIFAR10_TEST, TEST_SIZE)]:
        data = rng.integers(0, 200, size=(n, 3072), dtype=np.uint8)  # < MARK_VALUE everywhere
        out[name] = {b"batch_label": name.encode(), b"data": data, b"labels": [int(v) for v in rng.integers(0, 10, n)],
                     b"filenames": [b"x.png"] * n}
    f, i, c, h, w = MARK
    out[f][b"data"][i, c * 1024 + h * 32 + w] = MARK_VALUE
    return out


META = {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
                         b"truck"], b"num_cases_per_batch": 10000, b"num_vis": 3072}


def write_folder(root: Path, protocol: int = 2) -> tuple[Path, dict[str, dict]]:
    folder = root / d.CIFAR10_DIR
    folder.mkdir(parents=True)
    batches = _batches()
    for name, b in batches.items():
        (folder / name).write_bytes(pickle.dumps(b, protocol=protocol))
    (folder / d.CIFAR10_META).write_bytes(pickle.dumps(META, protocol=protocol))
    return folder, batches


def write_archive(path: Path, skip: str | None = None) -> dict[str, dict]:
    batches = _batches()
    members = {**{n: pickle.dumps(b) for n, b in batches.items()}, d.CIFAR10_META: pickle.dumps(META)}
    with tarfile.open(path, "w:gz") as tf:
        dir_info = tarfile.TarInfo(d.CIFAR10_DIR)
        dir_info.type = tarfile.DIRTYPE
        tf.addfile(dir_info)
        for name, raw in members.items():
            if name == skip:
                continue
            info = tarfile.TarInfo(f"{d.CIFAR10_DIR}/{name}")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return batches


def check_cifar(ds: Dataset, batches: dict[str, dict]) -> None:
    n_train, n_test = sum(TRAIN_SIZES), TEST_SIZE
    assert ds.name == "cifar10" and ds.n_classes == 10 and ds.input_shape == (3, 32, 32) and ds.n_features == 3072
    assert ds.x_train.shape == (n_train, 3072) and ds.x_test.shape == (n_test, 3072)
    assert ds.x_train.dtype == np.float64 and ds.y_train.dtype == np.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    raw_train = np.concatenate([batches[n][b"data"] for n in d.CIFAR10_TRAIN])
    np.testing.assert_array_equal(ds.x_train, raw_train / 255.0)
    np.testing.assert_array_equal(ds.x_test, batches[d.CIFAR10_TEST][b"data"] / 255.0)
    np.testing.assert_array_equal(ds.y_train, np.concatenate([batches[n][b"labels"] for n in d.CIFAR10_TRAIN]))
    np.testing.assert_array_equal(ds.y_test, batches[d.CIFAR10_TEST][b"labels"])
    # pixel order: the marked pixel lands at images[i, c, h, w], and nowhere else
    f, i, c, h, w = MARK
    i_all = sum(TRAIN_SIZES[:d.CIFAR10_TRAIN.index(f)]) + i
    images = ds.x_train.reshape(n_train, *ds.input_shape)
    assert images[i_all, c, h, w] == MARK_VALUE / 255.0
    assert list(zip(*np.nonzero(images == MARK_VALUE / 255.0))) == [(i_all, c, h, w)]


def one_line_error(call, *needles: str) -> str:
    with pytest.raises(DataError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ---- MNIST and digits -----------------------------------------------------------------------------------------

def test_digits_has_its_image_shape_in_row_major_order() -> None:
    from sklearn.datasets import load_digits as sk_digits

    ds = load_digits(0)
    assert ds.input_shape == (1, 8, 8) and ds.n_features == 64
    images = ds.x_train.reshape(len(ds.x_train), *ds.input_shape)
    sk = sk_digits().images / 16.0  # (1797, 8, 8)
    # each training image is one of sklearn's images, unchanged (same H, W order)
    first = images[0, 0]
    assert any(np.array_equal(first, im) for im in sk)
    assert ds.limited(10, 5).input_shape == (1, 8, 8)
    assert load_dataset("digits", train_limit=7).input_shape == (1, 8, 8)


def test_mnist_has_its_image_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(d.MNIST_ENV, raising=False)
    ds = load_mnist(download=False)
    assert ds.input_shape == (1, 28, 28) and ds.n_features == 784
    assert ds.limited(3, 2).input_shape == (1, 28, 28)
    # an MNIST digit is centred: its border rows are blank, its middle is not
    im = ds.x_train[:100].reshape(100, *ds.input_shape)
    assert im[:, 0, 0, :].max() == 0.0 and im[:, 0, 14, :].max() > 0.5


def test_dataset_checks_input_shape_and_keeps_it_when_limited() -> None:
    x = np.zeros((4, 12))
    y = np.zeros(4, np.int64)
    assert Dataset("flat", x, y, x, y, 2).input_shape is None  # old positional construction still works
    ds = Dataset("img", x, y, x, y, 2, input_shape=(3, 2, 2))
    assert ds.limited(2, None).input_shape == (3, 2, 2) and ds.limited(2, None).x_train.shape == (2, 12)
    with pytest.raises(ValueError, match="input_shape"):
        Dataset("img", x, y, x, y, 2, input_shape=(1, 3, 3))


def test_unknown_data_set_is_refused() -> None:
    one_line_error(lambda: load_dataset("imagenet"), "imagenet", "cifar10", "mnist", "digits")


# ---- CIFAR-10 found and read ------------------------------------------------------------------------------------

def test_cifar10_from_a_folder_given_as_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(d.CIFAR10_ENV, raising=False)
    folder, batches = write_folder(tmp_path)
    check_cifar(load_dataset("cifar10", str(folder)), batches)  # the cifar-10-batches-py folder itself
    check_cifar(load_dataset("cifar10", str(tmp_path)), batches)  # or the folder above it
    cut = load_dataset("cifar10", str(folder), train_limit=4, test_limit=2)
    assert cut.x_train.shape == (4, 3072) and cut.x_test.shape == (2, 3072) and cut.input_shape == (3, 32, 32)


def test_cifar10_from_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, batches = write_folder(tmp_path / "a", protocol=pickle.HIGHEST_PROTOCOL)
    monkeypatch.setenv(d.CIFAR10_ENV, str(folder))
    check_cifar(load_dataset("cifar10"), batches)
    # an explicit path wins over the variable
    monkeypatch.setenv(d.CIFAR10_ENV, str(tmp_path / "nowhere"))
    check_cifar(load_dataset("cifar10", str(folder)), batches)


def test_cifar10_from_a_tar_gz_read_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(d.CIFAR10_ENV, raising=False)
    archive = tmp_path / "my-cifar.tar.gz"
    batches = write_archive(archive)
    before = sorted(tmp_path.rglob("*"))
    check_cifar(load_dataset("cifar10", str(archive)), batches)
    assert sorted(tmp_path.rglob("*")) == before  # nothing extracted to disk


def test_cifar10_archive_by_its_published_name_is_md5_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / d.CIFAR10_ARCHIVE
    batches = write_archive(archive)
    monkeypatch.delenv(d.CIFAR10_ENV, raising=False)
    one_line_error(lambda: load_dataset("cifar10", str(archive)), str(archive), "md5", d.CIFAR10_ARCHIVE_MD5)
    one_line_error(lambda: load_cifar10(tmp_path, verify_md5=True), str(archive), "md5")  # found in its folder
    check_cifar(load_cifar10(archive, verify_md5=False), batches)
    # with the md5 it expects, the archive loads, found through $PCM_HIL_CIFAR10 naming its folder
    monkeypatch.setattr(d, "CIFAR10_ARCHIVE_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setenv(d.CIFAR10_ENV, str(tmp_path))
    check_cifar(load_dataset("cifar10"), batches)


# ---- CIFAR-10 absent, incomplete or corrupt ---------------------------------------------------------------------

def test_cifar10_absent_says_where_it_looked_and_how_to_provide_it(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.delenv(d.CIFAR10_ENV, raising=False)
    one_line_error(lambda: load_dataset("cifar10"), "data.path", "PCM_HIL_CIFAR10", "python version",
                   "https://www.cs.toronto.edu/~kriz/cifar.html")
    nowhere = tmp_path / "nowhere"
    one_line_error(lambda: load_dataset("cifar10", str(nowhere)), str(nowhere), "the given path", "python version")
    monkeypatch.setenv(d.CIFAR10_ENV, str(nowhere))
    one_line_error(lambda: load_dataset("cifar10"), str(nowhere), "$PCM_HIL_CIFAR10")
    one_line_error(lambda: load_dataset("cifar10", str(tmp_path)), str(tmp_path), d.CIFAR10_DIR)  # empty folder


def test_cifar10_missing_batch_is_named(tmp_path: Path) -> None:
    folder, _ = write_folder(tmp_path)
    (folder / "data_batch_4").unlink()
    one_line_error(lambda: load_cifar10(folder), str(folder / "data_batch_4"), "missing")
    (folder / d.CIFAR10_TEST).unlink()
    one_line_error(lambda: load_cifar10(tmp_path), str(folder / "data_batch_4"), d.CIFAR10_TEST)
    archive = tmp_path / "short.tar.gz"
    write_archive(archive, skip=d.CIFAR10_TEST)
    one_line_error(lambda: load_cifar10(archive), str(archive), "lacks", d.CIFAR10_TEST)


@pytest.mark.parametrize("damage, needle", [
    (lambda raw, b: raw[: len(raw) // 2], "not a readable python-version pickle"),
    (lambda raw, b: pickle.dumps({**b, b"data": b[b"data"][:, :3000]}), "3072"),
    (lambda raw, b: pickle.dumps({**b, b"data": b[b"data"].astype(np.float32)}), "uint8"),
    (lambda raw, b: pickle.dumps({**b, b"labels": b[b"labels"][:-1]}), "labels for"),
    (lambda raw, b: pickle.dumps({**b, b"labels": [10] * len(b[b"labels"])}), "0..9"),
    (lambda raw, b: pickle.dumps({b"labels": b[b"labels"]}), "b'data'"),
    (lambda raw, b: pickle.dumps([1, 2, 3]), "not the dict"),
])
def test_cifar10_corrupt_batch_is_one_line_naming_the_file(tmp_path: Path, damage, needle: str) -> None:
    folder, batches = write_folder(tmp_path)
    f = folder / "data_batch_3"
    f.write_bytes(damage(f.read_bytes(), batches["data_batch_3"]))
    one_line_error(lambda: load_cifar10(folder), str(f), needle)


def test_cifar10_corrupt_meta_is_named(tmp_path: Path) -> None:
    folder, _ = write_folder(tmp_path)
    (folder / d.CIFAR10_META).write_bytes(pickle.dumps({b"label_names": [b"cat"]}))
    one_line_error(lambda: load_cifar10(folder), str(folder / d.CIFAR10_META), "10 classes")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def test_cifar10_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    folder, batches = write_folder(tmp_path / "c")
    marker = tmp_path / "ran"
    (folder / "data_batch_1").write_bytes(pickle.dumps({**batches["data_batch_1"], b"x": _Evil(marker)}))
    one_line_error(lambda: load_cifar10(folder), str(folder / "data_batch_1"), "open", "refused")
    assert not marker.exists()


def test_cifar10_corrupt_archive_is_named(tmp_path: Path) -> None:
    archive = tmp_path / "c.tar.gz"
    write_archive(archive)
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) // 2])
    one_line_error(lambda: load_cifar10(archive), str(archive))
    archive.write_bytes(b"not an archive at all")
    one_line_error(lambda: load_cifar10(archive), str(archive), ".tar.gz")


def test_digits_equal_scikit_learns_and_load_without_importing_it():
    """The 8x8 digits are read from scikit-learn's own file without its ~2 s import (every digits run and every
    fresh sweep worker paid it), and are scikit-learn's load_digits exactly."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits as sk_digits

    d = load_digits(seed=3)
    sk = sk_digits()
    x, y = sk.data.astype(np.float64) / 16.0, sk.target.astype(np.int64)
    order = np.random.default_rng(3).permutation(len(y))
    n_test = int(round(len(y) * 0.25))
    np.testing.assert_array_equal(d.x_test, x[order[:n_test]])
    np.testing.assert_array_equal(d.x_train, x[order[n_test:]])
    np.testing.assert_array_equal(d.y_test, y[order[:n_test]])
    np.testing.assert_array_equal(d.y_train, y[order[n_test:]])
    code = "import sys; from hil.data import load_digits; load_digits(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
