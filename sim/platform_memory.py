"""This machine's memory in bytes, as each system says it, chosen at run time; None where it does not say.

- Linux: /proc/meminfo (MemAvailable: what can still be allocated without swapping);
- Windows: GlobalMemoryStatusEx (kernel32, through ctypes);
- macOS and other POSIX systems: sysconf's physical pages (no cheap "available" figure: the total stands in).

Used to refuse, before allocating, an array or a run that cannot fit (hil/sizing.py, the emulator).
"""

from __future__ import annotations

import os
import sys


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _windows_status() -> tuple[int, int] | None:
    """(total, available) physical memory from GlobalMemoryStatusEx, or None."""
    import ctypes

    class _Status(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    st = _Status()
    st.dwLength = ctypes.sizeof(_Status)
    try:
        if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(st)):  # type: ignore[attr-defined]
            return None
    except (AttributeError, OSError):
        return None
    return int(st.ullTotalPhys), int(st.ullAvailPhys)


def _sysconf_total() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def physical_memory_bytes() -> int | None:
    """This machine's physical memory, bytes (None where the system does not say)."""
    if sys.platform == "win32":
        status = _windows_status()
        return status[0] if status else None
    return _sysconf_total()


def available_memory_bytes() -> int | None:
    """Memory this process could still allocate, bytes (None where the system does not say)."""
    if sys.platform == "win32":
        status = _windows_status()
        return status[1] if status else None
    have = _meminfo("MemAvailable")
    return have if have is not None else _sysconf_total()
