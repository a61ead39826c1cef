"""Dispatch `python -m benchmarks NAME [args]` to benchmarks/NAME.py's main(argv)."""

import importlib
import pkgutil
import sys
from pathlib import Path

NAMES = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
        sys.exit(f"usage: scripts/bench {{{'|'.join(NAMES)}}} [options]")
    importlib.import_module(f"benchmarks.{sys.argv[1]}").main(sys.argv[2:])


main()
