"""SWEEP.toml: the base run config, the grid and seeded random samples of dotted config keys, times seeds, read
and checked into a Sweep of named Points before anything starts (docs/sweep.md). hil/sweep.py runs them."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from sim.files import TomlFileError, read_toml_text

from .config import ConfigError, RunConfig, load_config, validate_config

#: Top-level keys of SWEEP.toml.
TOP_KEYS = ("base", "seeds", "baseline", "grid", "random")
RANDOM_KEYS = ("samples", "seed", "keys")
DISTRIBUTIONS = ("uniform", "log_uniform", "integers", "choice")
#: Random floats are rounded to this many significant digits, so a point's folder name is its exact value.
RANDOM_DIGITS = 4
#: Folder names longer than this are cut and given a hash of the whole name.
MAX_NAME = 120


class SweepError(ValueError):
    """SWEEP.toml, a point's config or DIR cannot be used; the message is one line naming the key or point."""


# --------------------------------------------------------------------------------------------- the spec

@dataclass(frozen=True)
class Point:
    """One run of the sweep: its folder name, the swept keys' values (dotted keys), its seed and full config."""

    name: str
    values: dict[str, Any]
    seed: int
    cfg: RunConfig


@dataclass
class Sweep:
    """A loaded SWEEP.toml: the base config, the swept keys (in order) and every point."""

    path: Path
    base: RunConfig
    keys: list[str]
    points: list[Point]
    seeds: list[int]
    baseline: bool = False
    text: str = ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _did_you_mean(word: str, choices: tuple[str, ...]) -> str:
    import difflib

    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_sweep(path: str | Path) -> Sweep:
    """Read SWEEP.toml, expand its points and validate every point's config; SweepError (one line) otherwise.

    Nothing is created or started here.
    """
    p = Path(path)
    try:
        text, spec = read_toml_text(p, "sweep file")
    except TomlFileError as e:
        raise SweepError(str(e)) from None
    for k in spec:
        if k not in TOP_KEYS:
            raise SweepError(f"{p}: unknown key {k!r}{_did_you_mean(k, TOP_KEYS)}; a sweep file has "
                             f"{', '.join(TOP_KEYS)}")
    base = _base_config(spec.get("base"), p)
    grid = _grid(spec.get("grid", {}), p)
    rnd_keys, samples = _random(spec.get("random"), p)
    both = set(grid) & set(rnd_keys)
    if both:
        raise SweepError(f"{p}: {sorted(both)[0]!r} is in both [grid] and [random.keys]")
    seeds = spec.get("seeds", [base.seed])
    if not isinstance(seeds, list) or not seeds or \
            any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise SweepError(f"{p}: seeds must be a non-empty list of non-negative integers, e.g. seeds = [0, 1]")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{p}: seeds lists a seed twice: {seeds}")
    baseline = spec.get("baseline", False)
    if not isinstance(baseline, bool):
        raise SweepError(f"{p}: baseline must be true or false")
    keys = list(grid) + list(rnd_keys)
    short = short_names(keys)
    combos = [dict(zip(grid, vals, strict=True)) for vals in product(*grid.values())] if grid else [{}]
    points: list[Point] = []
    names: dict[str, str] = {}
    for sample in samples or [{}]:
        for combo in combos:
            values = {**combo, **sample}
            for seed in seeds:
                name = point_name(values, seed, short)
                cfg = _point_config(base, values, seed, name)
                lower = name.lower()  # folders differing only in case collide on some file systems
                if lower in names:
                    raise SweepError(f"points {names[lower]!r} and {name!r} would share a folder; change a value")
                names[lower] = name
                points.append(Point(name, values, seed, cfg))
    return Sweep(p, base, keys, points, list(seeds), baseline, text)


def _base_config(base: Any, where: Path) -> RunConfig:
    """[base] inline, or base = "run.toml" (relative to the sweep file); the default config when absent."""
    try:
        if base is None:
            cfg = RunConfig()
        elif isinstance(base, str):
            f = Path(base).expanduser()
            cfg = load_config(f if f.is_absolute() else where.parent / f)
        elif isinstance(base, dict):
            cfg = validate_config(base, f"{where} [base]")
        else:
            raise SweepError(f"{where}: base must be a run config table ([base]) or the path of a run TOML")
    except ConfigError as e:
        raise SweepError(_one_line(e)) from None
    _simulated_only(cfg, "the base config")
    return cfg


def _grid(grid: Any, where: Path) -> dict[str, list[Any]]:
    if not isinstance(grid, dict):
        raise SweepError(f"{where}: [grid] must be a table of dotted config keys, e.g. \"update.lr\" = [0.03, 0.1]")
    out: dict[str, list[Any]] = {}
    for key, vals in _dotted(grid, lambda v: isinstance(v, dict)).items():
        _check_key(key, where, "[grid]")
        if not isinstance(vals, list) or not vals:
            raise SweepError(f"{where}: [grid] {key!r} must be a non-empty list of values")
        out[key] = vals
    return out


def _dotted(table: dict[str, Any], is_table: Callable[[Any], bool], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as dotted keys: an unquoted update.lr = [...] is {"update": {"lr": [...]}} in TOML."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if is_table(v) and v:
            out.update(_dotted(v, is_table, key + "."))
        else:
            out[key] = v
    return out


def _check_key(key: str, where: Path, table: str) -> None:
    if isinstance(key, str) and key == "seed":
        raise SweepError(f"{where}: {table} 'seed': the run's seed is swept by the top-level seeds = [...]")
    if not isinstance(key, str) or not key or any(not part.isidentifier() for part in key.split(".")):
        raise SweepError(f"{where}: {table} {key!r} is not a dotted config key (e.g. update.lr)")


def _random(rnd: Any, where: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """[random]: samples (count), seed (of the draw) and keys (one distribution each); returns the drawn samples."""
    if rnd is None:
        return {}, []
    if not isinstance(rnd, dict):
        raise SweepError(f"{where}: [random] must be a table with samples, seed and [random.keys]")
    for k in rnd:
        if k not in RANDOM_KEYS:
            raise SweepError(f"{where}: [random] unknown key {k!r}{_did_you_mean(k, RANDOM_KEYS)}; "
                             f"it has {', '.join(RANDOM_KEYS)}")
    n, seed, keys = rnd.get("samples"), rnd.get("seed", 0), rnd.get("keys", {})
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 100_000:
        raise SweepError(f"{where}: [random] samples must be an integer from 1 to 100000 (points drawn)")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SweepError(f"{where}: [random] seed must be a non-negative integer")
    if not isinstance(keys, dict) or not keys:
        raise SweepError(f"{where}: [random.keys] must name at least one key, e.g. "
                         "\"update.lr\" = { log_uniform = [0.01, 0.3] }")
    keys = _dotted(keys, lambda v: isinstance(v, dict) and not (len(v) == 1 and next(iter(v)) in DISTRIBUTIONS))
    for key, dist in keys.items():
        _check_key(key, where, "[random.keys]")
        _check_distribution(key, dist, where)
    rng = np.random.default_rng([seed, 14])
    samples = [{key: _draw(rng, dist) for key, dist in keys.items()} for _ in range(n)]
    return keys, samples


def _check_distribution(key: str, dist: Any, where: Path) -> None:
    what = f"{where}: [random.keys] {key!r}"
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise SweepError(f"{what} must be one of {{ uniform = [lo, hi] }}, {{ log_uniform = [lo, hi] }}, "
                         "{ integers = [lo, hi] }, { choice = [a, b, ...] }")
    kind, arg = next(iter(dist.items()))
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise SweepError(f"{what}: choice needs a non-empty list of values")
        return
    nums = isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          for v in arg)
    if not nums or not arg[0] <= arg[1] or not all(math.isfinite(v) for v in arg):
        raise SweepError(f"{what}: {kind} needs [lo, hi] with lo <= hi")
    if kind == "integers" and not all(isinstance(v, int) for v in arg):
        raise SweepError(f"{what}: integers needs integer bounds [lo, hi] (both included)")
    if kind == "log_uniform" and arg[0] <= 0:
        raise SweepError(f"{what}: log_uniform needs 0 < lo <= hi")


def _draw(rng: np.random.Generator, dist: dict[str, Any]) -> Any:
    kind, arg = next(iter(dist.items()))
    if kind == "choice":
        return arg[int(rng.integers(len(arg)))]
    if kind == "integers":
        return int(rng.integers(arg[0], arg[1], endpoint=True))
    lo, hi = float(arg[0]), float(arg[1])
    v = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if kind == "log_uniform" else float(rng.uniform(lo, hi))
    return float(f"{v:.{RANDOM_DIGITS}g}")


def _point_config(base: RunConfig, values: dict[str, Any], seed: int, name: str) -> RunConfig:
    try:
        cfg = base.with_overrides(**values, seed=seed)
    except ConfigError as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:]) or _one_line(e)
        raise SweepError(f"point {name}: {detail}") from None
    _simulated_only(cfg, f"point {name}")
    return cfg


def _simulated_only(cfg: RunConfig, what: str) -> None:
    """A sweep trains on simulated chips only (the in-process mock): a tester is one chip, not one per point."""
    d = cfg.driver
    if d.kind in ("visa", "serial"):
        raise SweepError(f"{what}: driver.kind = {d.kind!r} ({d.resource}) is a real tester; a sweep runs on "
                         "simulated chips only (driver.kind = \"mock\"): a tester is one chip, not one per point")
    if d.kind != "mock":
        raise SweepError(f"{what}: driver.kind = {d.kind!r}; a sweep runs on simulated chips only "
                         "(driver.kind = \"mock\", one simulated chip per point)")


def short_names(keys: list[str]) -> dict[str, str]:
    """The name each swept key has in folder names: its last part ("lr"), or the whole key where two share one."""
    leaf = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if leaf.count(s) == 1 and s != "seed" else k) for k, s in zip(keys, leaf, strict=True)}


def format_value(v: Any) -> str:
    """A value as it appears in a folder name: 0.1, 1e-05, 16_32 for [16, 32], true / false."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "_".join(format_value(x) for x in v) if v else "empty"
    if isinstance(v, dict):
        return "_".join(f"{k}-{format_value(x)}" for k, x in v.items()) if v else "empty"
    return str(v)


def point_name(values: dict[str, Any], seed: int, short: dict[str, str]) -> str:
    """The point's folder name, e.g. 'lr=0.1,threshold_us=6.0,seed=1': filesystem-safe and deterministic."""
    parts = [f"{short[k]}={format_value(v)}" for k, v in values.items()] + [f"seed={seed}"]
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "-", ",".join(parts))
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME - 9] + "~" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


# --------------------------------------------------------------------------------------------- DIR
