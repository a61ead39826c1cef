"""Crash-safe files: atomic replacement, and npz archives with a JSON header.

sim is the bottom layer, so the chip state, the emulator's state file, checkpoints and run
summaries above it all share these two helpers instead of each writing their own.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .platform_fs import replace, sync_folder

_META = "meta"


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace path with data so a crash at any moment leaves the old file or the new one, never half of one.

    The bytes are fsynced before the rename and the folder after it, so the new file also survives a power cut.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace(tmp, path)  # on Windows retried while a reader holds path open
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(folder)  # POSIX only: Windows cannot open a folder (sim/platform_fs.py)


def npz_bytes(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed npz archive holding meta (JSON) under 'meta' and the named arrays."""
    if _META in arrays:
        raise ValueError(f"array name {_META!r} is reserved for the JSON header")
    buf = io.BytesIO()
    np.savez(buf, **{_META: np.frombuffer(json.dumps(meta).encode(), np.uint8)}, **arrays)
    return buf.getvalue()


def read_npz(source: str | os.PathLike[str] | bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """meta and arrays of an archive written by npz_bytes (a path or the bytes themselves).

    FileNotFoundError when a path is missing; ValueError naming the problem for anything unreadable.
    """
    try:
        z = np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("not an npz archive")
        with z:
            meta = json.loads(bytes(z[_META]).decode())
            arrays = {k: z[k] for k in z.files if k != _META}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise ValueError(f"not a readable archive: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError("the archive's header is not a JSON object")
    return meta, arrays


class TomlFileError(ValueError):
    """A TOML file that is missing, a folder, unreadable or not TOML; the message is one line naming it."""


def read_toml(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The parsed TOML file at path; what names it in the one-line TomlFileError ("run config file")."""
    return read_toml_text(path, what)[1]


def read_toml_text(path: str | os.PathLike[str], what: str) -> tuple[str, dict[str, Any]]:
    """The TOML file at path as its text (UTF-8) and parsed; TomlFileError as read_toml."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        return text, tomllib.loads(text)
    except FileNotFoundError:
        raise TomlFileError(f"no {what} at {p}") from None
    except IsADirectoryError:
        raise TomlFileError(f"{p} is a directory, not a {what}") from None
    except OSError as e:
        raise TomlFileError(f"cannot read the {what} {p}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TomlFileError(f"{what} {p} is not valid TOML: {' '.join(str(e).split())}") from None
