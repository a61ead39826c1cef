"""The chip's measured response on the array's weights: the probe, eps = "auto" and following the read-backs.

A mixin of hil.array.ArrayWeights (its state: eps, the open-loop table mean_response_us, the response
estimates, the audit ledger); see docs/training.md "The chip you have".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .programs import PROBE, ProgramRecord
from .response import extend_table

if TYPE_CHECKING:
    from .array import ArrayWeights

#: eps = "auto" starts from the probe's gain over this many pulses after RESET: on the model chip about 85% of
#: update pulses reach devices at most 2 pulses past a RESET (refresh keeps them there).
PROBE_EARLY_PULSES = 3
#: eps = "auto" moves (at a checkpoint it asks for) once the measured response is this far from the eps in force.
FOLLOW_CHANGE = 0.05


class ResponseFollowing:
    """ArrayWeights' probe and eps = "auto" (hil/response.py measures; this decides)."""

    def probe(self: ArrayWeights, addresses: np.ndarray, pulses: int) -> np.ndarray:
        """RESET addresses, then give them `pulses` single SET pulses, reading them all after the RESET and after
        each pulse (reason "probe"); returns G (uS), shape (pulses + 1, devices). Journaled and logged as programs
        of kind "probe"."""
        n = addresses.size
        out = np.empty((pulses + 1, n))
        none, ones = np.zeros(n, np.int64), np.ones(n, np.int64)
        no_reset = np.zeros(n, np.bool_)
        self.send(ProgramRecord(PROBE, self._new_program(addresses, none, np.ones(n, np.bool_))), read_reason=None)
        out[0] = self.read(addresses, "probe").conductances_us
        for j in range(1, pulses + 1):
            self.send(ProgramRecord(PROBE, self._new_program(addresses, ones, no_reset)), read_reason=None)
            out[j] = self.read(addresses, "probe").conductances_us
        for j in range(pulses + 1):
            self.response.add_from_reset(np.full(n, j), out[j])
        return out

    def adopt_probe(self: ArrayWeights, g_us: np.ndarray) -> None:
        """eps = "auto": start eps and the open-loop table from a probe (probe()'s result, uS).

        eps per layer = the host's eps times the probe's gain over its first PROBE_EARLY_PULSES pulses against
        the gain the host's law expects of them (most update pulses land within a few pulses of a RESET);
        the table is the probe's mean G after RESET + n pulses, extended past the probe by extend_table.
        ValueError if the probed devices did not respond.
        """
        k = g_us.shape[0] - 1
        means = g_us.mean(axis=1)
        early = min(PROBE_EARLY_PULSES, k)
        got = float(means[early] - means[0])
        want = float(self.response.law.mean_response(means[0], 1, early)[-1] - means[0])
        if not (got > 0 and want > 0):
            raise ValueError(f"the probe's devices did not gain conductance with SET pulses (mean G {means[0]:.3g} uS "
                             f"after RESET, {means[-1]:.3g} uS after {k} pulses): check the pulse shapes and the chip")
        cap = self.response.cap
        m = min(k, cap)
        table = np.concatenate([means[:m + 1], extend_table(means, cap - m, self.response.law.g_max_us)])
        table = np.maximum.accumulate(table)  # open_loop_counts needs a rising table
        base = [e / lm.beta for e, lm in zip(self.eps, self.mapping.layers, strict=True)]
        self.auto = {"base_eps_over_beta_us": base, "probe_ratio": got / want, "probe_devices": int(g_us.shape[1]),
                     "probe_pulses": k, "probe_mean_us": means.tolist(), "table_us": table.tolist()}
        self.mean_response_us = table
        self.set_eps([b * lm.beta * got / want for b, lm in zip(base, self.mapping.layers, strict=True)])

    def auto_state(self: ArrayWeights) -> dict:
        """What eps = "auto" rests on: the host's eps / beta per layer, the probe's ratio, means and table."""
        return dict(self.auto or {})

    def set_eps(self: ArrayWeights, eps: list[float]) -> None:
        """Take new eps per layer (weight units). chi keeps what was not sent; the audit ledger absorbs the change."""
        new = [float(e) for e in eps]
        if self.total_update is not None:
            if self.eps_offset is None:
                self.eps_offset = [np.zeros_like(c) for c in self.chi]
            for off, net, old, e in zip(self.eps_offset, self.net_pulses, self.eps, new, strict=True):
                off += (old - e) * net
        self.eps = new

    def proposed_eps(self: ArrayWeights, min_pulses: int) -> list[float]:
        """eps = "auto": eps per layer = the host's eps times the read-backs' measured / expected increments, for
        layers with at least min_pulses SET pulses measured (the others keep theirs)."""
        assert self.auto is not None
        out = []
        for lm, f, e, b in zip(self.mapping.layers, self.response.layer_figures(), self.eps,
                               self.auto["base_eps_over_beta_us"], strict=True):
            ok = f["pulses"] >= min_pulses and math.isfinite(f["ratio"]) and f["ratio"] > 0
            out.append(lm.beta * b * f["ratio"] if ok else e)
        return out

    def eps_should_follow(self: ArrayWeights, min_pulses: int) -> bool:
        """eps = "auto": whether the measured response moved more than FOLLOW_CHANGE from the eps in force."""
        if self.auto is None:
            return False
        return any(abs(p / e - 1.0) > FOLLOW_CHANGE for p, e in zip(self.proposed_eps(min_pulses), self.eps, strict=True))

    def follow_response(self: ArrayWeights, min_pulses: int) -> bool:
        """eps = "auto", at a checkpoint boundary only (docs/checkpoint.md): eps takes proposed_eps(); the open-loop
        table takes the measured mean G after RESET + n pulses where at least min_pulses devices were seen.
        True if eps changed."""
        if self.auto is None:
            return False
        count, mean = self.response.from_reset_means()
        base = np.asarray(self.auto["table_us"])
        self.mean_response_us = np.maximum.accumulate(np.where(count >= min_pulses, mean, base))
        new = self.proposed_eps(min_pulses)
        if new == self.eps:
            return False
        self.set_eps(new)
        return True
