"""The run log's layout: schema name and version, the datasets and their dtypes, and the check that a
file is a run log this code can read. docs/run-log.md describes every field."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

SCHEMA_NAME = "pcm-hil-runlog"
#: Version of the file layout this code writes (root attribute ``schema_version``). Version 2 added
#: the /checksums table; version 3 made the read events' reason an HDF5 enum type (h5dump and HDFView
#: show its names). Versions 1 and 2 (reason a plain uint16 code into /reads/reason_names) are still read.
SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
#: What each older version lacks, for the message that refuses to append to it.
OLD_VERSION_LACKS = {1: "no checksums", 2: "read reasons as plain codes, not an HDF5 enum"}

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

#: The read reasons of the project, in code order: every schema-3 log's reason enum starts with these
#: (so a code means the same reason in every log); RunLogWriter(reasons=...) appends others at creation.
READ_REASONS = ("initial", "after-program", "periodic", "evaluation", "refresh-verify", "resume", "probe",
                "calibration-pulse", "calibration-noise", "calibration-drift")
#: The read event's layout. Schema 3 stores the reason field as an HDF5 enum over uint16 (reason_dtype);
#: numpy compares the two as equal, the bytes are the same, and versions 1 and 2 store plain uint16.
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


def reason_names_for(extra: Sequence[str] = ()) -> list[str]:
    """READ_REASONS followed by the extra reasons not among them (in their order); RunLogError for a bad name."""
    names = list(READ_REASONS)
    for name in extra:
        encode_name("read reason", name)
        if name not in names:
            names.append(name)
    if len(names) > U16_MAX + 1:
        raise RunLogError(f"too many distinct read reasons (at most {U16_MAX + 1})")
    return names


def reason_dtype(names: Sequence[str]) -> np.dtype:
    """The HDF5 enum type (over little-endian uint16) of the read reasons names, code i = names[i]."""
    return h5py.enum_dtype({n: i for i, n in enumerate(names)}, basetype=np.dtype("<u2"))


def read_event_dtype(names: Sequence[str]) -> np.dtype:
    """READ_EVENT with its reason field the enum of names (schema 3)."""
    return np.dtype([(f, reason_dtype(names) if f == "reason" else READ_EVENT.fields[f][0])
                     for f in READ_EVENT.names])


def enum_reason_names(ds: h5py.Dataset) -> list[str] | None:
    """The reason enum's names by code of a read events dataset, or None when its reason is a plain integer
    (schema 1 and 2). RunLogError when the enum's codes are not 0 .. n-1."""
    mapping = h5py.check_enum_dtype(ds.dtype["reason"])
    if mapping is None:
        return None
    by_code = sorted((int(v), str(k)) for k, v in mapping.items())
    if [c for c, _ in by_code] != list(range(len(by_code))):
        raise RunLogError(f"the read reason enum of {ds.file.filename} does not number its names 0 .. "
                          f"{len(by_code) - 1}")
    return [n for _, n in by_code]


class RunLogError(Exception):
    """A run log cannot be made, opened, written or trusted; the message names the file and the problem."""


class OldSchemaLog(RunLogError):
    """A run log of an older schema version, which this code reads but does not append to (resumable = False:
    a command that would append says so instead of suggesting a resume)."""

    resumable = False


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
    is_enum = h5py.check_enum_dtype(f["reads/events"].dtype["reason"]) is not None
    if is_enum != (version >= 3):
        raise RunLogError(f"run log {path} is corrupt: schema version {version} stores the read reason as "
                          f"{'an HDF5 enum' if version >= 3 else 'a plain uint16 code'}, this file "
                          f"{'as an enum' if is_enum else 'as a plain integer'}")
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
