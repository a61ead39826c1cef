"""The update's shortcuts are exact: the pulse threshold picks the same weights as scaling chi by 1/eps,
and settling / reading back through plan_update's own bookkeeping equals the reverse address mapping."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from hil.array import _sorted_unique, pulse_threshold
from hil.config import RunConfig
from hil.data import load_digits
from hil.journal import read_journal
from hil.run import build_session, chip_model, layer_shapes, make_driver
from hil.resume import load_checkpoint, restore, roll_forward


@given(eps=st.floats(1e-9, 1e3), xs=st.lists(st.floats(0.0, 1e4), max_size=20))
def test_pulse_threshold_selects_exactly_where_scaled_chi_reaches_one(eps: float, xs: list[float]) -> None:
    inv = 1.0 / eps
    t = pulse_threshold(eps)
    assert t * inv >= 1.0 and math.nextafter(t, 0.0) * inv < 1.0
    for x in [*xs, t, math.nextafter(t, 0.0), math.nextafter(t, math.inf), eps, math.inf]:
        assert (x >= t) == (x * inv >= 1.0)
    q = np.abs(np.array([*xs, t, -t, math.nextafter(t, 0.0), math.nan]))
    assert np.array_equal(q >= t, q * inv >= 1.0)


def _trained_state(reverse_mapping: bool) -> tuple[list[np.ndarray], ...]:
    cfg = RunConfig().with_overrides(**{"data.name": "digits", "network.hidden": [16], "update.epochs": 1,
                                        "refresh.check_every_steps": 25, "refresh.threshold_us": 6.0, "seed": 2})
    data = load_digits(cfg.seed)
    model = chip_model(cfg)
    s = build_session(cfg, data, None, make_driver(cfg, layer_shapes(cfg, data), model), append_log=False, model=model)
    try:
        aw = s.trainer.array
        assert aw is not None
        if reverse_mapping:
            plan = aw.plan_update

            def plan_and_forget(touched):  # settle and read-back then map the addresses back to weights
                prog = plan(touched)
                aw._planned = None
                return prog

            aw.plan_update = plan_and_forget
        aw.initialize(s.trainer.w0)
        s.trainer.run(stop_after_steps=300)
        assert aw.counters.programs_applied > 50 and aw.counters.refreshes > 0
        return [c.copy() for c in aw.chi], [n.copy() for n in aw.net_pulses], [w.copy() for w in aw.w], [aw.g.copy()]
    finally:
        s.close()


def test_settle_and_read_back_through_the_plan_equal_the_reverse_mapping() -> None:
    planned, mapped = _trained_state(False), _trained_state(True)
    for a, b in zip(planned, mapped, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)


def test_roll_forward_of_journaled_factors_gives_the_live_chi(tmp_path: Path) -> None:
    """Factors records (the MLP's journal before it recomputed its steps, and any run on the chip's analog
    multiply) keep only the nonzero columns of a sparse layer input; rolling them forward is still exact."""
    cfg = RunConfig().with_overrides(**{"data.name": "digits", "network.hidden": [16], "logging.enabled": False,
                                        "checkpoint.every_steps": 10_000, "seed": 4})
    data = load_digits(cfg.seed)
    model = chip_model(cfg)

    def session(run_dir: Path):
        return build_session(cfg, data, run_dir, make_driver(cfg, layer_shapes(cfg, data), model),
                             append_log=False, model=model)

    live = session(tmp_path)
    try:
        t = live.trainer
        t.journal_mode = "factors"
        t.start_journal()
        t.array.initialize(t.w0)
        t.checkpoint()
        t.run(stop_after_steps=400)
        chi, net = [c.copy() for c in t.array.chi], [n.copy() for n in t.array.net_pulses]
        t.journal.close()
        meta, arrays = load_checkpoint(tmp_path)
        records = read_journal(tmp_path / meta["journal"])
    finally:
        live.close()
    sparse = sum("a0_cols" in arr for _, arr in records)
    assert 0 < sparse < 400 and all(arr["a0"].shape[1] == arr["a0_cols"].size for _, arr in records if "a0_cols" in arr)
    again = session(tmp_path)
    try:
        restore(again.trainer, meta, arrays)
        rf = roll_forward(again.trainer, tmp_path / meta["journal"], reapply=True)
        assert rf.records == len(records)
        for x, y in zip([*chi, *net], [*again.trainer.array.chi, *again.trainer.array.net_pulses], strict=True):
            assert np.array_equal(x, y)
    finally:
        again.close()


@given(st.lists(st.integers(-5, 40), max_size=60))
def test_sorted_unique_is_np_unique(xs: list[int]) -> None:
    x = np.array(xs, np.int64)
    got, want = _sorted_unique(x), np.unique(x)
    assert got.dtype == want.dtype and np.array_equal(got, want)
