"""Dispatch `python -m benchmarks NAME [args]` to benchmarks/NAME.py's main(argv)."""

import importlib
import sys

NAMES = ("model",)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
        sys.exit(f"usage: scripts/bench {{{'|'.join(NAMES)}}} [options]")
    importlib.import_module(f"benchmarks.{sys.argv[1]}").main(sys.argv[2:])


main()
