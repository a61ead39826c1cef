"""Run log schema 3: the read reason is an HDF5 enum (h5py and h5dump show its names); schema-2 logs, written by
the schema-2 code itself, stay readable by the reader, report, export and replay, and are never appended to.

tests/data/run-schema2.tar.gz is a run folder the schema-2 code wrote (commit 0d1bd30, `git archive` of it, then
in that tree: start_run(RunConfig().with_overrides(**TINY), "v2run", baseline=False, stop_after_steps=130) with
TINY = digits, hidden [16], 2 epochs, train_limit 200): a stopped run, so it is both replayable and resumable.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from drivers.replay import ReplayDriver
from drivers.runlog import SCHEMA_VERSION, OldSchemaLog, RunLogError, RunLogReader, RunLogWriter, verify_log
from drivers.runlog.schema import READ_REASONS
from hil.cli import app

OLD_RUN = Path(__file__).parent / "data" / "run-schema2.tar.gz"
NARROW = {"COLUMNS": "30"}


@pytest.fixture()
def old_run(tmp_path) -> Path:
    with tarfile.open(OLD_RUN) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "v2run"


def _state(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under folder (a refused command must change none)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _small_log(path: Path, **kw) -> None:
    with RunLogWriter(path, attrs={"driver_rows": 1, "driver_cols": 4}, **kw) as w:
        w.log_reads(0, 0.0, np.arange(4), np.ones(4, np.float32), "initial")
        w.log_reads(1, 0.5, np.arange(2), np.full(2, 2.0, np.float32), "periodic")
        w.log_reads(2, 1.0, np.arange(4), np.full(4, 3.0, np.float32), "calibration-drift")


def test_a_new_log_stores_the_reason_as_an_hdf5_enum(tmp_path):
    path = tmp_path / "run.h5"
    _small_log(path)
    with h5py.File(path, "r") as f:
        ds = f["reads/events"]
        assert f.attrs["schema_version"] == SCHEMA_VERSION == 3
        assert ds.id.get_type().get_member_type(ds.dtype.names.index("reason")).get_class() == h5py.h5t.ENUM
        enum = h5py.check_enum_dtype(ds.dtype["reason"])
        assert enum == {name: code for code, name in enumerate(READ_REASONS)}
        names = {v: k for k, v in enum.items()}
        assert [names[c] for c in ds["reason"]] == ["initial", "periodic", "calibration-drift"]
        # the table every version has says the same, code for code
        assert [bytes(b).decode() for b in f["reads/reason_names"][:]] == list(READ_REASONS)
    with RunLogReader(path) as r:
        assert r.schema_version == 3 and r.verify() == []
        assert list(r.read_events()["reason"]) == ["initial", "periodic", "calibration-drift"]
        assert list(r.reads()["reason"]) == ["initial"] * 4 + ["periodic"] * 2 + ["calibration-drift"] * 4


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (Debian hdf5-tools) is not installed")
def test_h5dump_shows_the_reason_names(tmp_path):
    path = tmp_path / "run.h5"
    _small_log(path)
    out = subprocess.run(["h5dump", "-d", "/reads/events", str(path)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    assert "H5T_ENUM" in out and '"calibration-drift" 9;' in out and '"initial"          0;' in out
    data = out[out.index("DATA {"):]
    assert [w.strip(" ,") for w in data.split() if w.strip(" ,") in READ_REASONS] == \
        ["initial", "periodic", "calibration-drift"]


def test_other_reasons_are_declared_when_the_log_is_made_and_kept_on_append(tmp_path):
    path = tmp_path / "run.h5"
    _small_log(path, reasons=["warm-up", "initial"])      # a standard one again is no new code
    with RunLogWriter(path, append=True) as w:
        w.log_reads(3, 2.0, np.arange(1), np.ones(1, np.float32), "warm-up")
        with pytest.raises(RunLogError, match=r"read reason 'cool-down' is not one of the reasons of run log .*"
                                              r"declare others with RunLogWriter\(\.\.\., reasons=\[\.\.\.\]\)"):
            w.log_reads(4, 2.0, np.arange(1), np.ones(1, np.float32), "cool-down")
    with h5py.File(path, "r") as f:
        assert h5py.check_enum_dtype(f["reads/events"].dtype["reason"])["warm-up"] == len(READ_REASONS)
    with RunLogReader(path) as r:
        assert r.verify() == [] and list(r.read_events()["reason"])[-1] == "warm-up"


def test_a_schema_2_log_reads_as_before(old_run):
    log = old_run / "run.h5"
    with h5py.File(log, "r") as f:
        assert f.attrs["schema_version"] == 2 and h5py.check_enum_dtype(f["reads/events"].dtype["reason"]) is None
        codes = f["reads/events"]["reason"]
        table = [bytes(b).decode() for b in f["reads/reason_names"][:]]
    before = _state(old_run)
    assert verify_log(log).endswith("verified")
    with pytest.raises(OldSchemaLog, match="is schema version 2 .read reasons as plain codes, not an HDF5 enum"):
        verify_log(log, for_append=True)                # what a resume asks first
    assert _state(old_run) == before
    with RunLogReader(log) as r:
        assert r.schema_version == 2 and r.reason_names == table
        ev = r.read_events()
        assert list(ev["reason"]) == [table[c] for c in codes]
        # schema 2 numbered the reasons in the order of their first use
        assert table == ["initial", "after-program"] and ev["reason"][0] == "initial"
        n_ops = len(ev["seq"]) + r.counts["programs"]
    with ReplayDriver(log) as rep:
        assert rep.remaining == n_ops


def test_report_export_and_replay_read_a_schema_2_run(old_run, tmp_path):
    runner = CliRunner(env=NARROW)
    r = runner.invoke(app, ["export", str(old_run), "--what", "reads", "--format", "csv", "--out",
                            str(tmp_path / "reads.csv")])
    assert r.exit_code == 0, r.output
    import pandas as pd

    table = pd.read_csv(tmp_path / "reads.csv")
    with RunLogReader(old_run / "run.h5") as log:
        flat = log.reads()
    assert list(table["reason"]) == list(flat["reason"]) and len(table) == len(flat["reason"])
    r = runner.invoke(app, ["report", str(old_run), "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "report" / "report.html").stat().st_size > 0
    r = runner.invoke(app, ["replay", str(old_run), "--out", str(tmp_path / "replayed")])
    assert r.exit_code == 0, r.output
    with RunLogReader(tmp_path / "replayed" / "run.h5") as new:
        assert new.schema_version == 3
        assert list(new.reads()["reason"]) == list(flat["reason"])
        assert np.array_equal(new.reads()["conductance_us"], flat["conductance_us"])


def test_a_resume_of_a_schema_2_run_is_one_line_and_changes_nothing(old_run):
    before = _state(old_run)
    r = CliRunner(env=NARROW).invoke(app, ["train", "--resume", str(old_run)])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert len(lines) == 1 and lines[0].startswith(f"error: run log {old_run / 'run.h5'} is schema version 2 "
                                                   "(read reasons as plain codes, not an HDF5 enum; written by "
                                                   "package_version "), r.output
    assert lines[0].endswith("this version appends only to schema 3 logs, so that run cannot be continued here "
                             "(nothing changed): finish it with the version that started it, or start a new run "
                             "(its log stays readable: report, export and replay read it)"), lines[0]
    assert _state(old_run) == before
    with pytest.raises(RunLogError, match="is schema version 2 .* appends only to schema 3 logs"):
        RunLogWriter(old_run / "run.h5", append=True)
    assert _state(old_run)["run.h5"] == before["run.h5"]
