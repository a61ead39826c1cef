"""`pcm-hil export` (analysis/export.py) and RunLogReader's chunked accessors: on a tiny digits run the tables agree
with summary.json and with the reader, csv / parquet / netCDF load back (pandas, xarray) with the same values, a
tiny chunk size gives identical output without the whole-table reader methods, bad input is one line and a nonzero
exit, and a killed run exports what its log had flushed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import AnalysisError, export_run
from analysis.export import COLUMNS, WHATS
from drivers.runlog import RunLogReader

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hil.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, COLUMNS="200"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from hil.config import RunConfig
    from hil.run import start_run

    run_dir = tmp_path_factory.mktemp("export") / "digits"
    cfg = RunConfig().with_overrides(**{"data.name": "digits", "network.hidden": [16], "update.epochs": 1,
                                        "data.train_limit": 200})
    start_run(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def files(run, tmp_path_factory) -> dict[tuple[str, str], Path]:
    out = tmp_path_factory.mktemp("files")
    got = {}
    for what in WHATS:
        for fmt in ("csv", "parquet", "netcdf"):
            got[what, fmt] = export_run(run, what, fmt, out / f"{what}.{fmt}").path
    return got


def load(path: Path, fmt: str) -> pd.DataFrame:
    if fmt == "csv":
        return pd.read_csv(path, keep_default_na=False, na_values=["nan"])
    if fmt == "parquet":
        return pd.read_parquet(path)
    import xarray as xr

    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.to_dataframe().reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- the totals
def test_totals_equal_summary(run, summary, files):
    reads = load(files["reads", "csv"], "csv")
    assert len(reads) == summary["reads_logged"] == summary["devices_read"]
    assert reads.groupby("seq").ngroups == summary["read_calls"]
    pulses = load(files["pulses", "csv"], "csv")
    applied = pulses[pulses["applied"]]
    assert int(applied["set_count"].sum()) == summary["set_pulses"]
    assert int(applied["reset"].sum()) == summary["reset_pulses"]
    assert applied["program_id"].nunique() == summary["programs_applied"]
    progs = load(files["programs", "csv"], "csv")
    assert int(progs["applied"].sum()) == summary["programs_applied"]
    assert int(progs.loc[progs["applied"], "set_pulses"].sum()) == summary["set_pulses"]
    assert int(progs.loc[progs["applied"], "reset_pulses"].sum()) == summary["reset_pulses"]
    assert int(progs["devices"].sum()) == len(pulses)
    metrics = load(files["metrics", "csv"], "csv")
    last = metrics.dropna(subset=["test_accuracy"]).iloc[-1]
    assert last["test_accuracy"] == summary["test_accuracy"]
    assert last["set_pulses"] == summary["set_pulses"] and last["programs_applied"] == summary["programs_applied"]


def test_rows_equal_the_log(run, files):
    """Every row against RunLogReader's whole-table methods; the mapping's layer, weight and role per device."""
    reads = load(files["reads", "parquet"], "parquet")
    with RunLogReader(run / "run.h5") as r:
        want = r.reads()
        progs = r.programs()
        n_cols = int(r.attrs["driver_cols"])
        plus = [r.array(f"mapping/layer{i}_gplus") for i in range(2)]
        minus = [r.array(f"mapping/layer{i}_gminus") for i in range(2)]
    for k in ("step", "t_s", "wall_s", "address", "conductance_us", "reason"):
        np.testing.assert_array_equal(reads[k].to_numpy(), want[k], err_msg=k)
    assert reads["conductance_us"].dtype == np.float32
    np.testing.assert_array_equal(reads["array_row"] * n_cols + reads["array_col"], reads["address"])
    by_addr = reads.drop_duplicates("address").set_index("address")
    for layer in range(2):
        for role, table in (("G+", plus[layer]), ("G-", minus[layer])):
            i, j = np.indices(table.shape)
            rows = by_addr.loc[table.ravel()]
            assert (rows["layer"] == layer).all() and (rows["role"] == role).all()
            np.testing.assert_array_equal(rows["weight_row"], i.ravel())
            np.testing.assert_array_equal(rows["weight_col"], j.ravel())
    pulses = load(files["pulses", "parquet"], "parquet")
    np.testing.assert_array_equal(pulses["address"], np.concatenate([p.addresses for _, _, p in progs]))
    np.testing.assert_array_equal(pulses["set_count"], np.concatenate([p.set_counts for _, _, p in progs]))
    np.testing.assert_array_equal(pulses["reset"], np.concatenate([p.reset for _, _, p in progs]))
    np.testing.assert_array_equal(pulses["program_id"],
                                  np.concatenate([np.full(p.addresses.size, p.program_id) for _, _, p in progs]))


# ---------------------------------------------------------------------------------------------- the formats
@pytest.mark.parametrize("what", WHATS)
def test_parquet_and_netcdf_hold_the_csv_values(files, what):
    csv = load(files[what, "csv"], "csv")
    assert len(csv) > 0
    for fmt in ("parquet", "netcdf"):
        other = load(files[what, fmt], fmt)
        assert list(other.columns) == list(csv.columns), fmt
        assert len(other) == len(csv), fmt
        for col in csv.columns:
            a, b = csv[col].to_numpy(), other[col].to_numpy()
            if b.dtype.kind == "f":  # float32 conductances: csv holds their shortest repr, exact once parsed back
                np.testing.assert_array_equal(a.astype(b.dtype), b, err_msg=f"{fmt} {col}")
            elif b.dtype.kind in "iub":
                if b.dtype == np.int8 and a.dtype == bool:  # netCDF has no bool: 0/1 with flag_meanings
                    b = b.astype(bool)
                assert a.dtype == b.dtype or a.dtype.kind == b.dtype.kind == "i", (fmt, col, a.dtype, b.dtype)
                np.testing.assert_array_equal(a, b, err_msg=f"{fmt} {col}")
            else:
                assert (a.astype(str) == b.astype(str)).all(), f"{fmt} {col}"


def test_units_in_metadata(files):
    import pyarrow.parquet as pq
    import xarray as xr

    schema = pq.read_schema(files["reads", "parquet"])
    assert schema.field("conductance_us").metadata[b"units"] == b"uS"
    assert schema.field("t_s").metadata[b"units"] == b"s"
    assert json.loads(schema.metadata[b"units"])["wall_s"] == "s"
    with xr.open_dataset(files["reads", "netcdf"], engine="h5netcdf") as ds:
        assert ds["conductance_us"].attrs["units"] == "uS" and ds["wall_s"].attrs["units"] == "s"
        assert ds["reason"].dtype.kind in "UO" and set(ds["reason"].values) >= {"initial", "after-program"}
        assert ds.sizes["read"] == len(ds["step"])
    with xr.open_dataset(files["pulses", "netcdf"], engine="h5netcdf") as ds:
        assert ds["reset"].attrs["flag_meanings"] == "false true"
        assert ds["set_count"].attrs["units"] == "pulses"
    for what, cols in COLUMNS.items():
        names = [c.name for c in cols]
        assert len(set(names)) == len(names), what


# ---------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("chunk", [1, 7, 1000, 10**8])
def test_chunked_reader_equals_whole_tables(run, chunk):
    with RunLogReader(run / "run.h5") as r:
        whole = r.reads()
        parts = list(r.iter_reads(chunk))
        assert all(p["address"].size <= chunk for p in parts)
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k], err_msg=k)
        ev = r.read_events()
        got = list(r.iter_read_events(chunk))
        for k in ev:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in got]), ev[k], err_msg=k)
        progs = r.programs()
        dev = list(r.iter_program_devices(chunk))
        np.testing.assert_array_equal(np.concatenate([d["set_count"] for d in dev]),
                                      np.concatenate([p.set_counts for _, _, p in progs]))
        np.testing.assert_array_equal(np.concatenate([d["step"] for d in dev]),
                                      np.concatenate([np.full(p.addresses.size, s) for s, _, p in progs]))
        pev = list(r.iter_program_events(chunk))
        np.testing.assert_array_equal(np.concatenate([e["set_pulses"] for e in pev]),
                                      [int(p.set_counts.sum()) for _, _, p in progs])
        np.testing.assert_array_equal(np.concatenate([e["reset_pulses"] for e in pev]),
                                      [int(p.reset.sum()) for _, _, p in progs])
    with pytest.raises(ValueError):
        next(RunLogReader(run / "run.h5").iter_reads(0))


def test_tiny_chunks_give_identical_output(run, files, tmp_path, monkeypatch):
    """chunk_rows=7: the whole-table reader methods are never called, and the files hold the same rows."""
    import pyarrow.parquet as pq

    def whole(*_a, **_k):
        raise AssertionError("the export read a whole table")

    for name in ("reads", "read_events", "programs", "program_events", "pulses_per_device"):
        monkeypatch.setattr(RunLogReader, name, whole)
    for what in ("reads", "pulses", "programs"):
        for fmt in ("csv", "parquet", "netcdf"):
            e = export_run(run, what, fmt, tmp_path / f"{what}.{fmt}", chunk_rows=7)
            big = files[what, fmt]
            if fmt == "csv":
                assert e.path.read_bytes() == big.read_bytes(), what
            else:
                pd.testing.assert_frame_equal(load(e.path, fmt), load(big, fmt))
            if fmt == "parquet":
                assert pq.ParquetFile(e.path).metadata.num_row_groups >= -(-e.rows // 7), what  # <= 7 rows each
                assert pq.ParquetFile(big).metadata.num_row_groups == 1, what


# ---------------------------------------------------------------------------------------------- the command
def test_cli_export(run, summary, tmp_path):
    out = tmp_path / "sub" / "pulses.parquet"
    r = cli("export", str(run), "--what", "pulses", "--format", "parquet", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    assert f"{summary['set_pulses']:,} SET pulses, {summary['reset_pulses']:,} RESET pulses" in r.stdout
    assert "conductance_us" not in r.stdout and "set_count (pulses)" in r.stdout
    assert f"file: {out} (parquet, " in r.stdout
    assert len(pd.read_parquet(out)) == int(pd.read_parquet(out)["address"].size) > 0
    r = cli("export", str(run))  # the defaults: reads, csv, RUN_DIR/export/reads.csv
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"rows: {summary['reads_logged']:,} device reads of {summary['read_calls']:,} read calls" in r.stdout
    assert len(pd.read_csv(run / "export" / "reads.csv")) == summary["reads_logged"]


def error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_cli_bad_input(run, tmp_path):
    out = tmp_path / "reads.csv"
    out.write_text("keep me")
    cases = [
        (("export", str(tmp_path / "no-such-run")), 2, "does not exist"),
        (("export", str(tmp_path)), 2, "is not a run folder"),
        (("export", str(run), "--what", "weights"), 2, "unknown table 'weights'"),
        (("export", str(run), "--format", "xlsx"), 2, "unknown format 'xlsx'"),
        (("export", str(run), "--out", str(out)), 2, "exists: give --force"),
        (("export", str(run), "--out", str(tmp_path)), 2, "is a folder"),
        (("export", str(run), "--chunk-rows", "0"), 2, "--chunk-rows must be a positive integer"),
    ]
    for args, code, text in cases:
        r = cli(*args)
        line = error_line(r)
        assert r.returncode == code and text in line, (args, r.returncode, line)
    assert out.read_text() == "keep me"
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all" * 100)
    r = cli("export", str(bad), "--out", str(tmp_path / "x.csv"))
    assert r.returncode == 1 and str(bad) in error_line(r)
    assert not (tmp_path / "x.csv").exists()
    r = cli("export", str(run), "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith('"seq","step","t_s","wall_s","address"')
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial file left behind
    with pytest.raises(AnalysisError) as e:
        export_run(run, "reads", "csv", out)
    assert e.value.exit_code == 2


# ---------------------------------------------------------------------------------------------- a killed run
@pytest.mark.slow
def test_killed_run_exports_what_was_flushed(tmp_path):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "hil.cli", "train", "--data", "digits", "--set",
                             "network.hidden=[16]", "--set", "logging.flush_interval_s=0.2", "--epochs", "30",
                             "--out", str(run_dir)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no programs flushed after 120 s"
            try:
                with RunLogReader(run_dir / "run.h5") as r:
                    if r.counts["programs"] > 50:
                        break
            except Exception:  # noqa: BLE001 - the log may be mid-creation
                pass
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert not (run_dir / "summary.json").exists()
    with RunLogReader(run_dir / "run.h5") as r:
        counts = r.counts
        progs = r.programs()
    for what, fmt in (("reads", "parquet"), ("pulses", "netcdf"), ("programs", "csv")):
        r = cli("export", str(run_dir), "--what", what, "--format", fmt)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "note: no summary.json (killed or still running)" in r.stdout
        df = load(run_dir / "export" / f"{what}.{dict(csv='csv', parquet='parquet', netcdf='nc')[fmt]}", fmt)
        want = {"reads": counts["reads"], "pulses": counts["program_devices"], "programs": counts["programs"]}[what]
        assert len(df) == want > 0, what
    df = load(run_dir / "export" / "programs.csv", "csv")
    assert int(df["set_pulses"].sum()) == sum(int(p.set_counts.sum()) for _, _, p in progs)
