"""Several devices per polarity (mapping.devices_per_polarity, a multi-memristive synapse) and averaged reads
(read_policy.average): the mapping, the update's choice of device, the accounting, the log and its readers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from drivers import Geometry, MockDriver
from drivers.runlog import RunLogReader
from hil.array import UPDATE, ArrayWeights, ProgramRecord
from hil.config import RunConfig
from hil.mapping import Mapping, MappingError
from hil.run import chip_model, start_run
from analysis.runs import load_run

ROOT = Path(__file__).resolve().parent.parent


def test_copies_take_their_own_devices_and_map_back_to_their_weight() -> None:
    m = Mapping.build_layers([(4, 3), (3, 2)], [0.1, 0.2], Mapping.geometry_for([(4, 3), (3, 2)], copies=3),
                             copies=3)
    assert m.geometry == Geometry(5, 2 * 3 * 3 + 2 * 3 * 2) and m.copies == 3
    l0, l1 = m.layers
    assert l0.plus.shape == l0.minus.shape == (3, 5, 3) and l1.plus_copies.shape == (3, 4 * 2)
    every = np.concatenate([a.ravel() for lm in m.layers for a in (lm.plus, lm.minus)])
    assert np.unique(every).size == every.size == m.addresses.size == 5 * 18 + 4 * 12
    for k in range(3):
        a = int(l1.minus[k, 2, 1])
        assert m.layer_of[a] == 1 and m.sign_of[a] == -1 and m.weight_of[a] == 2 * 2 + 1
    assert [b.col0 for b in l0.plus_blocks + l0.minus_blocks] == [0, 3, 6, 9, 12, 15]
    t = m.table()
    assert t.shape == (5 * 3 + 4 * 2, 3 + 6)
    assert m.table_columns().split(", ")[3:] == [f"gplus{k}_address" for k in range(3)] + \
        [f"gminus{k}_address" for k in range(3)]
    with pytest.raises(MappingError, match=r"needs a 5 x 30 array"):
        Mapping.build_layers([(4, 3), (3, 2)], [0.1, 0.2], Geometry(5, 20), copies=3)


def _weights(copies: int, seed: int = 0) -> ArrayWeights:
    cfg = RunConfig().with_overrides(**{"mapping.devices_per_polarity": copies})
    shapes = [(20, 10)]
    m = Mapping.build_layers(shapes, [0.05 / copies], Mapping.geometry_for(shapes, copies=copies), copies=copies)
    model = chip_model(cfg)
    drv = MockDriver(m.geometry.rows, m.geometry.cols, params=model.params, seed=seed)
    return ArrayWeights(drv, m, [0.05 / copies * model.granularity_us], 0.1, 8, cfg.driver.shapes,
                        model.mean_response_us, cfg.read_policy, cfg.refresh)


def _update(prog: object) -> ProgramRecord:
    return ProgramRecord(UPDATE, prog)


def test_each_update_pulse_goes_to_the_polarity_copy_of_lowest_conductance() -> None:
    aw = _weights(3)
    rng = np.random.default_rng(1)
    aw.initialize([rng.uniform(-0.2, 0.2, (21, 10))])
    lm = aw.mapping.layers[0]
    sent = 0
    for _ in range(20):
        a = np.zeros((1, 21))
        a[0, rng.choice(21, 6, replace=False)] = 1.0
        prog = aw.plan_update(aw.accumulate([(a, rng.normal(0, 0.3, (1, 10)))]))
        if prog is None:
            continue
        g_before = aw.g.copy()
        for addr in prog.addresses:
            j, sign = aw.mapping.weight_of[addr], aw.mapping.sign_of[addr]
            copies = (lm.plus_copies if sign > 0 else lm.minus_copies)[:, j]
            assert addr == copies[np.argmin(g_before[copies])]
        aw.send(_update(prog))
        sent += prog.addresses.size
        # the host weights are the copies' sums, as read back
        np.testing.assert_array_equal(aw.w[0], lm.beta * (aw.g[lm.plus].sum(0) - aw.g[lm.minus].sum(0)))
    assert sent > 50


def test_write_noise_per_unit_of_weight_falls_with_the_copies() -> None:
    """The same weight change made of SET pulses over N devices of beta / N: its spread falls ~ 1 / sqrt(N)."""
    spread = {}
    for copies in (1, 4):
        aw = _weights(copies, seed=7)
        aw.initialize([np.zeros((21, 10))])
        w0 = aw.w[0].copy()
        for _ in range(100):  # every weight asked up by 0.002 per step, 0.2 in all
            prog = aw.plan_update(aw.accumulate([(np.ones((1, 21)), np.full((1, 10), -0.002 / aw.lr))]))
            if prog is not None:
                aw.send(_update(prog))
        dw = aw.w[0] - w0
        spread[copies] = float(np.std(dw) / np.mean(dw))
    assert spread[4] < 0.7 * spread[1], spread


def _digits(**over: object) -> RunConfig:
    base = {"data.name": "digits", "network.hidden": [12], "update.epochs": 1, "data.train_limit": 300,
            "data.test_limit": 100, "update.lr": 0.1, "refresh.threshold_us": 6.0, "refresh.check_every_steps": 10,
            "checkpoint.audit": True, "driver.seed": 2}
    base.update(over)
    return RunConfig().with_overrides(**base)


def test_a_run_with_copies_and_averaged_reads_is_accounted_and_logged(tmp_path: Path) -> None:
    cfg = _digits(**{"mapping.devices_per_polarity": 2, "read_policy.average": 3, "refresh.mode": "verify"})
    s = start_run(cfg, tmp_path / "run")
    assert s["refreshes"] > 0 and s["set_pulses"] > 0
    with np.load(tmp_path / "run" / "checkpoint.npz") as z:
        arrays = {k: z[k] for k in z.files}
    with RunLogReader(tmp_path / "run" / "run.h5") as r:
        eps = json.loads(r.attrs["eps_per_layer_json"])
        progs = [p for _, _, p in r.programs()]
        ev = r.read_events()
        plus = [r.array(f"mapping/layer{i}_gplus") for i in range(2)]
        assert r.array("mapping/table").shape[1] == 3 + 4
    for i in range(2):
        np.testing.assert_allclose(arrays[f"chi{i}"] + eps[i] * arrays[f"net{i}"], arrays[f"total{i}"], atol=1e-9)
    assert plus[0].shape == (2, 65, 12)
    # every refresh RESETs all four devices of a weight; the initial programming RESET each mapped device once
    resets = sum(int(p.reset.sum()) for p in progs)
    n_mapped = sum(2 * a.size for a in plus)
    assert s["reset_pulses"] == resets and s["refreshes"] == (resets - n_mapped) // 4
    # every read of the host copy is three reads of the same devices, each logged
    assert s["read_calls"] == ev["seq"].size and s["read_calls"] % 3 == 0
    assert s["devices_read"] == int(ev["count"].sum())
    # the refreshes were verified: top-up programs (SETs only) read back as "refresh-verify"
    assert "refresh-verify" in set(ev["reason"])
    # the report's weights (analysis/runs.py: the copies' sums) agree with the mapping table's own columns
    run = load_run(tmp_path / "run")
    g = arrays["g"]
    with RunLogReader(tmp_path / "run" / "run.h5") as r:
        table = r.array("mapping/table").astype(np.int64)
    for lm in run.layers:
        t = table[table[:, 0] == lm.index]
        want = np.zeros(lm.plus.shape[1:])
        want[t[:, 1], t[:, 2]] = lm.beta * (g[t[:, 3]] + g[t[:, 4]] - g[t[:, 5]] - g[t[:, 6]])
        np.testing.assert_allclose(lm.weights(g), want, rtol=0, atol=1e-12)
    # the export names every copy's role and weight: the reads table of the initial full read
    import pandas as pd

    from analysis.export import export_run

    reads = pd.read_csv(export_run(tmp_path / "run", "reads", "csv", tmp_path / "reads.csv").path)
    first = reads[reads["reason"] == "initial"].drop_duplicates("address")
    assert len(first) == n_mapped and set(first["role"]) == {"G+", "G-"}
    t = table[table[:, 0] == 0]
    for col, role in ((3, "G+"), (4, "G+"), (5, "G-"), (6, "G-")):
        row = first.set_index("address").loc[t[7, col]]
        assert (row["layer"], row["weight_row"], row["weight_col"], row["role"]) == (0, t[7, 1], t[7, 2], role)


def test_the_host_copy_is_the_mean_of_the_averaged_reads(tmp_path: Path) -> None:
    cfg = _digits(**{"read_policy.average": 4, "update.epochs": 1, "data.train_limit": 40})
    start_run(cfg, tmp_path / "run")
    with RunLogReader(tmp_path / "run" / "run.h5") as r:
        ev = r.read_events()
        addr, g = r.read_devices(0, int(ev["start"][-1] + ev["count"][-1]))
    with np.load(tmp_path / "run" / "checkpoint.npz") as z:
        host = z["g"]
    # the last four read calls are the final evaluation's full read, averaged into the host copy
    last = [slice(int(s), int(s + c)) for s, c in zip(ev["start"][-4:], ev["count"][-4:], strict=True)]
    assert all(np.array_equal(addr[last[0]], addr[sl]) for sl in last)
    mean = sum(g[sl].astype(np.float64) for sl in last) / 4
    np.testing.assert_array_equal(host[addr[last[0]]], mean)
    assert set(ev["reason"][-4:]) == {"evaluation"}


@pytest.mark.parametrize("args, message", [
    (["--set", "mapping.devices_per_polarity=17"], "devices_per_polarity"),
    (["--set", "mapping.devices_per_polarity=0"], "devices_per_polarity"),
    (["--set", "read_policy.average=0"], "average"),
])
def test_bad_settings_are_one_line_and_leave_no_folder(args: list[str], message: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "hil.cli", "train", "--out", str(out), "--set", "data.name=digits",
                        *args], cwd=ROOT, capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""})
    said = p.stdout + p.stderr
    assert p.returncode == 2, said
    assert message in said and "Traceback" not in said, said
    assert not out.exists()


def test_programs_larger_than_the_limit_are_split(tmp_path: Path) -> None:
    """The initial programming (every mapped device) and the refreshes stay within max_devices_per_program."""
    cfg = _digits(**{"mapping.devices_per_polarity": 2, "driver.limits.max_devices_per_program": 700})
    s = start_run(cfg, tmp_path / "run")
    with RunLogReader(tmp_path / "run" / "run.h5") as r:
        progs = [p for _, _, p in r.programs()]
        n_mapped = sum(2 * r.array(f"mapping/layer{i}_gplus").size for i in range(2))
    assert max(p.addresses.size for p in progs) <= 700
    init = [p for p in progs if p.reset.all()][: -(-n_mapped // 700)]
    assert sum(p.addresses.size for p in init) == n_mapped and len(init) == -(-n_mapped // 700) > 1
    assert np.unique(np.concatenate([p.addresses for p in init])).size == n_mapped
    assert s["refreshes"] > 0


def test_layers_may_have_their_own_number_of_copies(tmp_path: Path) -> None:
    """mapping.devices_per_polarity per layer (a GAN's discriminator on copies, its generator on one pair)."""
    m = Mapping.build_layers([(4, 3), (3, 2)], [0.1, 0.2], Mapping.geometry_for([(4, 3), (3, 2)], copies=[3, 1]),
                             copies=[3, 1])
    assert m.geometry == Geometry(5, 2 * 3 * 3 + 2 * 2) and m.copies == 3 and not m.uniform_copies
    assert m.layers[0].plus.shape == (3, 5, 3) and m.layers[1].plus.shape == (4, 2)
    t = m.table()
    assert t.shape == (5 * 3 + 4 * 2, 3 + 6) and (t[t[:, 0] == 1][:, [4, 5, 7, 8]] == -1).all()
    assert (t[t[:, 0] == 0] >= 0).all()

    cfg = _digits(**{"mapping.devices_per_polarity": [3, 1], "read_policy.average": 2})
    s = start_run(cfg, tmp_path / "run")
    with np.load(tmp_path / "run" / "checkpoint.npz") as z:
        arrays = {k: z[k] for k in z.files}
    with RunLogReader(tmp_path / "run" / "run.h5") as r:
        eps = json.loads(r.attrs["eps_per_layer_json"])
        beta = json.loads(r.attrs["beta_per_layer_json"])
        progs = [p for _, _, p in r.programs()]
        plus = [r.array(f"mapping/layer{i}_gplus") for i in range(2)]
        minus0 = r.array("mapping/layer0_gminus")
    assert plus[0].shape == (3, 65, 12) and plus[1].shape == (13, 10)
    assert beta == pytest.approx([0.5 / (8.0 * 3), 1.0 / 8.0])  # w_max / (g_range_us x the layer's copies)
    for i in range(2):
        np.testing.assert_allclose(arrays[f"chi{i}"] + eps[i] * arrays[f"net{i}"], arrays[f"total{i}"], atol=1e-9)
    # a refresh RESETs all 2N devices of its layer's weights: the summary's count, layer by layer
    layer0 = set(np.concatenate([plus[0].ravel(), minus0.ravel()]).tolist())
    refreshes = 0
    for p in progs[1:]:
        if p.reset.any():
            refreshes += int(p.reset.sum()) // (6 if int(p.addresses[0]) in layer0 else 2)
    assert s["refreshes"] == refreshes > 0
    # the export skips the table's -1 columns: every mapped device, and only those, has a layer and a role
    import pandas as pd

    from analysis.export import export_run

    reads = pd.read_csv(export_run(tmp_path / "run", "reads", "csv", tmp_path / "reads.csv").path)
    first = reads[reads["reason"] == "initial"].drop_duplicates("address")
    n_mapped = 2 * plus[0].size + 2 * plus[1].size
    assert len(first) == n_mapped and set(first["role"]) == {"G+", "G-"} and (first["layer"] >= 0).all()
