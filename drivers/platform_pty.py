"""Pseudo-terminals for the emulator's serial mode (`pcm-hil emulator --pty`): Unix only.

Linux and macOS have them (os.openpty, and the tty module to make one raw); Windows has neither, so
there the pty mode is refused with one line naming the TCP alternative, which serves the same protocol
to the same serial driver code (pyserial's ``socket://HOST:PORT``).
"""

from __future__ import annotations

import os

#: What a system without pseudo-terminals is told instead (one line).
NO_PTY = ("the emulator's pty mode needs a Unix pseudo-terminal, which this system (Windows) does not have; "
          "serve over TCP instead: pcm-hil emulator --listen 127.0.0.1:5025, then connect with "
          "--driver socket://127.0.0.1:5025 (pyserial) or TCPIP::127.0.0.1::5025::SOCKET (VISA)")


class PtyUnavailable(ValueError):
    """This system has no pseudo-terminals (the message is NO_PTY)."""


def pty_available() -> bool:
    """Whether this system can open a raw pseudo-terminal (Linux, macOS: yes; Windows: no)."""
    if not hasattr(os, "openpty") or not hasattr(os, "ttyname"):
        return False
    try:
        import tty  # noqa: F401 - needs termios, which Windows lacks
    except ImportError:
        return False
    return True


def require_pty() -> None:
    """PtyUnavailable (a ValueError, message NO_PTY) unless pty_available()."""
    if not pty_available():
        raise PtyUnavailable(NO_PTY)


def open_raw_pty() -> tuple[int, int, str]:
    """A new pseudo-terminal in raw mode (binary-clean, no echo): (master fd, slave fd, the slave's path)."""
    require_pty()
    import tty

    master, slave = os.openpty()
    try:
        tty.setraw(slave)  # binary-clean, no echo, whatever the client does
        return master, slave, os.ttyname(slave)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
