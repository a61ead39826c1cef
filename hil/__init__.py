"""pcm-hil orchestrator: training on the array, run log, checkpoints, the command line."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pcm-hil")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
