"""The run log's layout: schema name and version, the datasets and their dtypes, and the check that a
file is a run log this code can read. docs/run-log.md describes every field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

SCHEMA_NAME = "pcm-hil-runlog"
#: Version of the file layout this code writes (root attribute ``schema_version``). Version 2 added
#: the /checksums table; version 1 logs (no checksums) are still read.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)

#: Oldest and newest HDF5 file-format features the log may use: v110 is the first with SWMR and is
#: what HDF5 1.10 readers (Debian's h5dump, older h5py) understand.
LIBVER = ("v110", "v110")

NAME_BYTES = 63                      # longest reason / metric name, ASCII characters
DEVICE_CHUNK = 1 << 16               # rows per chunk of the per-device columns
EVENT_CHUNK = 1 << 12                # rows per chunk of the event tables
SMALL_CHUNK = 256                    # rows per chunk of the name and shape tables
U32_MAX = 2**32 - 1
U16_MAX = 2**16 - 1
RESERVED_ATTRS = ("schema", "schema_version", "created_utc")

READ_EVENT = np.dtype([("seq", "<u8"), ("step", "<i8"), ("t_s", "<f8"), ("wall_s", "<f8"), ("reason", "<u2"),
                       ("start", "<u8"), ("count", "<u8")])
PROGRAM_EVENT = np.dtype([("seq", "<u8"), ("program_id", "<i8"), ("step", "<i8"), ("t_s", "<f8"),
                          ("wall_s", "<f8"), ("shapes", "<u4"), ("start", "<u8"), ("count", "<u8")])
SHAPES_ROW = np.dtype([("set_amplitude_ua", "<f8"), ("set_width_ns", "<f8"), ("reset_amplitude_ua", "<f8"),
                       ("reset_width_ns", "<f8")])
METRIC_ROW = np.dtype([("record", "<u8"), ("seq", "<u8"), ("step", "<i8"), ("wall_s", "<f8"), ("name", "<u2"),
                       ("value", "<f8")])
NAME = np.dtype(f"S{NAME_BYTES + 1}")  # stored NUL-terminated, so h5dump prints them as plain strings

#: path -> (dtype, rows per chunk) of every data dataset a run log has from its creation. The
#: position of a path here is its code in /checksums (the table's ``datasets`` attribute lists them).
DATASETS: dict[str, tuple[np.dtype, int]] = {
    "reads/events": (READ_EVENT, EVENT_CHUNK),
    "reads/address": (np.dtype("<u4"), DEVICE_CHUNK),
    "reads/conductance_us": (np.dtype("<f4"), DEVICE_CHUNK),
    "reads/reason_names": (NAME, SMALL_CHUNK),
    "programs/events": (PROGRAM_EVENT, EVENT_CHUNK),
    "programs/address": (np.dtype("<u4"), DEVICE_CHUNK),
    "programs/set_count": (np.dtype("<u2"), DEVICE_CHUNK),
    "programs/reset": (np.dtype("u1"), DEVICE_CHUNK),
    "programs/shapes": (SHAPES_ROW, SMALL_CHUNK),
    "metrics/rows": (METRIC_ROW, SMALL_CHUNK),
    "metrics/names": (NAME, SMALL_CHUNK),
}
ARRAYS = "arrays"

#: The ``units`` attribute of each dataset with a unit (a compound dataset's: "field=unit" pairs), written
#: at creation (logs made before it have none; nothing else about the layout changed).
UNITS: dict[str, str] = {
    "reads/events": "t_s=s, wall_s=s",
    "reads/conductance_us": "uS",
    "programs/events": "t_s=s, wall_s=s",
    "programs/set_count": "pulses",
    "programs/shapes": "set_amplitude_ua=uA, set_width_ns=ns, reset_amplitude_ua=uA, reset_width_ns=ns",
    "metrics/rows": "wall_s=s",
}

#: One row per dataset per flush that added rows to it: the CRC-32 (zlib's) of rows start..stop-1
#: as their little-endian bytes in the dataset's dtype. Schema 2 and later.
CHECKSUMS = "checksums"
CHECKSUM_ROW = np.dtype([("dataset", "<u2"), ("start", "<u8"), ("stop", "<u8"), ("crc32", "<u4")])
CHECKSUM_CHUNK = 1 << 10
ARRAY_CRC_ATTR = "crc32"            # on each /arrays dataset (schema 2): CRC-32 of the array's bytes


class RunLogError(Exception):
    """A run log cannot be made, opened, written or trusted; the message names the file and the problem."""


class RunLogWarning(UserWarning):
    """Something about a run log a reader should know, that does not stop it (e.g. a log without checksums)."""


def check_schema(f: h5py.File, path: Path) -> int:
    """The schema version of f; RunLogError unless f is a run log of a readable version with every dataset in place."""
    try:
        schema = f.attrs.get("schema")
        version = f.attrs.get("schema_version")
    except (OSError, RuntimeError, KeyError) as e:
        raise RunLogError(f"run log {path} is corrupt: its root attributes cannot be read ({e})") from e
    if isinstance(schema, bytes):
        schema = schema.decode("utf-8", "replace")
    if schema != SCHEMA_NAME:
        what = "no 'schema' attribute" if schema is None else f"schema {schema!r}"
        raise RunLogError(f"{path} is not a pcm-hil run log ({what}, expected {SCHEMA_NAME!r})")
    if not isinstance(version, (int, np.integer)) or int(version) not in READABLE_VERSIONS:
        raise RunLogError(f"run log {path} has schema version {version}, this code reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}")
    version = int(version)
    need = dict(DATASETS)
    if version >= 2:
        need[CHECKSUMS] = (CHECKSUM_ROW, CHECKSUM_CHUNK)
    for name, (dtype, _) in need.items():
        try:
            ds = f[name]
            ok = isinstance(ds, h5py.Dataset) and ds.dtype == dtype and ds.ndim == 1
        except (KeyError, OSError, RuntimeError, ValueError) as e:
            raise RunLogError(f"run log {path} is corrupt or incomplete: dataset /{name} cannot be opened ({e})") from e
        if not ok:
            raise RunLogError(f"run log {path} is corrupt: /{name} is not a 1-D dataset of {dtype}")
    return version


def check_attr(key: str, value: Any) -> Any:
    """value as the HDF5 attribute the log stores (bool, int64, float64 or str); RunLogError otherwise."""
    if not isinstance(key, str) or not key or "/" in key:
        raise RunLogError(f"attribute name {key!r} must be a non-empty string without '/'")
    if key in RESERVED_ATTRS:
        raise RunLogError(f"attribute {key!r} is set by the run log itself")
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, np.integer)):
        return np.int64(value)
    if isinstance(value, (float, np.floating)):
        return np.float64(value)
    if isinstance(value, str):
        return value
    raise RunLogError(f"attribute {key!r} must be str, int, float or bool, got {type(value).__name__}")


def attr_value(v: Any) -> Any:
    """An HDF5 attribute value as plain Python (str / int / float / bool / list)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def encode_name(kind: str, name: str) -> bytes:
    """name as the ASCII bytes of a reason / metric-name table row; RunLogError if it cannot be one."""
    if not isinstance(name, str) or not name:
        raise RunLogError(f"{kind} must be a non-empty string, got {name!r}")
    if len(name) > NAME_BYTES or not (name.isascii() and name.isprintable()):
        raise RunLogError(f"{kind} {name!r} must be at most {NAME_BYTES} printable ASCII characters")
    return name.encode("ascii")
