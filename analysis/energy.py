"""Energy and time of a training run, counted from what the run did to the chip (docs/energy.md).

`estimate(RUN_DIR, table=None) -> Estimate`:

- counts, from the run log (and summary.json, config): per layer the multiply-accumulates of the forward and
  backward passes and the conversions they need (from the layers' shapes in mapping/table and the number of
  uses per sample: 1 for a fully connected layer, the output positions for a conv layer, from the logged
  config and the data shape); the update's multiply-adds into chi over the nonzero inputs only (the first
  layer's nonzero inputs counted in the data set the run trained on, over exactly the samples it trained);
  SET and RESET pulses of the update, refresh and set-up programs with their logged amplitudes and widths;
  device reads by reason, with the conductances they read; round trips;
- an energy model over a per-operation table (analysis/energy_table.toml, every entry with value, unit and
  source; `--table FILE` merges a partial table over it), for the chip (mixed precision: analog multiply,
  digital chi) and for a fully digital 32-bit implementation of the same training;
- a time model of the chip side (logged pulse widths, a stated read time per device, a stated link latency).

Like the rest of analysis/, it reads a finished, a killed or a live run; what a truncated log cannot say is
listed in `Estimate.not_counted`, and the rest is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


from sim.files import TomlFileError, read_toml

from .energy_counts import (  # noqa: F401 - the counts are part of analysis.energy's API
    FULL_READS, REFRESH, SETUP, SETUP_READS, TRAINING_READS, UPDATE, Counts, LayerCount, ProgramClass, ReadClass,
    count_run, first_layer_nonzero, trained_indices)
from .runs import AnalysisError

#: The table that ships with the project.
DEFAULT_TABLE = Path(__file__).with_name("energy_table.toml")
#: The paper's figure (Nandakumar et al., Front. Neurosci. 2020): energy efficiency of the mixed-precision
#: architecture over a dedicated fully digital 32-bit implementation, training an MLP (173x in arXiv v1).
PAPER_RATIO = 172.0

#: Units an entry may be given in: dimension and factor to the canonical unit (pJ, pJ/bit, V, ns, bytes, bits).
UNITS: dict[str, tuple[str, float]] = {
    "fJ": ("energy", 1e-3), "pJ": ("energy", 1.0), "nJ": ("energy", 1e3), "uJ": ("energy", 1e6), "J": ("energy", 1e12),
    "fJ/bit": ("energy per bit", 1e-3), "pJ/bit": ("energy per bit", 1.0),
    "mV": ("voltage", 1e-3), "V": ("voltage", 1.0),
    "ps": ("time", 1e-3), "ns": ("time", 1.0), "us": ("time", 1e3), "ms": ("time", 1e6), "s": ("time", 1e9),
    "bytes": ("size", 1.0), "KiB": ("size", 1024.0), "MiB": ("size", 1024.0 ** 2), "GiB": ("size", 1024.0 ** 3),
    "bits": ("bits", 1.0), "count": ("count", 1.0),
}

class EnergyTableError(AnalysisError):
    """A per-operation table that cannot be used; the message is one line naming the file and the entry."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 2)


# ============================================================================================== the table
@dataclass(frozen=True)
class Entry:
    """One per-operation figure: value in unit (canonical: pJ, pJ/bit, V, ns, bytes, bits, count), its source,
    and low / high for an uncertain one."""

    name: str
    value: float
    unit: str
    source: str
    low: float | None = None
    high: float | None = None
    description: str = ""
    origin: str = "default"  # the file it came from

    @property
    def factor(self) -> float:
        return UNITS[self.unit][1]

    @property
    def canonical(self) -> float:
        return self.value * self.factor

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "unit": self.unit, "source": self.source}
        if self.low is not None:
            out["low"], out["high"] = self.low, self.high
        if self.description:
            out["description"] = self.description
        out["from"] = self.origin
        return out


def _parse_entries(data: dict[str, Any], where: str, known: dict[str, Entry] | None, origin: str | None = None
                   ) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for name, e in data.items():
        if not isinstance(e, dict):
            raise EnergyTableError(f"energy table {where}: {name!r} is not a table ([{name}] with value, unit, source)")
        if known is not None and name not in known:
            raise EnergyTableError(f"energy table {where}: unknown entry {name!r} (known: {', '.join(sorted(known))})")
        extra = set(e) - {"value", "unit", "source", "low", "high", "description"}
        if extra:
            raise EnergyTableError(f"energy table {where}: entry {name!r} has unknown keys {', '.join(sorted(extra))} "
                                   "(allowed: value, unit, source, low, high, description)")
        for key in ("value", "unit", "source"):
            if key not in e or (isinstance(e[key], str) and not e[key].strip()):
                raise EnergyTableError(f"energy table {where}: entry {name!r} has no {key} (every entry needs value, "
                                       "unit and source)")
        unit, source = e["unit"], e["source"]
        if not isinstance(unit, str) or unit not in UNITS:
            raise EnergyTableError(f"energy table {where}: entry {name!r} has unit {unit!r}; known units: "
                                   f"{', '.join(UNITS)}")
        if not isinstance(source, str):
            raise EnergyTableError(f"energy table {where}: entry {name!r}: source must be a string")
        if known is not None and UNITS[unit][0] != UNITS[known[name].unit][0]:
            raise EnergyTableError(f"energy table {where}: entry {name!r} is a {UNITS[known[name].unit][0]} "
                                   f"({known[name].unit}); {unit!r} is a {UNITS[unit][0]}")
        nums: dict[str, float | None] = {}
        for key in ("value", "low", "high"):
            v = e.get(key)
            if v is None:
                nums[key] = None
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise EnergyTableError(f"energy table {where}: entry {name!r}: {key} must be a finite number >= 0, "
                                       f"got {v!r}")
            nums[key] = float(v)
        low, high, value = nums["low"], nums["high"], nums["value"]
        assert value is not None
        if (low is None) != (high is None):
            raise EnergyTableError(f"energy table {where}: entry {name!r} gives {'low' if high is None else 'high'} "
                                   "without the other (an uncertain entry gives both)")
        if low is not None and high is not None and not low <= value <= high:
            raise EnergyTableError(f"energy table {where}: entry {name!r}: low {low:g} <= value {value:g} <= high "
                                   f"{high:g} does not hold")
        if UNITS[unit][0] in ("count", "bits", "size") and value <= 0:
            raise EnergyTableError(f"energy table {where}: entry {name!r}: value must be positive, got {value:g}")
        out[name] = Entry(name, value, unit, source, low, high, str(e.get("description", "")), origin or where)
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return read_toml(path, "energy table")
    except TomlFileError as e:
        raise EnergyTableError(str(e)) from None


def load_table(path: str | Path | None = None) -> dict[str, Entry]:
    """The shipped table, with the entries of the TOML file at path (if given) replacing its own.

    Every entry of path needs value, unit and source (and both low and high, or neither); its unit must measure
    what the shipped entry's does. EnergyTableError (one line naming the file and entry) otherwise."""
    table = _parse_entries(_read_toml(DEFAULT_TABLE), str(DEFAULT_TABLE), None, "default")
    if path is not None:
        table.update(_parse_entries(_read_toml(Path(path)), str(path), table))
    return table


# ============================================================================================== the model
CHIP_CATEGORIES = (
    ("analog multiply (array)", "forward and backward multiplies on the array: V_read^2 x G x mvm_time per device"),
    ("multiply conversions (DAC, ADC)", "inputs converted in, outputs converted out"),
    ("chi update arithmetic", "chi += -lr a d^T over the nonzero inputs, 32-bit float"),
    ("chi memory", "read and write of each touched chi (32-bit, SRAM / DRAM)"),
    ("pulse decisions", "|chi| against the threshold per touched chi; pulse count and chi -= n eps per pulsed device"),
    ("activations and loss", "the same digital work as the digital side"),
    ("SET pulses (updates)", "the update programs' logged pulses"),
    ("refresh pulses", "the refresh programs' logged RESET and SET pulses"),
    ("device reads (training)", "read-backs and periodic reads: V_read^2 x G read x read_time, plus one conversion"),
    ("data moved (digital unit - chip)", "multiply inputs and outputs, program words, read-back codes"),
)
DIGITAL_CATEGORIES = (
    ("multiply-accumulates (forward, backward)", "every multiply-accumulate in 32-bit float"),
    ("weight reads (forward, backward)", "each weight read once per pass (SRAM / DRAM)"),
    ("weight update arithmetic", "W += -lr a d^T over the nonzero inputs, 32-bit float"),
    ("weight update memory", "read and write of each touched weight (32-bit, SRAM / DRAM)"),
    ("activations and loss", "one activation (and derivative) per layer output"),
)


def _word_pj(t: dict[str, Entry], words: int) -> float:
    """Energy of one 32-bit word access when `words` words are stored: SRAM up to its capacity, DRAM beyond."""
    cap_words = t["sram_capacity"].canonical / 4.0
    f = 1.0 if words <= cap_words else cap_words / words
    return f * t["sram_word"].canonical + (1 - f) * t["dram_word"].canonical


def energies(c: Counts, t: dict[str, Entry]) -> tuple[dict[str, float], dict[str, float]]:
    """(chip, digital): energy per training sample in pJ, by category (CHIP_CATEGORIES, DIGITAL_CATEGORIES)."""
    v = {k: e.canonical for k, e in t.items()}
    n = max(c.samples, 1)
    mult, add = v["fp32_mult"], v["fp32_add"]
    fwd = sum(lc.forward_macs for lc in c.layers)
    bwd = sum(lc.backward_macs for lc in c.layers)
    dac = sum(lc.forward_dac + lc.backward_dac for lc in c.layers)
    adc = sum(lc.forward_adc + lc.backward_adc for lc in c.layers)
    upd = sum(lc.update_macs for lc in c.layers)
    upd_words = sum(lc.update_words for lc in c.layers)
    upd_inputs = sum(lc.update_inputs for lc in c.layers)
    acts = sum(lc.uses * lc.fan_out for lc in c.layers)
    words = sum(lc.weights for lc in c.layers)
    word = _word_pj(t, words)
    pu, pr = c.programs[UPDATE], c.programs[REFRESH]
    rd = c.training_reads()
    g = c.mean_g_us or 0.0
    # V^2 [V^2] x G [uS] x t [ns] = 1e-15 J = 1e-3 pJ; 2 devices (G+ and G-) per weight, or 2N with N per polarity
    mvm_array = sum((lc.forward_macs + lc.backward_macs) * lc.devices for lc in c.layers) * v["read_voltage"] ** 2 \
        * g * v["mvm_time"] * 1e-3
    read_array = v["read_voltage"] ** 2 * rd.g_sum_us * v["read_time"] * 1e-3
    # V [V] x I [uA] x t [ns] = 1e-15 J = 1e-3 pJ
    set_pj = lambda p: v["set_cell_voltage"] * p.set_ua_ns * 1e-3  # noqa: E731
    reset_pj = lambda p: v["reset_cell_voltage"] * p.reset_ua_ns * 1e-3  # noqa: E731
    bits = ((dac + adc) * v["converter_bits"] + ((pu.devices + pr.devices) * v["program_word_bits"]
                                                 + rd.devices * v["converter_bits"]) / n)
    update_arith = upd * (mult + add) + upd_inputs * mult  # a d^T multiply-adds, and a scaled by -lr
    chip = {
        "analog multiply (array)": mvm_array,
        "multiply conversions (DAC, ADC)": dac * v["dac_conversion"] + adc * v["adc_conversion"],
        "chi update arithmetic": update_arith,
        "chi memory": 2 * upd_words * word,
        "pulse decisions": upd_words * add + pu.devices / n * (2 * mult + add),
        "activations and loss": acts * v["activation"],
        "SET pulses (updates)": (set_pj(pu) + reset_pj(pu)) / n,
        "refresh pulses": (set_pj(pr) + reset_pj(pr)) / n,
        "device reads (training)": (read_array + rd.devices * v["adc_conversion"]) / n,
        "data moved (digital unit - chip)": bits * v["transfer_bit"],
    }
    digital = {
        "multiply-accumulates (forward, backward)": (fwd + bwd) * (mult + add),
        "weight reads (forward, backward)": sum(lc.weight_reads for lc in c.layers) * word,
        "weight update arithmetic": update_arith,
        "weight update memory": 2 * upd_words * word,
        "activations and loss": acts * v["activation"],
    }
    return chip, digital


def ratio_of(c: Counts, t: dict[str, Entry]) -> float:
    """Digital energy per sample over the chip's."""
    chip, digital = energies(c, t)
    s = sum(chip.values())
    return sum(digital.values()) / s if s > 0 else math.inf


def times_ns(c: Counts, t: dict[str, Entry]) -> dict[str, float]:
    """Chip side time per training sample, ns, by part: multiplies, pulses, reads, link round trips."""
    v = {k: e.canonical for k, e in t.items()}
    n = max(c.samples, 1)
    fwd_calls = sum(lc.uses for lc in c.layers)
    bwd_calls = sum(lc.uses for lc in c.layers if lc.input_grad)
    pu, pr = c.programs[UPDATE], c.programs[REFRESH]
    rd = c.training_reads()
    pulse_ns = (pu.set_ns + pu.reset_ns + pr.set_ns + pr.reset_ns) / v["program_parallel_devices"]
    # round trips: each program (its read-back rides along), each read call that was no read-back, and one call
    # per layer and direction per step for the multiplies (a conv layer's patches go in one call)
    layers_fwd = len(c.layers)
    layers_bwd = sum(1 for lc in c.layers if lc.input_grad)
    trips = pu.programs + pr.programs + (rd.calls - rd.with_program) + (layers_fwd + layers_bwd) * c.steps
    return {
        "analog multiplies": (fwd_calls + bwd_calls) * v["mvm_time"],
        "SET / RESET pulses": pulse_ns / n,
        "device reads": rd.devices * v["read_time"] / n,
        "link round trips": trips * v["link_latency"] / n,
    }


@dataclass
class Sensitivity:
    entry: str
    low: float
    high: float
    unit: str
    ratio_low: float
    ratio_high: float


@dataclass
class Estimate:
    """Counts, both sides' energy per sample by category (pJ), the ratio, its sensitivity, the chip's time."""

    counts: Counts
    table: dict[str, Entry]
    chip_pj: dict[str, float]
    digital_pj: dict[str, float]
    ratio: float
    sensitivity: list[Sensitivity]
    time_ns: dict[str, float]
    setup_pj: float  # one-off: the set-up programs' pulses and set-up reads (not per sample)
    core_mac_pj: float  # cross-check: the multiplies at pcm_core_mac (converters included)
    not_counted: list[str]
    notes: list[str]

    @property
    def chip_total_pj(self) -> float:
        return sum(self.chip_pj.values())

    @property
    def digital_total_pj(self) -> float:
        return sum(self.digital_pj.values())

    @property
    def time_total_ns(self) -> float:
        return sum(self.time_ns.values())

    def as_dict(self) -> dict[str, Any]:
        c = self.counts
        per_epoch = c.samples_per_epoch
        out: dict[str, Any] = {
            "run": str(c.run_dir), "state": c.state, "counts": c.as_dict(),
            "chip": {"per_sample_pj": self.chip_pj, "total_per_sample_pj": self.chip_total_pj,
                     "per_epoch_j": self.chip_total_pj * per_epoch * 1e-12 if per_epoch else None},
            "digital": {"per_sample_pj": self.digital_pj, "total_per_sample_pj": self.digital_total_pj,
                        "per_epoch_j": self.digital_total_pj * per_epoch * 1e-12 if per_epoch else None},
            "ratio": self.ratio,
            "sensitivity": [s.__dict__ for s in self.sensitivity],
            "reference": {"paper_ratio": PAPER_RATIO, "paper": "Nandakumar et al., Front. Neurosci. 14:406 (2020)",
                          "what_differs": REFERENCE_NOTE},
            "cross_check": {"multiplies_at_pcm_core_mac_pj": self.core_mac_pj,
                            "multiplies_here_pj": self.chip_pj["analog multiply (array)"]
                            + self.chip_pj["multiply conversions (DAC, ADC)"]},
            "setup_pj": self.setup_pj,
            "time": {"per_sample_ns": self.time_ns, "total_per_sample_ns": self.time_total_ns,
                     "measured_us_per_sample": c.measured_us_per_sample},
            "not_counted": self.not_counted, "notes": self.notes,
            "table": {k: e.as_dict() for k, e in self.table.items()},
        }
        return out


REFERENCE_NOTE = ("the paper's figure rests on its own architecture and per-operation energies, which this estimate "
                  "does not reproduce; here each touched chi is read and written in 32-bit SRAM at the same cost as "
                  "the digital side's weight update, and that memory traffic, equal on both sides, bounds the ratio")


def sensitivity(c: Counts, t: dict[str, Entry], fn: Callable[[Counts, dict[str, Entry]], float] = ratio_of
                ) -> list[Sensitivity]:
    """The ratio with each uncertain entry (low / high given) at its low and at its high value; entries that do
    not move it (time-only, the cross-check) are left out."""
    base = fn(c, t)
    out = []
    for name, e in t.items():
        if e.low is None or e.high is None:
            continue
        lo = fn(c, {**t, name: replace(e, value=e.low)})
        hi = fn(c, {**t, name: replace(e, value=e.high)})
        if math.isclose(lo, base, rel_tol=1e-12) and math.isclose(hi, base, rel_tol=1e-12):
            continue
        out.append(Sensitivity(name, e.low, e.high, e.unit, lo, hi))
    return out


def estimate(path: str | Path, table: str | Path | None = None) -> Estimate:
    """Energy (both sides) and chip time of the run at path; AnalysisError (one line) if it cannot be read,
    EnergyTableError if the table cannot be used."""
    t = load_table(table)
    c = count_run(path)
    chip, digital = energies(c, t)
    chip_total = sum(chip.values())
    ratio = sum(digital.values()) / chip_total if chip_total > 0 else math.inf
    v = {k: e.canonical for k, e in t.items()}
    ps = c.programs[SETUP]
    setup_reads = [c.reads[k] for k in SETUP_READS if k in c.reads]
    setup = (v["set_cell_voltage"] * ps.set_ua_ns + v["reset_cell_voltage"] * ps.reset_ua_ns) * 1e-3 \
        + sum(v["read_voltage"] ** 2 * r.g_sum_us * v["read_time"] * 1e-3 + r.devices * v["adc_conversion"]
              for r in setup_reads)
    core = sum(lc.forward_macs + lc.backward_macs for lc in c.layers) * v["pcm_core_mac"]
    return Estimate(c, t, chip, digital, ratio, sensitivity(c, t), times_ns(c, t), setup, core,
                    list(c.not_counted), list(c.notes))


# ============================================================================================== formatting
def si(value: float, unit: str) -> str:
    """value (in the base unit: J or s) with an SI prefix, 3 significant digits: 4.31 uJ, 912 ns."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g} {unit}"
    for p, f in (("", 1.0), ("m", 1e-3), ("u", 1e-6), ("n", 1e-9), ("p", 1e-12), ("f", 1e-15)):
        if abs(value) >= f * 0.9995:
            return f"{value / f:.3g} {p}{unit}"
    return f"{value:.3g} {unit}"
