"""The libhdf5 that h5py runs on, through ctypes, for the one file-access setting h5py does not expose
(H5Pset_metadata_read_attempts). Found without /proc or any tool, on each system in its own way:

- Linux, macOS: the symbol through one of h5py's own extension modules (the dynamic linker resolves it in
  the libhdf5 that module links, so it is the very library h5py uses);
- Windows, where a DLL's symbols do not reach its dependencies': the hdf5 DLL h5py's wheel ships beside
  its modules (loading it again by that path gives the copy already loaded).

None where neither finds it (an h5py built against a libhdf5 elsewhere on Windows): callers then do
without the setting.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import h5py
import h5py.h5p

#: What a library must export to be the one we want.
SYMBOL = "H5Pset_metadata_read_attempts"


@functools.cache
def hdf5_library() -> ctypes.CDLL | None:
    """The libhdf5 h5py uses (for ctypes calls on h5py's property-list ids), or None where it is not found."""
    try:
        lib = ctypes.CDLL(h5py.h5p.__file__)
        getattr(lib, SYMBOL)
        return lib
    except (OSError, AttributeError):
        pass
    here = Path(h5py.__file__).parent
    for folder in (here, here / ".dylibs", here.parent / "h5py.libs"):
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            low = name.lower()
            hdf5 = low.startswith(("hdf5", "libhdf5")) and not low.startswith(("hdf5_", "libhdf5_"))  # not _hl
            if hdf5 and (low.endswith((".dll", ".dylib", ".so")) or ".so." in low):
                try:
                    lib = ctypes.CDLL(os.fspath(folder / name))
                    getattr(lib, SYMBOL)
                    return lib
                except (OSError, AttributeError):
                    continue
    return None
