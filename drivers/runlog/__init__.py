"""The run log: one HDF5 file per run holding every read, every program, the metrics and the mapping.

One writer (RunLogWriter, writer.py) appends rows from numpy buffers in whole chunks and flushes every
few seconds, each flush with a CRC-32 per new block of rows in /checksums; the file is in SWMR mode,
so RunLogReader (reader.py), plain h5py (``swmr=True``) and h5dump can read it while the run writes.
verify_log / RunLogReader.verify recompute the checksums. The layout is in schema.py and
docs/run-log.md; bump SCHEMA_VERSION with any change a reader of the old version would misread.

What survives a kill -9 of the writer: every row flushed before the kill (``flush()``, the
periodic flush, ``close()``) with its checksums; rows still in the buffers are lost. The file then
still opens in RunLogReader and in h5py with ``swmr=True``; ``RunLogWriter(path, append=True)``
verifies it, reopens it and clears the "open for writing" mark the dead writer left, after which
h5dump reads it too. A full disk or a refused write gives one RunLogError and closes the log.
"""

from .reader import RunLogReader, verify_log
from .schema import (ARRAYS, CHECKSUMS, DATASETS, DEVICE_CHUNK, EVENT_CHUNK, LIBVER, NAME_BYTES, SCHEMA_NAME,
                     SCHEMA_VERSION, SMALL_CHUNK, U16_MAX, U32_MAX, OldSchemaLog, RunLogError, RunLogWarning,
                     check_schema)
from .writer import RunLogWriter

__all__ = ["ARRAYS", "CHECKSUMS", "DATASETS", "DEVICE_CHUNK", "EVENT_CHUNK", "LIBVER", "NAME_BYTES", "OldSchemaLog",
           "SCHEMA_NAME", "SCHEMA_VERSION", "SMALL_CHUNK", "U16_MAX", "U32_MAX", "RunLogError", "RunLogReader",
           "RunLogWarning", "RunLogWriter", "check_schema", "verify_log"]
