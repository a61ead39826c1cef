"""Weights on the array: the host copy of conductances, chi accumulators, update and refresh programs.

All of a step's update pulses go out as one PulseProgram; program ids increase strictly across the
run. Conductances in microsiemens; weights W = beta * (G+ - G-) in weight units.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from drivers import ArrayDriver, Block, PulseProgram, PulseShapes, ReadResult
from sim import PCMParams

from .config import ReadPolicyConfig, RefreshConfig
from .mapping import LayerMap, Mapping
from .analog import WeightSource
from .network import Factors, accumulate, accumulate_rows
from .array_response import ResponseFollowing
from .programs import INIT, PROBE, REFRESH, UPDATE, ProgramRecord
from .response import ResponseEstimator, ResponseLaw



@dataclass
class Counters:
    """What the run did to and read from the chip."""

    programs_applied: int = 0
    set_pulses: int = 0
    reset_pulses: int = 0
    refreshes: int = 0
    read_calls: int = 0
    devices_read: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def open_loop_counts(dg_us: np.ndarray, mean_response_us: np.ndarray, cap: int) -> np.ndarray:
    """SET pulses from RESET whose mean response lands nearest dg_us above the RESET level (uS), at most cap."""
    gain = mean_response_us[:cap + 1] - mean_response_us[0]
    # gain rises with the pulse count: the nearest level is one of the two around the insertion point
    k = np.clip(np.searchsorted(gain, dg_us), 1, gain.size - 1)
    lower_nearer = np.abs(dg_us - gain[k - 1]) <= np.abs(gain[k] - dg_us)
    return np.where(lower_nearer, k - 1, k).astype(np.int64)


@functools.lru_cache(maxsize=64)
def pulse_threshold(eps: float) -> float:
    """The least x >= 0 with fl(x * (1.0 / eps)) >= 1.0: |chi| >= it exactly when one SET pulse is due.

    Rounded multiplication by a positive constant never decreases as x grows, so the weights with
    fl(|chi| * (1 / eps)) >= 1 are exactly those with |chi| >= this threshold: the scan compares
    against it instead of scaling every touched chi first.
    """
    inv = 1.0 / eps
    x = eps
    while x > 0.0 and x * inv >= 1.0:
        x = math.nextafter(x, 0.0)
    while x * inv < 1.0:
        x = math.nextafter(x, math.inf)
    return x


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique(x) for a 1-D array, without its fixed cost (tens of us, and a lazy import on first use)."""
    s = np.sort(x)
    keep = np.empty(s.size, np.bool_)
    keep[:1] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


@dataclass
class PlannedPulses:
    """An update program's weights as plan_update made it (every layer at once): what settle and the read-back
    need. Weight indices are into the flat buffers behind chi, w and net_pulses (ArrayWeights._layout)."""

    widx: np.ndarray            # flat weight indices pulsed, program order
    signed: np.ndarray          # int64 SET pulses, + on G+, - on G-
    plus: np.ndarray            # the weights' G+ addresses ((copies, weights) with several devices per polarity)
    minus: np.ndarray           # the weights' G- addresses, likewise
    eps: float | np.ndarray     # each weight's eps (one float when one layer pulses)
    beta: float | np.ndarray    # each weight's beta, likewise


#: Each layer's part of the flat weight buffers starts on a 4 KiB boundary (a multiple of 512 float64), where a
#: separately allocated array would start too.
_LAYER_ALIGN = 512


def _layout(shapes: list[tuple[int, int]]) -> tuple[list[int], int]:
    """Offsets of each layer's weights in one flat buffer, and the buffer's length."""
    offsets, n = [], 0
    for r, c in shapes:
        offsets.append(n)
        n += -(-(r * c) // _LAYER_ALIGN) * _LAYER_ALIGN
    return offsets, n


class ArrayWeights(ResponseFollowing):
    """The network's weights on one array: host copy, chi, update and refresh programs (the measured response's
    probe and eps = "auto": hil/array_response.py).

    driver is the (possibly logged) driver; reading(reason) names the reason of reads for the log.
    on_program is called with each ProgramRecord right before it is sent (the journal hooks in here).
    """

    def __init__(self, driver: ArrayDriver, mapping: Mapping, eps: list[float], lr: float, max_pulses: int,
                 shapes: PulseShapes, mean_response_us: np.ndarray, read_policy: ReadPolicyConfig,
                 refresh: RefreshConfig, reading: Callable[[str], contextlib.AbstractContextManager] | None = None,
                 on_program: Callable[[ProgramRecord], None] | None = None, first_program_id: int = 1,
                 response_law: ResponseLaw | None = None) -> None:
        self.driver = driver
        self.mapping = mapping
        self.eps = [float(e) for e in eps]
        self.lr = float(lr)
        self.max_pulses = min(int(max_pulses), driver.limits.max_set_pulses_per_device)
        self.shapes = shapes
        self.mean_response_us = mean_response_us
        self.read_policy = read_policy
        self.refresh_cfg = refresh
        self._reading = reading
        self.on_program = on_program
        self.next_program_id = int(first_program_id)
        # The id the chip reports as its last applied program (PROG:LAST?) once everything booked so far
        # landed: checked against the tester at resume. Programs handed to the driver, landed or not.
        self.last_applied_id = int(first_program_id) - 1
        self.programs_sent = 0
        self.g = np.zeros(mapping.geometry.n_devices, np.float64)
        # Every layer's w, chi and net pulses are views into one flat buffer each, so a step's program (weights of
        # several layers) is settled and read back with one set of numpy calls. The views are what callers see;
        # they are written in place, never rebound.
        shapes = [lm.shape for lm in mapping.layers]
        self._offsets, size = _layout(shapes)

        def flat(dtype: type) -> tuple[np.ndarray, list[np.ndarray]]:
            buf = np.zeros(size, dtype)
            return buf, [buf[o:o + r * c].reshape(r, c) for o, (r, c) in zip(self._offsets, shapes, strict=True)]

        self._w_flat, self.w = flat(np.float64)
        self._chi_flat, self.chi = flat(np.float64)
        # Net SET pulses of update programs per weight (G+ minus G-): chi's ledger, checked by the tests.
        self._net_flat, self.net_pulses = flat(np.int64)
        # Each weight's G+ and G- addresses in the same flat order, (copies, flat) with mapping.copies devices per
        # polarity, the most of any layer: a layer with fewer repeats its last copy there (the lowest-G choice
        # then still picks one of its own devices). The mapping never changes.
        self.copies = mapping.copies
        self._plus_cp = np.zeros((self.copies, size), np.int64)
        self._minus_cp = np.zeros((self.copies, size), np.int64)
        for lm, off in zip(mapping.layers, self._offsets, strict=True):
            n = lm.shape[0] * lm.shape[1]
            rep = np.minimum(np.arange(self.copies), lm.copies - 1)
            self._plus_cp[:, off:off + n] = lm.plus_copies[rep]
            self._minus_cp[:, off:off + n] = lm.minus_copies[rep]
        # (the read-back of a step's program sums the planned copies only when no layer repeats one)
        self._planned_sums = mapping.uniform_copies
        self._plus_flat, self._minus_flat = self._plus_cp[0], self._minus_cp[0]
        self.counters = Counters()
        self.step = 0
        # Audit (tests): the float64 sum of every update ever accumulated; chi + eps * net_pulses must equal it.
        self.total_update: list[np.ndarray] | None = None
        # Devices read since the last refresh check: only they can have crossed the threshold.
        self._dirty: list[np.ndarray] = []
        self._dirty_all = True
        # The last update program plan_update made, with its per-layer parts: settle and the read-back use
        # them instead of mapping the program's addresses back to weights (a program from elsewhere, such as
        # the journal on resume, is not this object and takes the reverse mapping).
        self._planned: tuple[PulseProgram, PlannedPulses] | None = None
        # SET pulses each device had since its last RESET, as the host sent them (a function of the programs
        # alone, so the journal's roll-forward keeps it exact): the pulse-count axis of the response estimates.
        self.since_reset = np.zeros(mapping.geometry.n_devices, np.int32)
        law = response_law if response_law is not None else ResponseLaw.from_params(PCMParams())
        self.response = ResponseEstimator(mapping.layer_of, len(mapping.layers), law,
                                          driver.limits.max_set_pulses_per_device)
        # eps = "auto": what the probe measured and the eps it started from (adopt_probe), else None.
        self.auto: dict | None = None
        # Audit with an eps that moved: total = chi + eps * net + eps_offset (see set_eps).
        self.eps_offset: list[np.ndarray] | None = None

    # ------------------------------------------------------------------ reads
    def _reason(self, reason: str) -> contextlib.AbstractContextManager:
        return self._reading(reason) if self._reading is not None else contextlib.nullcontext()

    def read(self, addresses: np.ndarray | None, reason: str) -> ReadResult:
        """Read addresses (None: every mapped device) and bring the host copy and weights up to date."""
        addr = self.mapping.addresses if addresses is None else addresses
        with self._reason(reason):
            r = self._averaged(self.driver.read(addr))
        return self._took_read(r, addresses)

    def _averaged(self, first: ReadResult) -> ReadResult:
        """first and read_policy.average - 1 more reads of its addresses, averaged (float64, uS); t_s the last's."""
        k = self.read_policy.average
        if k == 1:
            return first
        acc = first.conductances_us.astype(np.float64)
        t = first.t_s
        for _ in range(k - 1):
            r = self.driver.read(first.addresses)
            acc += r.conductances_us
            t = r.t_s
            self.counters.read_calls += 1
            self.counters.devices_read += int(r.addresses.size)
        acc /= k
        return ReadResult(first.addresses, acc, t)

    def _took_read(self, r: ReadResult, addresses: np.ndarray | None) -> ReadResult:
        """Book a read of addresses (None: every mapped device): counters, host copy of G, weights."""
        self.counters.read_calls += 1
        self.counters.devices_read += int(r.addresses.size)
        self.g[r.addresses] = r.conductances_us
        if addresses is None:
            self._dirty_all = True
        else:
            self._dirty.append(r.addresses)
        if addresses is None:
            self.weights_from_g()
        elif self._planned_sums and self._planned is not None and addresses is self._planned[0].addresses:
            self._refresh_planned_weights(self._planned[1])
        else:
            self._refresh_weights(r.addresses)
        return r

    def weights_from_g(self, addresses: np.ndarray | None = None) -> None:
        """The weights from the host copy of G: w = beta * (G+ - G-) (summed over the copies of each polarity);
        addresses: only those devices' weights (the same values: every weight always is its devices' sum)."""
        if addresses is not None and addresses.size < self.mapping.addresses.size:
            self._refresh_weights(addresses)
            return
        for lm, w in zip(self.mapping.layers, self.w, strict=True):
            # (a sum over one copy is that copy's value, bit for bit)
            np.subtract(self.g[lm.plus_copies].sum(axis=0), self.g[lm.minus_copies].sum(axis=0), out=w.reshape(-1))
            w *= lm.beta

    def _refresh_planned_weights(self, planned: PlannedPulses) -> None:
        g = self.g
        if planned.plus.ndim == 1:
            d = g[planned.plus]
            d -= g[planned.minus]
        else:  # the same sums over the copies as weights_from_g's
            d = g[planned.plus].sum(axis=0)
            d -= g[planned.minus].sum(axis=0)
        self._w_flat[planned.widx] = planned.beta * d

    def _refresh_weights(self, addresses: np.ndarray) -> None:
        m = self.mapping
        layer = m.layer_of[addresses]
        for lm, w in zip(m.layers, self.w, strict=True):
            widx = m.weight_of[addresses[layer == lm.index]]
            if not widx.size:
                continue
            if lm.copies > 1:
                widx = _sorted_unique(widx)  # several copies of one weight may have been read
            gp = self.g[lm.plus_copies[:, widx]].sum(axis=0)
            w.flat[widx] = lm.beta * (gp - self.g[lm.minus_copies[:, widx]].sum(axis=0))

    # ------------------------------------------------------------------ programs
    def _new_program(self, addresses: np.ndarray, counts: np.ndarray, reset: np.ndarray) -> PulseProgram:
        p = PulseProgram(self.next_program_id, addresses, counts, reset, self.shapes)
        self.next_program_id += 1
        return p

    def send(self, rec: ProgramRecord, read_reason: str | None = "after-program") -> None:
        """Journal (on_program), apply, account, and read back the programmed devices per the read policy.

        The read-back also feeds the response estimates: G before (host copy) and after, per device.
        """
        if self.on_program is not None:
            self.on_program(rec)
        self.programs_sent += 1
        p = rec.program
        if read_reason is None or not self.read_policy.after_program:
            self.driver.apply(p)
            self.account(rec)
            return
        # before account() moves since_reset and the read moves g
        g0, k = self.g[p.addresses], self.since_reset[p.addresses]
        # One operation (one round trip on a tester with PROG:APPL:READ?), booked as apply, account, read were.
        with self._reason(read_reason):
            r = self._averaged(self.driver.apply_and_read(p))
        self.account(rec, k)
        self._took_read(r, p.addresses)
        if p.reset_pulses == 0:
            if rec.kind != PROBE:
                self.response.add_increments(p.addresses, p.set_counts, k, g0, r.conductances_us)
        else:
            self._sample_from_reset(p, r.conductances_us)

    def _sample_from_reset(self, p: PulseProgram, g_us: np.ndarray) -> None:
        """A program with RESETs, read back: its RESET devices sample the from-RESET table (the host's programs
        RESET all of a program's devices or none; a mixed one's other devices are left out)."""
        rs = p.reset
        self.response.add_from_reset(p.set_counts[rs], g_us[rs])

    def account(self, rec: ProgramRecord, since_reset: np.ndarray | None = None) -> None:
        """Book an applied program: counters, and for an update program chi -= sign * n * eps.

        since_reset: the program's devices' since_reset values as they were before it (send has them), if known.
        """
        p = rec.program
        self.last_applied_id = p.program_id
        self.counters.programs_applied += 1
        self.counters.set_pulses += p.set_pulses
        self.counters.reset_pulses += p.reset_pulses
        before = self.since_reset[p.addresses] if since_reset is None else since_reset
        if p.reset_pulses:
            self.since_reset[p.addresses] = np.where(p.reset, 0, before) + p.set_counts
        else:
            self.since_reset[p.addresses] = before + p.set_counts
        if rec.kind == UPDATE:
            self.settle(p)
        elif rec.kind == REFRESH:
            # A refresh RESETs every device of each weight (a verify top-up RESETs none): booked per program, so
            # a resume's roll-forward counts the refreshes of its window as the live run did.
            if p.reset_pulses:  # (a refresh program is one layer's: its first device says which)
                copies = self.mapping.layers[int(self.mapping.layer_of[p.addresses[0]])].copies
                self.counters.refreshes += p.reset_pulses // (2 * copies)

    def settle(self, program: PulseProgram) -> None:
        """chi -= sign * n * eps for each weight an update program pulsed (G+: sign +1, G-: sign -1)."""
        if self._planned is not None and program is self._planned[0]:
            planned = self._planned[1]
            self._chi_flat[planned.widx] -= planned.signed * planned.eps
            self._net_flat[planned.widx] += planned.signed
            return
        m = self.mapping
        layer = m.layer_of[program.addresses]
        for lm, chi, net, eps in zip(m.layers, self.chi, self.net_pulses, self.eps, strict=True):
            sel = layer == lm.index
            if not sel.any():
                continue
            widx = m.weight_of[program.addresses[sel]]
            signed = m.sign_of[program.addresses[sel]].astype(np.int64) * program.set_counts[sel]
            chi.flat[widx] -= signed * eps
            net.flat[widx] += signed

    def accumulate(self, factors: Factors) -> list[tuple[np.ndarray, np.ndarray]]:
        """chi += -lr * A^T D per layer; returns per layer the touched rows and their new chi values."""
        if self.total_update is not None:
            for tot, (a, d) in zip(self.total_update, factors, strict=True):
                accumulate(tot, a, d, self.lr)
        return [accumulate_rows(chi, a, d, self.lr) for chi, (a, d) in zip(self.chi, factors, strict=True)]

    def plan_update(self, touched: list[tuple[np.ndarray, np.ndarray]]) -> PulseProgram | None:
        """The step's one program: n = min(floor(|chi| / eps), cap) SET pulses to G+ (chi > 0) or G- (chi < 0).

        n is floor(fl(|chi| * (1.0 / eps))); only the weights with |chi| >= pulse_threshold(eps) get n >= 1.
        touched is accumulate()'s result, and is used up: its chi copies are overwritten with |chi|.
        """
        widx_parts, count_parts, layers = [], [], []
        for lm, eps, off, (rows, sub) in zip(self.mapping.layers, self.eps, self._offsets, touched, strict=True):
            if rows.size == 0:
                continue
            q = np.abs(sub, out=sub).ravel()  # in place: the copy is still in cache, a new array would not be
            hit = (q >= pulse_threshold(eps)).nonzero()[0]  # a flat bool scan: the few weights that pulse
            if hit.size == 0:
                continue
            counts = q[hit]
            counts *= 1.0 / eps
            if rows.size == lm.shape[0]:
                # every row touched (rows is 0 .. n-1): the flat positions are the weight indices
                if off:
                    hit += off
                widx = hit
            else:
                ncols = sub.shape[1]
                r, c = np.divmod(hit, ncols)
                widx = rows[r]
                widx *= ncols
                widx += c
                if off:
                    widx += off
            widx_parts.append(widx)
            count_parts.append(counts)
            layers.append(lm.index)
        if not layers:
            return None
        if len(layers) == 1:
            widx, counts = widx_parts[0], count_parts[0]
            eps_w: float | np.ndarray = self.eps[layers[0]]
            beta_w: float | np.ndarray = self.mapping.layers[layers[0]].beta
        else:
            widx, counts = np.concatenate(widx_parts), np.concatenate(count_parts)
            sizes = [w.size for w in widx_parts]
            eps_w = np.repeat([self.eps[i] for i in layers], sizes)
            beta_w = np.repeat([self.mapping.layers[i].beta for i in layers], sizes)
        np.floor(counts, out=counts)
        np.minimum(counts, self.max_pulses, out=counts)
        counts = counts.astype(np.int64)
        pos = self._chi_flat[widx] > 0
        if self.copies == 1:
            plus, minus = self._plus_flat[widx], self._minus_flat[widx]
            addr = np.where(pos, plus, minus)
        else:
            # the polarity's device of lowest conductance (host copy) takes the pulses: the copies share the
            # weight's SETs and the one with the most headroom goes first (ties: the first copy)
            plus, minus = self._plus_cp[:, widx], self._minus_cp[:, widx]
            cand = np.where(pos, plus, minus)
            addr = cand[np.argmin(self.g[cand], axis=0), np.arange(widx.size)]
        reset = np.zeros(addr.size, np.bool_)
        # Fresh arrays nothing else writes: read-only already, PulseProgram keeps them instead of copying.
        addr.flags.writeable = counts.flags.writeable = reset.flags.writeable = False
        prog = self._new_program(addr, counts, reset)
        self._planned = (prog, PlannedPulses(widx, np.where(pos, counts, -counts), plus, minus, eps_w, beta_w))
        return prog

    # ------------------------------------------------------------------ initial programming and refresh
    def program_pairs(self, layer: int, widx: np.ndarray, target_w: np.ndarray) -> PulseProgram:
        """RESET every device of the weights and SET the weight's magnitude onto its polarity's devices (shared
        equally among the copies), open loop."""
        lm = self.mapping.layers[layer]
        plus, minus = lm.plus_copies[:, widx].ravel(), lm.minus_copies[:, widx].ravel()
        pos = target_w > 0
        dg = np.abs(target_w) / (lm.beta * lm.copies)
        counts = open_loop_counts(dg, self.mean_response_us, self.driver.limits.max_set_pulses_per_device)
        if lm.copies > 1:
            pos, counts = np.tile(pos, lm.copies), np.tile(counts, lm.copies)
        addr = np.concatenate([plus, minus])
        cnt = np.concatenate([np.where(pos, counts, 0), np.where(pos, 0, counts)])
        return self._new_program(addr, cnt, np.ones(addr.size, np.bool_))

    def initialize(self, weights: list[np.ndarray]) -> None:
        """Program the initial weights (RESET every mapped device, open-loop SET) in one program (several where the
        limits' max_devices_per_program asks for it), then read all."""
        parts = [self.program_pairs(lm.index, np.arange(w.size), w.ravel()) for lm, w in zip(self.mapping.layers, weights, strict=True)]
        # One program for all layers: merge the per-layer ones under the first id.
        self.next_program_id = parts[0].program_id
        addr = np.concatenate([p.addresses for p in parts])
        counts = np.concatenate([p.set_counts for p in parts])
        reset = np.concatenate([p.reset for p in parts])
        most = self.driver.limits.max_devices_per_program
        for lo in range(0, addr.size, most):
            part = slice(lo, lo + most)
            self.send(ProgramRecord(INIT, self._new_program(addr[part], counts[part], reset[part])), read_reason=None)
        self.read(None, "initial")
        self.response.add_from_reset(counts, self.g[addr])

    def pairs_to_refresh(self) -> list[np.ndarray]:
        """Per layer, the weight indices whose G+ or G- (host copy) exceeds the refresh threshold."""
        thr = self.refresh_cfg.threshold_us
        m = self.mapping
        if self._dirty_all:
            cand = m.addresses
        elif self._dirty:
            cand = np.concatenate(self._dirty)
        else:
            cand = np.zeros(0, np.int64)
        self._dirty, self._dirty_all = [], False
        over = cand[self.g[cand] > thr]
        over = over[m.layer_of[over] >= 0]
        layer = m.layer_of[over]
        return [_sorted_unique(m.weight_of[over[layer == lm.index]]) for lm in m.layers]

    def refresh(self) -> int:
        """Refresh every pair past the threshold; returns how many pairs were refreshed."""
        todo = self.pairs_to_refresh()
        n_pairs = sum(int(t.size) for t in todo)
        if n_pairs == 0:
            return 0
        verify = self.refresh_cfg.mode == "verify"
        # a program addresses every device of its weights: at most max_devices_per_program of them
        for lm, todo_l in zip(self.mapping.layers, todo, strict=True):
            most = max(1, self.driver.limits.max_devices_per_program // (2 * lm.copies))
            for lo in range(0, todo_l.size, most):
                widx = todo_l[lo:lo + most]
                # A weight past the threshold itself is reprogrammed just below it, or it would refresh forever.
                cap = 0.9 * self.refresh_cfg.threshold_us * lm.beta * lm.copies
                target = np.clip(self.w[lm.index].flat[widx], -cap, cap)
                prog = self.program_pairs(lm.index, widx, target)
                self.send(ProgramRecord(REFRESH, prog), read_reason="refresh-verify" if verify else "after-program")
                if verify:
                    self._verify(lm.index, widx, target)
        return n_pairs

    def _verify(self, layer: int, widx: np.ndarray, target_w: np.ndarray) -> None:
        """Top up devices that fell short of their target with extra SET pulses, for a bounded number of rounds."""
        lm = self.mapping.layers[layer]
        gran = max(float(np.mean(np.diff(self.mean_response_us[:21]))), 1e-6)
        pos = target_w > 0
        if lm.copies > 1:
            self._verify_copies(lm, widx, target_w, gran)
            return
        dev = np.where(pos, lm.plus.flat[widx], lm.minus.flat[widx])
        other = np.where(pos, lm.minus.flat[widx], lm.plus.flat[widx])
        goal = self.g[other] + np.abs(target_w) / lm.beta
        for _ in range(self.refresh_cfg.verify_rounds - 1):
            short = goal - self.g[dev]
            need = short > self.refresh_cfg.verify_tolerance_us
            if not need.any():
                return
            cnt = np.clip(np.round(short[need] / gran), 1, self.max_pulses).astype(np.int64)
            prog = self._new_program(dev[need], cnt, np.zeros(int(need.sum()), np.bool_))
            self.send(ProgramRecord(REFRESH, prog), read_reason="refresh-verify")

    def _verify_copies(self, lm: LayerMap, widx: np.ndarray, target_w: np.ndarray, gran: float) -> None:
        """_verify with several devices per polarity: each round, a weight short of its target by more than the
        tolerance (summed over its polarity's copies, uS) gets the shortfall on its polarity's lowest copy."""
        pos = target_w > 0
        cand = np.where(pos, lm.plus_copies[:, widx], lm.minus_copies[:, widx])
        w = self.w[lm.index]
        for _ in range(self.refresh_cfg.verify_rounds - 1):
            short = (np.abs(target_w) - np.where(pos, 1.0, -1.0) * w.flat[widx]) / lm.beta
            need = short > self.refresh_cfg.verify_tolerance_us
            if not need.any():
                return
            c = cand[:, need]
            dev = c[np.argmin(self.g[c], axis=0), np.arange(c.shape[1])]
            cnt = np.clip(np.round(short[need] / gran), 1, self.max_pulses).astype(np.int64)
            prog = self._new_program(dev, cnt, np.zeros(dev.size, np.bool_))
            self.send(ProgramRecord(REFRESH, prog), read_reason="refresh-verify")


class ArrayProducts(WeightSource):
    """Products from the chip's analog multiply (capability MVM): W = beta * (G+ - G-), inputs as volts; with
    several devices per polarity, the sums of their blocks' products."""

    def __init__(self, driver: ArrayDriver, plus: tuple[Block, ...], minus: tuple[Block, ...], beta: float) -> None:
        self.driver, self.plus, self.minus, self.beta = driver, tuple(plus), tuple(minus), beta

    def product(self, a: np.ndarray) -> np.ndarray:
        return self.beta * (_block_sum(self.driver.mvm, self.plus, a) - _block_sum(self.driver.mvm, self.minus, a))

    def product_t(self, d: np.ndarray) -> np.ndarray:
        mvm_t = self.driver.mvm_t
        return self.beta * (_block_sum(mvm_t, self.plus, d) - _block_sum(mvm_t, self.minus, d))


def _block_sum(mvm: Callable[[Block, np.ndarray], np.ndarray], blocks: tuple[Block, ...], x: np.ndarray) -> np.ndarray:
    out = mvm(blocks[0], x)
    for b in blocks[1:]:
        out = out + mvm(b, x)
    return out
