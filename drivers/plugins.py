"""Drivers from outside the project: `module:Class` import paths and the `pcm_hil.drivers` entry points.

A lab's package adds its tester by name, with no edit here (docs/drivers.md):

    [project.entry-points."pcm_hil.drivers"]
    acme = "acme_lab.pcm:AcmeDriver"

`pcm-hil train --driver acme` (or `--driver acme_lab.pcm:AcmeDriver`) then calls
`AcmeDriver(**options)` with the run config's `[driver.options]` table and trains on what it returns.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from .base import ArrayDriver
from .errors import DriverError

GROUP = "pcm_hil.drivers"
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class PluginError(DriverError):
    """A driver plugin cannot be found, imported or made; the message says which and why."""


def is_import_path(spec: str) -> bool:
    """True for 'package.module:Attribute' (not a VISA resource, which has '::', nor a URL)."""
    return bool(_IMPORT_PATH.fullmatch(spec.strip()))


def registered() -> dict[str, str]:
    """Driver names the installed packages register (entry point group pcm_hil.drivers) -> import path."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def is_plugin(spec: str) -> bool:
    """True if spec names a driver plugin: an import path or a registered name."""
    return is_import_path(spec) or spec.strip() in registered()


def load_factory(spec: str) -> Callable[..., Any]:
    """The class or function spec names ('module:Attribute' or a registered name)."""
    s = spec.strip()
    path = s if is_import_path(s) else registered().get(s)
    if path is None:
        names = ", ".join(sorted(registered())) or "none are installed"
        raise PluginError(f"no driver plugin named {s!r} (registered under {GROUP}: {names}); "
                          "give an import path like 'package.module:Class'")
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # the plugin's own import errors, whatever they are
        raise PluginError(f"driver plugin {s!r}: cannot import {module_name!r}: {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"driver plugin {s!r}: {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise PluginError(f"driver plugin {s!r}: {path} is not a class or function")
    return obj


def make_plugin_driver(spec: str, options: dict[str, Any]) -> ArrayDriver:
    """Call the plugin with options as keyword arguments; it must return an ArrayDriver."""
    factory = load_factory(spec)
    try:
        driver = factory(**options)
    except DriverError:
        raise
    except TypeError as e:
        raise PluginError(f"driver plugin {spec!r} does not take the options {sorted(options)}: {e}") from e
    except Exception as e:  # the plugin's own failure to connect or set up, whatever it raises
        raise PluginError(f"driver plugin {spec!r} failed to start: {type(e).__name__}: {e}") from e
    if not isinstance(driver, ArrayDriver):
        raise PluginError(f"driver plugin {spec!r} returned a {type(driver).__name__}, not an ArrayDriver")
    return driver
