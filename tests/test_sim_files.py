"""Crash-safe file helpers shared by the chip state, the emulator state, checkpoints and summaries."""

import numpy as np
import pytest

from sim.files import npz_bytes, read_npz, write_atomic


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path) -> None:
    p = tmp_path / "f.bin"
    write_atomic(p, b"old")
    write_atomic(p, b"new contents")
    assert p.read_bytes() == b"new contents"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, mocker) -> None:
    p = tmp_path / "f.bin"
    write_atomic(p, b"old")
    mocker.patch("sim.files.os.replace", side_effect=OSError("disk gone"))
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(p, b"new")
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_npz_round_trip_and_clear_errors(tmp_path) -> None:
    data = npz_bytes({"a": 1, "b": [1, 2]}, {"x": np.arange(5, dtype=np.uint32)})
    meta, arrays = read_npz(data)
    assert meta == {"a": 1, "b": [1, 2]} and arrays["x"].dtype == np.uint32 and arrays["x"].tolist() == [0, 1, 2, 3, 4]
    write_atomic(tmp_path / "a.npz", data)
    assert read_npz(tmp_path / "a.npz")[0] == meta
    with pytest.raises(FileNotFoundError):
        read_npz(tmp_path / "absent.npz")
    for bad in (data[: len(data) // 2], b"junk", b""):
        with pytest.raises(ValueError, match="not a readable archive"):
            read_npz(bad)
    with pytest.raises(ValueError, match="reserved"):
        npz_bytes({}, {"meta": np.zeros(1)})
