"""The MLP's journal: each update record holds the step's sample indices and the conductances read since the
previous record (not the ~6 KB of layer inputs and output gradients a default MNIST step's factors are), and a
resume recomputes the step from them, bit for bit (docs/checkpoint.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from hil.config import RunConfig
from hil.data import load_digits
from hil.journal import decode_body, encode_record, encode_update_record, read_journal
from hil.resume import load_checkpoint, restore, roll_forward
from hil.run import build_session, chip_model, layer_shapes, make_driver

MLP = {"data.name": "digits", "network.hidden": [16], "logging.enabled": False, "checkpoint.every_steps": 10_000,
       "seed": 4, "read_policy.every_steps": 150, "refresh.check_every_steps": 10, "refresh.threshold_us": 5.0,
       "checkpoint.audit": True}


def _session(cfg: RunConfig, run_dir: Path):
    data = load_digits(cfg.seed)
    model = chip_model(cfg)
    return build_session(cfg, data, run_dir, make_driver(cfg, layer_shapes(cfg, data), model),
                         append_log=False, model=model)


def _train(cfg: RunConfig, run_dir: Path, steps: int, mode: str | None = None):
    live = _session(cfg, run_dir)
    try:
        t = live.trainer
        if mode is not None:
            t.journal_mode = mode
        t.start_journal()
        t.array.initialize(t.w0)
        t.checkpoint()
        t.run(stop_after_steps=steps)
        aw = t.array
        state = [c.copy() for c in aw.chi] + [n.copy() for n in aw.net_pulses] + [aw.g.copy()]
        assert aw.counters.refreshes > 0  # refresh programs (and a periodic full read) inside the window
        t.journal.close()
        meta, arrays = load_checkpoint(run_dir)
        return state, meta, arrays, read_journal(run_dir / meta["journal"]), (run_dir / meta["journal"]).stat().st_size
    finally:
        live.close()


def test_mlp_journal_recomputes_its_steps_and_rolls_chi_forward_exactly(tmp_path: Path) -> None:
    cfg = RunConfig().with_overrides(**MLP)
    state, meta, arrays, records, size = _train(cfg, tmp_path, 300)
    updates = [arr for m, arr in records if m["kind"] == "update"]
    assert len(updates) == 300
    assert all("idx" in arr and "a0" not in arr and "d0" not in arr for arr in updates)
    assert any("g_addr" in arr for arr in updates)  # after refreshes and the periodic full read
    again = _session(cfg, tmp_path)
    try:
        restore(again.trainer, meta, arrays)
        rf = roll_forward(again.trainer, tmp_path / meta["journal"], reapply=True)
        assert rf.records == len(records)
        aw = again.trainer.array
        for x, y in zip(state[:-1], [*aw.chi, *aw.net_pulses], strict=True):
            assert np.array_equal(x, y)
        # the audit ledger: chi + eps * net pulses is the float64 sum of every update, also after the roll-forward
        for chi, net, tot, eps in zip(aw.chi, aw.net_pulses, aw.total_update, aw.eps, strict=True):
            np.testing.assert_allclose(chi + eps * net, tot, rtol=0, atol=1e-9)
    finally:
        again.close()


def test_mlp_journal_is_smaller_than_its_factors(tmp_path: Path) -> None:
    """The same run journaled both ways: the recompute records are a fraction of the factors records (digits,
    64-16-10; a default MNIST step's factors are ~6 KB), and a factors journal still rolls forward exactly."""
    cfg = RunConfig().with_overrides(**MLP)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    state, _, _, _, recompute_size = _train(cfg, tmp_path / "a", 300)
    state_f, meta, arrays, records, factors_size = _train(cfg, tmp_path / "b", 300, mode="factors")
    for x, y in zip(state, state_f, strict=True):  # the journal's form changes nothing of the run
        assert np.array_equal(x, y)
    assert all("a0" in arr for m, arr in records if m["kind"] == "update")
    assert recompute_size < 0.5 * factors_size, (recompute_size, factors_size)
    # (~100 B of it the periodic full read's 2,420 conductances, journaled once)
    assert recompute_size / 300 < 600, recompute_size / 300
    again = _session(cfg, tmp_path / "b")
    try:
        restore(again.trainer, meta, arrays)
        roll_forward(again.trainer, tmp_path / "b" / meta["journal"], reapply=True)
        aw = again.trainer.array
        for x, y in zip(state_f[:-1], [*aw.chi, *aw.net_pulses], strict=True):
            assert np.array_equal(x, y)
    finally:
        again.close()


@given(st.integers(0, 2**62), st.integers(0, 10**6), st.integers(0, 10**9), st.integers(0, 4), st.integers(1, 64),
       st.one_of(st.none(), st.integers(1, 2**62)), st.integers(0, 40), st.booleans(), st.booleans())
def test_update_record_bytes_are_encode_records(step: int, epoch: int, pos: int, correct: int, n: int,
                                                program_id: int | None, k: int, g_addr: bool, reset: bool) -> None:
    """The trainer's per-step record (one format string) is byte for byte encode_record's, and reads back."""
    arrays = {"idx": np.arange(n, dtype=np.int64)}
    if g_addr:
        arrays["g_addr"] = np.arange(k, dtype=np.int32)
    arrays["g_val"] = np.linspace(0.1, 9.0, k)
    if program_id is not None:
        arrays["addresses"] = np.arange(k, dtype=np.int32) * 3
        arrays["set_counts"] = (np.arange(k) % 9).astype(np.uint8)
        if reset:
            arrays["reset"] = np.arange(k) % 2 == 0
    meta = {"step": step, "epoch": epoch, "pos": pos, "kind": "update", "correct": correct, "n": n}
    if program_id is not None:
        meta["program_id"] = program_id
    got = encode_update_record(step, epoch, pos, correct, n, program_id, arrays)
    assert got == encode_record(meta, arrays)
    back_meta, back = decode_body(got[4:-4])
    assert back_meta == meta and all(np.array_equal(back[name], a) for name, a in arrays.items())
