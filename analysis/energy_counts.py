"""What a training run did, counted from its run log, summary.json and config (docs/energy.md, "What is counted"):
per layer the multiply-accumulates and conversions of the forward and backward passes, the update's
multiply-adds into chi over the nonzero inputs, the pulses of every program class with their logged
amplitudes and widths, device reads by reason, round trips. analysis/energy.py prices them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drivers.runlog import RunLogError, RunLogReader
from drivers.runlog.schema import ARRAYS

from hil.mapping import per_layer

from .runs import AnalysisError, _config, _json_attr, _summary, _text, find_log, open_log, writer_alive

#: Read reasons of training (the read-backs and periodic reads a training step needs); the others are set-up
#: (initial, probe), evaluation (not training) or a resume's.
TRAINING_READS = ("after-program", "refresh-verify", "periodic")
SETUP_READS = ("initial", "probe")
#: Full reads of every mapped device: their mean conductance is the array's during the multiplies.
FULL_READS = ("initial", "periodic", "evaluation", "resume")
#: Program classes.
UPDATE, REFRESH, SETUP = "update", "refresh", "setup"


@dataclass
class LayerCount:
    """One analog layer's work per training sample (uses: the times its matrix is applied per sample)."""

    index: int
    name: str
    kind: str  # "linear" or "conv2d"
    fan_in: int
    fan_out: int
    uses: int
    update_inputs: float  # nonzero inputs (bias included) summed over the uses, per sample
    update_inputs_from: str  # how update_inputs was counted
    input_grad: bool = True  # whether the backward pass needs the gradient of the layer's input (d @ W^T)
    devices: int = 2  # devices per weight: G+ and G-, times the layer's devices per polarity

    @property
    def weights(self) -> int:
        return (self.fan_in + 1) * self.fan_out

    @property
    def forward_macs(self) -> int:
        return self.uses * self.weights

    @property
    def backward_macs(self) -> int:
        """d @ W^T without the bias row; none where the input needs no gradient (an MLP's or CNN's first layer)."""
        return self.uses * self.fan_in * self.fan_out if self.input_grad else 0

    @property
    def forward_dac(self) -> int:
        return self.uses * self.fan_in  # the bias row's input is constant: no conversion

    @property
    def forward_adc(self) -> int:
        return self.uses * self.fan_out

    @property
    def backward_dac(self) -> int:
        return self.uses * self.fan_out if self.input_grad else 0

    @property
    def backward_adc(self) -> int:
        return self.uses * self.fan_in if self.input_grad else 0

    @property
    def update_macs(self) -> float:
        """Multiply-adds of chi += -lr A^T D per sample: one per nonzero input and output."""
        return self.update_inputs * self.fan_out

    @property
    def update_words(self) -> float:
        """32-bit words (chi, or the digital side's weights) the update reads and writes per sample: one per
        touched weight. A layer applied several times per sample (conv positions, time steps) sums its uses'
        products before it writes (hil.network.accumulate_rows: one A^T D per step), so its touched rows are at
        most fan_in + 1."""
        rows = self.update_inputs if self.uses == 1 else min(self.fan_in + 1, self.update_inputs)
        return rows * self.fan_out

    @property
    def weight_reads(self) -> int:
        """Digital side: the layer's weights read once per pass (forward; backward past the first layer)."""
        return self.weights + (self.fan_in * self.fan_out if self.input_grad else 0)

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "kind": self.kind, "fan_in": self.fan_in,
                "fan_out": self.fan_out, "uses_per_sample": self.uses, "weights": self.weights,
                "forward_macs": self.forward_macs, "backward_macs": self.backward_macs,
                "forward_dac": self.forward_dac, "forward_adc": self.forward_adc, "backward_dac": self.backward_dac,
                "backward_adc": self.backward_adc, "update_inputs": self.update_inputs,
                "update_inputs_from": self.update_inputs_from, "update_macs": self.update_macs,
                "update_words": self.update_words, "input_grad": self.input_grad, "devices_per_weight": self.devices}


@dataclass
class ProgramClass:
    """The programs of one class (update, refresh, set-up): how many, their devices and pulses, pulse charge."""

    programs: int = 0
    devices: int = 0
    set_pulses: int = 0
    reset_pulses: int = 0
    set_ua_ns: float = 0.0  # sum over SET pulses of amplitude (uA) x width (ns)
    reset_ua_ns: float = 0.0
    set_ns: float = 0.0  # sum of SET pulse widths, ns
    reset_ns: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ReadClass:
    """The reads of one reason: calls, devices read, and the sum of the conductances read (uS)."""

    calls: int = 0
    devices: int = 0
    g_sum_us: float = 0.0
    with_program: int = 0  # calls that were a program's read-back in the same round trip

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Counts:
    """What the run did, from its log: the basis of both sides' energy and of the chip's time."""

    run_dir: Path
    state: str
    network_kind: str
    batch_size: int
    steps: int  # the last training step the log's rows reach (or summary.json's, finished)
    samples: int  # training samples of those steps
    samples_per_epoch: int | None
    epochs_done: float | None
    layers: list[LayerCount]
    programs: dict[str, ProgramClass]
    reads: dict[str, ReadClass]
    mean_g_us: float | None  # mean conductance of the mapped devices over the full reads
    measured_us_per_sample: float | None
    skipped_programs: dict[str, int] = field(default_factory=dict)
    not_counted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def training_reads(self) -> ReadClass:
        out = ReadClass()
        for reason in TRAINING_READS:
            r = self.reads.get(reason)
            if r is not None:
                out.calls += r.calls
                out.devices += r.devices
                out.g_sum_us += r.g_sum_us
                out.with_program += r.with_program
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "samples": self.samples, "samples_per_epoch": self.samples_per_epoch,
                "epochs_done": self.epochs_done, "batch_size": self.batch_size, "network_kind": self.network_kind,
                "layers": [lc.as_dict() for lc in self.layers],
                "programs": {k: v.as_dict() for k, v in self.programs.items()},
                "reads": {k: v.as_dict() for k, v in self.reads.items()},
                "mean_g_us": self.mean_g_us, "measured_us_per_sample": self.measured_us_per_sample,
                "skipped_programs": self.skipped_programs}


def _layer_shapes(r: RunLogReader, attrs: dict[str, Any], not_counted: list[str]) -> list[tuple[str, int, int]]:
    """(name, fan_in, fan_out) per analog layer, from mapping/table (weight_row, weight_col: (fan_in + 1) x fan_out)."""
    info = _json_attr(attrs, "network_layers_json") or []
    shapes: list[tuple[str, int, int]] = []
    if "mapping/table" in r.array_names():
        t = r.array("mapping/table")
        try:  # the reader gives arrays' data only; the columns attribute names their order
            cols = [c.strip() for c in _text(r._f[f"{ARRAYS}/mapping/table"].attrs.get("columns", "")).split(",")]
        except (KeyError, OSError, AttributeError):
            cols = []
        try:
            li, ri, ci = cols.index("layer"), cols.index("weight_row"), cols.index("weight_col")
        except ValueError:
            li, ri, ci = 0, 1, 2  # the order docs/run-log.md gives
        for k in range(int(t[:, li].max()) + 1 if t.size else 0):
            sel = t[:, li] == k
            if not sel.any():
                continue
            rows, outs = int(t[sel, ri].max()) + 1, int(t[sel, ci].max()) + 1
            name = str(info[k].get("name", k)) if k < len(info) and isinstance(info[k], dict) else str(k)
            shapes.append((name, rows - 1, outs))
    elif info:
        shapes = [(str(d.get("name", i)), int(d["fan_in"]), int(d["fan_out"])) for i, d in enumerate(info)]
        not_counted.append("the log has no mapping/table: the layers' shapes come from network_layers_json")
    return shapes


def _uses(cfg: dict[str, Any], kind: str, shapes: list[tuple[str, int, int]], data_shape: tuple[int, ...] | None,
          notes: list[str], not_counted: list[str]) -> list[tuple[str, int, dict[str, int] | None]]:
    """Per layer: kind ("linear" / "conv2d"), uses per sample, and a conv layer's geometry (for the nonzero count)."""
    n = len(shapes)
    if kind == "lstm":
        # every block (LSTM layers, read-out) is applied once per character of the bptt window
        bptt = int((cfg.get("network", {}).get("lstm") or {}).get("bptt", 32))
        notes.append(f"network.kind = \"lstm\": each layer is applied {bptt} times per training item (network.lstm.bptt), "
                     "and a training sample is one window")
        return [("lstm" if i < n - 1 else "linear", bptt, None) for i in range(n)]
    if kind != "cnn":
        if kind != "mlp":
            not_counted.append(f"network.kind = \"{kind}\": how often each layer is applied per sample is not derived "
                               "from the log; every layer is counted once per sample (a conv layer's output positions, "
                               "a recurrent layer's time steps are not)")
        return [("linear", 1, None)] * n
    c = cfg.get("network", {}).get("cnn", {})
    channels = list(c.get("channels", [8, 16]))
    k, p, pool = int(c.get("kernel", 5)), int(c.get("padding", 0)), bool(c.get("pool", True))
    if data_shape is None or len(data_shape) != 3:
        not_counted.append("the data set's image shape is unknown: the conv layers' output positions are not counted "
                           "(each conv layer counted once per sample)")
        return [("conv2d" if i < len(channels) else "linear", 1, None) for i in range(n)]
    ch, h, w = data_shape
    out: list[tuple[str, int, dict[str, int] | None]] = []
    for i, co in enumerate(channels):
        ho, wo = h + 2 * p - k + 1, w + 2 * p - k + 1
        if i >= n or shapes[i][1] != ch * k * k or shapes[i][2] != co:
            not_counted.append(f"layer {i}: its shape in the log does not match network.cnn (conv {ch}x{k}x{k} -> {co}); "
                               "counted once per sample")
            out.append(("conv2d", 1, None))
        else:
            out.append(("conv2d", ho * wo, {"in_ch": ch, "h": h, "w": w, "k": k, "p": p, "ho": ho, "wo": wo}))
        h, w = (ho // 2, wo // 2) if pool else (ho, wo)
        ch = co
    out += [("linear", 1, None)] * (n - len(channels))
    return out[:n]


def trained_indices(seed: int, n: int, batch: int, steps: int) -> tuple[np.ndarray, int]:
    """(how often each training sample was trained, samples trained) after `steps` steps: every full epoch once
    each, then the first samples of the next epoch's order (hil.data.epoch_order)."""
    from hil.data import epoch_order

    per_epoch = -(-n // batch)
    full, rest = divmod(steps, per_epoch)
    times = np.full(n, full, np.int64)
    if rest:
        times[epoch_order(seed, full, n)[:min(rest * batch, n)]] += 1
    return times, int(times.sum())


def first_layer_nonzero(x: np.ndarray, geometry: dict[str, int] | None) -> np.ndarray:
    """Per training sample, the first layer's nonzero inputs summed over its uses, bias inputs included.

    A fully connected layer: nonzero features + 1. A conv layer: per output position, the nonzero values in its
    patch (zero padding counts as zero) + 1, summed over the positions."""
    if geometry is None:
        return np.count_nonzero(x, axis=1).astype(np.float64) + 1.0
    g = geometry
    out = np.empty(x.shape[0], np.float64)
    for lo in range(0, x.shape[0], 4096):
        m = (x[lo:lo + 4096] != 0).reshape(-1, g["in_ch"], g["h"], g["w"]).sum(axis=1)
        m = np.pad(m, ((0, 0), (g["p"], g["p"]), (g["p"], g["p"]))).astype(np.int64)
        s = np.zeros((m.shape[0], m.shape[1] + 1, m.shape[2] + 1), np.int64)
        s[:, 1:, 1:] = m.cumsum(1).cumsum(2)
        k = g["k"]
        box = s[:, k:, k:] - s[:, :-k, k:] - s[:, k:, :-k] + s[:, :-k, :-k]  # (n, ho, wo): nonzeros per patch
        out[lo:lo + 4096] = box[:, :g["ho"], :g["wo"]].reshape(box.shape[0], -1).sum(axis=1) + g["ho"] * g["wo"]
    return out


def _dataset(cfg: dict[str, Any]) -> Any:
    from hil.data import load_dataset

    d = cfg.get("data", {})
    return load_dataset(d.get("name", "mnist"), d.get("path"), download=False, seed=int(cfg.get("seed", 0)),
                        train_limit=d.get("train_limit"), test_limit=1)


def _programs(r: RunLogReader, unapplied: set[int], skipped: dict[str, int]) -> tuple[dict[str, ProgramClass], set[int]]:
    """Programs by class. In each step the update program comes first; a program with RESETs at a step > 0 and
    every later program of that step (a verify refresh's top-ups) are refresh; step 0 is set-up (initial
    programming, the eps = "auto" probe). Unapplied programs and a program id logged twice are skipped."""
    shapes = [r.shapes(i) for i in range(r.shape_rows)]
    classes = {UPDATE: ProgramClass(), REFRESH: ProgramClass(), SETUP: ProgramClass()}
    seen: set[int] = set()
    seqs: set[int] = set()
    refresh_step = -1
    for ev in r.iter_program_events():
        for pid, step, seq, code, count, sets, resets in zip(ev["program_id"].tolist(), ev["step"].tolist(),
                                                               ev["seq"].tolist(), ev["shapes"].tolist(),
                                                               ev["count"].tolist(), ev["set_pulses"].tolist(),
                                                               ev["reset_pulses"].tolist(), strict=True):
            seqs.add(seq)
            if pid in unapplied:
                skipped["unapplied"] = skipped.get("unapplied", 0) + 1
                continue
            if pid in seen:
                skipped["logged twice"] = skipped.get("logged twice", 0) + 1
                continue
            seen.add(pid)
            if step <= 0:
                cls = SETUP
            elif resets or refresh_step == step:
                cls, refresh_step = REFRESH, step
            else:
                cls = UPDATE
            c, s = classes[cls], shapes[code]
            c.programs += 1
            c.devices += count
            c.set_pulses += sets
            c.reset_pulses += resets
            c.set_ua_ns += sets * s.set.amplitude_ua * s.set.width_ns
            c.reset_ua_ns += resets * s.reset.amplitude_ua * s.reset.width_ns
            c.set_ns += sets * s.set.width_ns
            c.reset_ns += resets * s.reset.width_ns
    return classes, seqs


def _reads(r: RunLogReader, program_seqs: set[int]) -> dict[str, ReadClass]:
    """Reads by reason: calls, devices, the conductances' sum; calls that were a program's read-back."""
    names = r.reason_names
    out = {n: ReadClass() for n in names}
    for ev in r.iter_read_events():
        for reason, count, seq in zip(ev["reason"].tolist(), ev["count"].tolist(), ev["seq"].tolist(), strict=True):
            c = out[reason]
            c.calls += 1
            c.devices += count
            c.with_program += (seq - 1) in program_seqs
    g = np.zeros(len(names))
    for piece in r.iter_reads():
        g += np.bincount(piece["reason_code"], weights=piece["conductance_us"].astype(np.float64), minlength=len(names))
    for i, n in enumerate(names):
        out[n].g_sum_us = float(g[i])
    return {k: v for k, v in out.items() if v.calls}


def count_run(path: str | Path) -> Counts:
    """Count what a run did (its log, summary.json, config); AnalysisError with one line if it cannot be read."""
    run_dir, log = find_log(path)
    if log.name != "run.h5":
        raise AnalysisError(f"{log} is not a training log (pcm-hil energy reads pcm-hil train's run.h5)", 2)
    live = writer_alive(log)
    notes: list[str] = []
    not_counted: list[str] = []
    try:
        with open_log(log) as r:
            return _count(r, run_dir, live, notes, not_counted)
    except RunLogError as e:
        raise AnalysisError(str(e)) from None
    except OSError as e:
        raise AnalysisError(f"cannot read {log}: {e.strerror or e}") from None


def _count(r: RunLogReader, run_dir: Path, live: bool, notes: list[str], not_counted: list[str]) -> Counts:
    attrs = dict(r.attrs)
    if "calibration_plan" in attrs or _text(attrs.get("run_kind", "")) == "calibration":
        raise AnalysisError(f"{run_dir} holds a calibration log, not a training run", 2)
    summary = _summary(run_dir, notes)
    cfg = _config(run_dir, attrs, notes)
    kind = _text(attrs.get("network_kind", cfg.get("network", {}).get("kind", "mlp")))
    batch = int(cfg.get("update", {}).get("batch_size", 1))
    finished = bool(summary and summary.get("finished")) and not live

    m = r.metrics()
    unapplied = {int(x) for x in (summary or {}).get("unapplied_program_ids") or []}
    if "unapplied_program_id" in m:
        unapplied |= {int(x) for x in m["unapplied_program_id"][np.isfinite(m["unapplied_program_id"])]}
    skipped: dict[str, int] = {}
    programs, seqs = _programs(r, unapplied, skipped)
    reads = _reads(r, seqs)
    if skipped.get("logged twice"):
        notes.append(f"{skipped['logged twice']} program(s) logged twice (a resume logs the journaled ones again) "
                     "are counted once")
    if "resume" in reads:
        notes.append("the run was resumed: reads and programs between its last flush and the kill were never logged, "
                     "so the counts may fall a little short")

    last = [int(m["step"].max())] if m["step"].size else []
    for ev in (*r.iter_program_events(), *r.iter_read_events()):
        if ev["step"].size:
            last.append(int(ev["step"].max()))
    log_steps = max(last, default=0)
    # a run stopped by a signal (or at a checkpoint) wrote summary.json at its last step: its counts are whole
    stopped = (not finished and not live and bool(summary) and isinstance(summary.get("steps"), int)
               and summary["steps"] >= log_steps)
    steps = int(summary["steps"]) if (finished or stopped) and isinstance(summary.get("steps"), int) else log_steps
    if finished:
        state = "finished"
    elif stopped:
        how = " by a signal" if summary.get("stopped_by_signal") else ""
        state = f"stopped{how} at step {steps:,}, before its planned epochs"
        notes.append(f"the run stopped{how} at step {steps:,} (summary.json): the counts are over its {steps:,} steps")
    else:
        state = "being written" if live else "stopped without finishing (killed or crashed)"
        not_counted.append(f"the run is {'still being written' if live else 'not finished'}: the log's flushed rows "
                           f"reach step {log_steps:,}; steps after it (and rows a killed writer never flushed) are "
                           "not counted, and the per-sample figures are over the samples of those steps")
    if r.torn_tail:
        not_counted.append("the log has a torn tail (rows written without their checksums, not counted): "
                           + ", ".join(f"{k} {v}" for k, v in sorted(r.torn_tail.items())))

    # ---- the layers and their uses
    shapes = _layer_shapes(r, attrs, not_counted)
    data = None
    data_shape: tuple[int, ...] | None = None
    data_name = cfg.get("data", {}).get("name", "mnist")
    try:
        data = _dataset(cfg)
        data_shape = tuple(data.input_shape) if data.input_shape else (data.n_features,)
    except Exception as e:  # noqa: BLE001 - any failure to load the data set only costs the nonzero count
        from hil.data import INPUT_SHAPES

        data_shape = INPUT_SHAPES.get(data_name)
        msg = " ".join(str(e).split())[:200]
        not_counted.append(f"the data set ({data_name}) cannot be loaded here ({msg}): the first layer's update is "
                           "counted over every input (dense), not only the nonzero ones")
    uses = _uses(cfg, kind, shapes, data_shape, notes, not_counted)
    if cfg.get("driver", {}).get("dry_run", False):
        not_counted.append("a dry run (driver.dry_run): its programs were logged but never sent; their pulses are "
                           "counted as the logged programs would deliver them, and the read-backs are what the chip "
                           "read without them")
    if not cfg.get("driver", {}).get("analog_mvm", False):
        notes.append("the run's multiplies used the host copy of the conductances (driver.analog_mvm off); "
                     "they are counted as the architecture does them, on the array")

    samples_per_epoch = int(data.x_train.shape[0]) if data is not None else None
    seed = int(cfg.get("seed", 0))
    if data is not None:
        times, samples = trained_indices(seed, samples_per_epoch, batch, steps)
    else:
        times = None
        whole = (finished or stopped) and isinstance(summary.get("samples_trained"), int)
        samples = int(summary["samples_trained"]) if whole else steps * batch
        ep = cfg.get("update", {}).get("epochs")
        if finished and isinstance(ep, int) and ep:
            samples_per_epoch = samples // ep
    said = (summary or {}).get("samples_trained")
    if (finished or stopped) and isinstance(said, int) and said != samples:
        notes.append(f"summary.json says {summary['samples_trained']:,} samples trained, the count from the steps "
                     f"{samples:,}; the counts use {samples:,}")

    layers: list[LayerCount] = []
    copies = per_layer(cfg.get("mapping", {}).get("devices_per_polarity", 1), len(shapes))
    for i, ((name, fan_in, fan_out), (lkind, u, geom)) in enumerate(zip(shapes, uses, strict=True)):
        if i == 0 and times is not None and samples and kind in ("mlp", "cnn"):
            nz = first_layer_nonzero(data.x_train, geom)
            upd = float((nz * times).sum() / samples)
            how = (f"nonzero inputs of the {data_name} samples this run trained ({samples:,}), counted in the data "
                   "set, bias included")
        else:
            upd = float(u * (fan_in + 1))
            if i:
                how = "every input counted (dense), bias included"
            elif kind not in ("mlp", "cnn"):
                how = "every input counted (dense): nonzero inputs are counted for mlp and cnn runs only"
            else:
                how = "every input counted (dense): the data set could not be loaded"
        # the first layer of an mlp / cnn takes the data (no gradient); an lstm's takes the (digital) embedding and h
        layers.append(LayerCount(i, name, lkind, fan_in, fan_out, u, upd, how, input_grad=i > 0 or kind == "lstm",
                                 devices=2 * copies[i]))

    full = [reads[k] for k in FULL_READS if k in reads]
    n_full = sum(c.devices for c in full)
    mean_g = sum(c.g_sum_us for c in full) / n_full if n_full else None
    if mean_g is None:
        any_dev = sum(c.devices for c in reads.values())
        mean_g = sum(c.g_sum_us for c in reads.values()) / any_dev if any_dev else None
        if mean_g is None:
            not_counted.append("no conductance was read: the array's energy in the analog multiplies is not counted")
        else:
            notes.append("no full read in the log: the multiplies' array energy uses the mean of every device read")

    us = (summary or {}).get("us_per_sample")
    measured = float(us) if (finished or stopped) and isinstance(us, (int, float)) else None
    if measured is None:
        not_counted.append("measured wall time: summary.json has none for this run (killed, live or unfinished)")
    epochs_done = samples / samples_per_epoch if samples_per_epoch else None
    return Counts(run_dir, state, kind, batch, steps, samples, samples_per_epoch, epochs_done, layers, programs, reads,
                  mean_g, measured, skipped, not_counted, notes)

