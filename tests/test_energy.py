"""`pcm-hil energy` (analysis/energy.py): counts against the run log read directly with h5py, the per-sample model
against the table, the ratio's direction, refused tables, a killed run's log, and the json format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from analysis.energy import TRAINING_READS, estimate, load_table

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, columns: int = 80, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hil.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, COLUMNS=str(columns)))


def start(run_dir: Path, **overrides) -> Path:
    from hil.config import RunConfig
    from hil.run import start_run

    cfg = RunConfig().with_overrides(**{"data.name": "digits", "data.train_limit": 300, **overrides})
    start_run(cfg, run_dir, baseline=False)
    return run_dir


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Path:
    """A digits MLP (64-16-10), 2 epochs of 300 samples, on the mock chip: refreshes and updates both happen."""
    return start(tmp_path_factory.mktemp("energy") / "mlp", **{"network.hidden": [16], "update.epochs": 2})


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    """A tiny digits CNN: one 3x3 conv (padding 1, 4 channels, 2x2 pool) and the output layer, 1 epoch of 120."""
    return start(tmp_path_factory.mktemp("energy") / "cnn",
                 **{"network.kind": "cnn", "network.cnn.channels": [4], "network.cnn.kernel": 3,
                    "network.cnn.padding": 1, "network.cnn.fc": [], "update.lr": 0.03, "mapping.w_max": [1.0],
                    "data.train_limit": 120})


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """`pcm-hil train` killed with SIGKILL once its log holds an epoch: no summary.json, the log ends mid-run."""
    from drivers.runlog import RunLogReader

    run_dir = tmp_path_factory.mktemp("energy") / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "hil.cli", "train", "--data", "digits", "--set",
                             "network.hidden=[16]", "--set", "logging.flush_interval_s=0.2", "--epochs", "300",
                             "--train-limit", "100",
                             "--out", str(run_dir)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)

    def epochs() -> int:
        try:
            with RunLogReader(run_dir / "run.h5") as r:
                m = r.metrics()
        except Exception:  # noqa: BLE001 - the log may not exist yet, or be mid-creation
            return 0
        return int(np.isfinite(m["epoch"]).sum()) if "epoch" in m else 0

    deadline = time.monotonic() + 120
    try:
        while epochs() < 1:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no epoch logged after 120 s"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert not (run_dir / "summary.json").exists()
    return run_dir


def log_counts(run_dir: Path) -> dict:
    """What the log says, read with plain h5py and numpy (no project code): programs by class, reads by reason."""
    with h5py.File(run_dir / "run.h5", "r", swmr=True) as f:
        pev = f["programs/events"][:]
        sets = f["programs/set_count"][:].astype(np.int64)
        resets = f["programs/reset"][:].astype(np.int64)
        shapes = f["programs/shapes"][:]
        rev = f["reads/events"][:]
        names = [bytes(n).rstrip(b"\0").decode() for n in f["reads/reason_names"][:]]
        g = f["reads/conductance_us"][:].astype(np.float64)
        table = f["arrays/mapping/table"][:]
    out: dict = {"update": np.zeros(3), "refresh": np.zeros(3), "setup": np.zeros(3), "set_ua_ns": {}}
    refresh_step = -1
    for e in pev:
        s, n = int(e["start"]), int(e["count"])
        ns, nr = int(sets[s:s + n].sum()), int(resets[s:s + n].sum())
        if e["step"] == 0:
            cls = "setup"
        elif nr or e["step"] == refresh_step:
            cls, refresh_step = "refresh", int(e["step"])
        else:
            cls = "update"
        out[cls] += [1, ns, nr]
        sh = shapes[int(e["shapes"])]
        out["set_ua_ns"][cls] = out["set_ua_ns"].get(cls, 0.0) + ns * sh["set_amplitude_ua"] * sh["set_width_ns"]
    reads: dict = {}
    for e in rev:
        s, n = int(e["start"]), int(e["count"])
        r = reads.setdefault(names[int(e["reason"])], [0, 0, 0.0])
        r[0] += 1
        r[1] += n
        r[2] += float(g[s:s + n].sum())
    out["reads"] = reads
    out["shapes"] = [(int(table[table[:, 0] == k, 1].max()), int(table[table[:, 0] == k, 2].max()) + 1)
                     for k in range(int(table[:, 0].max()) + 1)]
    out["steps"] = int(max(pev["step"].max(), rev["step"].max()))
    return out


def test_counts_equal_the_log(mlp):
    from hil.data import load_digits

    est = estimate(mlp)
    c = est.counts
    want = log_counts(mlp)
    summary = json.loads((mlp / "summary.json").read_text())
    for cls in ("update", "refresh", "setup"):
        p = c.programs[cls]
        assert [p.programs, p.set_pulses, p.reset_pulses] == want[cls].tolist(), cls
    assert want["refresh"][0] > 0 and want["update"][0] > 0
    assert sum(c.programs[k].set_pulses for k in c.programs) == summary["set_pulses"]
    assert sum(c.programs[k].reset_pulses for k in c.programs) == summary["reset_pulses"]
    for reason, (calls, devices, g_sum) in want["reads"].items():
        r = c.reads[reason]
        assert (r.calls, r.devices) == (calls, devices), reason
        assert r.g_sum_us == pytest.approx(g_sum, rel=1e-9)
    assert c.training_reads().devices == sum(want["reads"][k][1] for k in TRAINING_READS if k in want["reads"])
    # the layers' shapes from the mapping table: (fan_in, fan_out) with the bias row
    assert [(lc.fan_in, lc.fan_out) for lc in c.layers] == want["shapes"] == [(64, 16), (16, 10)]
    assert [lc.forward_macs for lc in c.layers] == [65 * 16, 17 * 10]
    assert [lc.backward_macs for lc in c.layers] == [0, 16 * 10]
    # 2 epochs of 300 samples: every sample twice, so the nonzero inputs' mean is the training set's (+1: bias)
    assert c.steps == summary["steps"] == 600 and c.samples == 600
    x = load_digits(0).x_train[:300]
    assert c.layers[0].update_inputs == pytest.approx(np.count_nonzero(x, axis=1).mean() + 1, rel=1e-12)
    assert c.layers[1].update_inputs == 17
    # the update's SET pulse energy: cell voltage x the logged amplitude x width, per sample
    t = load_table()
    e = t["set_cell_voltage"].value * want["set_ua_ns"]["update"] * 1e-3 / 600
    assert est.chip_pj["SET pulses (updates)"] == pytest.approx(e, rel=1e-12)
    assert c.measured_us_per_sample == summary["us_per_sample"]
    assert est.not_counted == []


def test_conv_layer_counts_output_positions_and_patch_nonzeros(cnn):
    from hil.data import load_digits

    c = estimate(cnn).counts
    conv, fc = c.layers
    assert (conv.kind, conv.fan_in, conv.fan_out, conv.uses) == ("conv2d", 9, 4, 64)  # 8x8 positions, padding 1
    assert (fc.kind, fc.fan_in, fc.fan_out, fc.uses) == ("linear", 4 * 4 * 4, 10, 1)
    assert conv.forward_macs == 64 * 10 * 4 and conv.forward_adc == 64 * 4 and conv.backward_macs == 0
    # each patch's nonzero inputs, from torch's unfold of the images (what hil/analog.py multiplies), + 1 bias
    x = torch.from_numpy(load_digits(0).x_train[:120].reshape(-1, 1, 8, 8))
    patches = F.unfold(x, 3, padding=1)  # (n, 9, 64)
    per_image = (patches != 0).sum(dim=(1, 2)).double() + 64
    assert c.samples == 120
    assert conv.update_inputs == pytest.approx(float(per_image.mean()), rel=1e-12)
    # chi is read and written once per step per touched weight: the patches' products are summed first
    assert conv.update_macs == pytest.approx(conv.update_inputs * 4) and conv.update_words == 10 * 4
    assert fc.update_words == fc.update_macs == fc.update_inputs * 10


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_ratio_moves_the_right_way(mlp, tmp_path):
    base = estimate(mlp).ratio
    dear_adc = write(tmp_path / "adc.toml", '[adc_conversion]\nvalue = 50.0\nunit = "pJ"\nsource = "test"\n')
    dear_mult = write(tmp_path / "mult.toml", '[fp32_mult]\nvalue = 7.4\nunit = "pJ"\nsource = "test"\n')
    dear_sram = write(tmp_path / "sram.toml", '[sram_word]\nvalue = 0.1\nunit = "nJ"\nsource = "test"\n')
    assert estimate(mlp, dear_adc).ratio < base  # only the chip converts
    assert estimate(mlp, dear_mult).ratio > base  # the digital side multiplies far more
    # memory traffic: both sides pay it, the digital side more (it reads every weight per pass)
    cheap = estimate(mlp, write(tmp_path / "cheap.toml", '[sram_word]\nvalue = 1.0\nunit = "pJ"\nsource = "t"\n'))
    assert cheap.ratio > base > estimate(mlp, dear_sram).ratio
    e = estimate(mlp, dear_adc)
    assert e.table["adc_conversion"].origin == str(dear_adc) and e.table["fp32_add"].origin == "default"
    # the sensitivity line's ends are the ratio with the entry at low / high
    s = {x.entry: x for x in estimate(mlp).sensitivity}["adc_conversion"]
    lo = write(tmp_path / "lo.toml", f'[adc_conversion]\nvalue = {s.low}\nunit = "pJ"\nsource = "t"\n')
    assert estimate(mlp, lo).ratio == pytest.approx(s.ratio_low, rel=1e-12) and s.ratio_low > s.ratio_high


BAD_TABLES = [
    ('[adc_conversion]\nvalue = 1.0\nsource = "my bench"\n', ("adc_conversion", "unit")),
    ('[sram_word]\nvalue = 1.0\nunit = "pJ"\n', ("sram_word", "source")),
    ('[sram_word]\nvalue = 1.0\nunit = "pJ"\nsource = ""\n', ("sram_word", "source")),
    ('[adc_conversion]\nvalue = 1.0\nunit = "ns"\nsource = "x"\n', ("adc_conversion", "ns")),
    ('[adc_conversoin]\nvalue = 1.0\nunit = "pJ"\nsource = "x"\n', ("adc_conversoin", "unknown entry")),
    ('[adc_conversion]\nvalue = 1.0\nunit = "pJ"\nsource = "x"\nlow = 2.0\nhigh = 3.0\n', ("adc_conversion", "low")),
    ('[adc_conversion]\nvalue = -1.0\nunit = "pJ"\nsource = "x"\n', ("adc_conversion", ">= 0")),
    ('adc_conversion = 3\n', ("adc_conversion", "not a table")),
    ('[adc_conversion\n', ("not valid TOML",)),
]


@pytest.mark.parametrize("text, words", BAD_TABLES)
def test_table_refused(tmp_path, text, words):
    from analysis.energy import EnergyTableError

    bad = write(tmp_path / "bad.toml", text)
    with pytest.raises(EnergyTableError) as e:
        load_table(bad)
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg and msg.startswith(f"energy table {bad}"), msg
    for w in words:
        assert w in msg, msg


def test_cli_refuses_in_one_line(mlp, tmp_path):
    """A table with an entry without its unit, a folder that is no run, a bad --format: one line, exit 2."""
    bad = write(tmp_path / "bad.toml", BAD_TABLES[0][0])
    for args, words in (((str(mlp), "--table", str(bad)), ("adc_conversion", "has no unit")),
                        ((str(tmp_path / "nothing"),), ("does not exist",)),
                        ((str(mlp), "--format", "yaml"), ("--format",))):
        r = cli("energy", *args)
        assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stdout + r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
        assert all(w in lines[0] for w in words), lines[0]


def test_killed_run_says_what_it_could_not_count(killed):
    from analysis.energy import trained_indices

    est = estimate(killed)
    c = est.counts
    want = log_counts(killed)
    assert c.steps == want["steps"] and 0 < c.steps
    assert c.programs["update"].set_pulses == want["update"][1]
    _, samples = trained_indices(0, c.samples_per_epoch, 1, c.steps)
    assert c.samples == samples == c.steps  # batch 1
    assert c.measured_us_per_sample is None
    text = " ".join(est.not_counted)
    assert f"reach step {c.steps:,}" in text and "measured wall time" in text
    assert est.ratio > 1 and est.chip_total_pj > 0
    r = cli("energy", str(killed), columns=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not counted: the run is not finished" in r.stdout and "not counted: measured wall time" in r.stdout
    assert "ratio (digital / chip):" in r.stdout


def test_table_and_json_formats(mlp):
    est = estimate(mlp)
    r = cli("energy", str(mlp), columns=40)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"pcm-hil energy: {mlp} (finished)"
    ratio = next(ln for ln in lines if ln.startswith("ratio (digital / chip): "))
    assert ratio.split()[4] == f"{est.ratio:.3f}x"
    assert any(ln.startswith("sensitivity (") and "sram_word 10..100 pJ" in ln for ln in lines)
    assert any(ln.startswith("reference: the paper reports 172x") for ln in lines)
    assert any("measured here (summary.json us_per_sample)" in ln for ln in lines)
    j = cli("energy", str(mlp), "--format", "json", columns=250)
    assert j.returncode == 0, j.stderr
    d = json.loads(j.stdout)
    assert d["ratio"] == pytest.approx(est.ratio, rel=1e-12)
    assert d["chip"]["per_sample_pj"] == pytest.approx(est.chip_pj, rel=1e-12)
    assert d["digital"]["total_per_sample_pj"] == pytest.approx(est.digital_total_pj, rel=1e-12)
    assert d["counts"]["programs"]["update"]["set_pulses"] == est.counts.programs["update"].set_pulses
    assert {s["entry"] for s in d["sensitivity"]} == {s.entry for s in est.sensitivity}
    assert d["table"]["fp32_mult"] == {"value": 3.7, "unit": "pJ", "source": load_table()["fp32_mult"].source,
                                       "description": "one 32-bit float multiply", "from": "default"}
    assert d["time"]["measured_us_per_sample"] == est.counts.measured_us_per_sample
    assert d["reference"]["paper_ratio"] == 172.0


def test_shipped_table_is_complete():
    t = load_table()
    for name, e in t.items():
        assert e.unit and e.source and e.description, name
        assert (e.low is None) == (e.high is None), name
    # the figures the issue names
    assert (t["fp32_mult"].value, t["fp32_add"].value) == (3.7, 0.9) and "Horowitz" in t["fp32_mult"].source
