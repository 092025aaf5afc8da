"""The label run record, OUT/_runs/<run_id>.json, as a dataclass: it round-trips, a record
written before the dataclass (and before --retry-errors) still loads, and anything else
is one line. No Ray: every case fails or loads before the pipeline starts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.outdir import LabelRun, OutDir, RetryRecord, RunRecordError

# A record as `sempart label` wrote it before LabelRun existed (a finished, resumed run).
OLD_RECORD = {
    "run_id": "20260101T000000Z-abc123",
    "status": "finished",
    "schema_version": 1,
    "model_id": "f" * 64,
    "input_kind": "folder",
    "manifest": "_manifests/20260101T000000Z-abc123.parquet",
    "manifest_rows": 17,
    "rows": 17,
    "rows_per_file": 4,
    "limit": None,
    "config": {"model": "m", "input": "/data/in", "out": "/data/out", "resume": False, "batch_size": 8,
               "actors": None, "gpu": None, "rows_per_file": 4, "limit": None},
    "started_at": "2026-01-01T00:00:00+00:00",
    "invocations": 2,
    "counts": {"ok": 12, "empty": 0, "error": 5},
    "finished_at": "2026-01-01T00:01:00+00:00",
    "timings": {"setup_and_listing_s": 0.1, "ray_start_s": 2.0, "label_s": 3.0, "total_s": 5.1},
    "labelled_last": 17,
    "images_per_s": 5.667,
    "last_config": {"model": "m"},
}


def test_round_trip() -> None:
    run = LabelRun(run_id="r1", model_id="a" * 64, manifest=None, manifest_rows=10, rows=7, rows_per_file=3,
                   limit=7, config={"input": "in.parquet"}, invocations=1, counts={"ok": 6, "empty": 0, "error": 1},
                   retries=[RetryRecord(at="2026-01-02T00:00:00+00:00", files=1, rows=2, ok=1, error=1)])
    data = json.loads(json.dumps(run.to_dict()))
    assert LabelRun.from_dict(data) == run
    assert run.chunks == 3
    assert data["retries"] == [{"at": "2026-01-02T00:00:00+00:00", "files": 1, "rows": 2, "ok": 1, "empty": 0,
                                "error": 1}]


def test_a_record_of_an_older_version_loads_and_keeps_its_keys(tmp_path: Path) -> None:
    runs = tmp_path / "_runs"
    runs.mkdir()
    (runs / f"{OLD_RECORD['run_id']}.json").write_text(json.dumps(OLD_RECORD))
    run = OutDir.at(str(tmp_path)).find_run()
    assert run.run_id == OLD_RECORD["run_id"] and run.counts == OLD_RECORD["counts"] and run.chunks == 5
    assert run.retries == [] and run.record_version == 1  # new fields take their defaults
    OutDir.at(str(tmp_path)).save_run(run)
    again = json.loads((runs / f"{OLD_RECORD['run_id']}.json").read_text())
    assert {k: again[k] for k in OLD_RECORD} == OLD_RECORD  # every key other code reads is still there


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not JSON"),
        ("[1, 2]", "is not a label run record (a JSON object)"),
        (json.dumps({"run_id": "x", "status": "finished"}), "is not a label run record: no model_id, manifest"),
        (json.dumps({**OLD_RECORD, "record_version": 99}), "record version 99: written by a newer sempart"),
        (json.dumps({**OLD_RECORD, "rows": "many"}), "has rows 'many', not a count"),
        (json.dumps({**OLD_RECORD, "rows_per_file": 0}), "rows_per_file 0, not >= 1"),
        (json.dumps({**OLD_RECORD, "retries": [{"when": "today"}]}), "malformed retries entry"),
    ],
)
def test_a_garbage_record_is_one_line(tmp_path: Path, text: str, message: str, model: str) -> None:
    runs = tmp_path / "out" / "_runs"
    runs.mkdir(parents=True)
    (runs / "r.json").write_text(text)
    with pytest.raises(RunRecordError, match="r.json") as info:
        OutDir.at(str(tmp_path / "out")).find_run()
    assert message in str(info.value) and "\n" not in str(info.value)

    result = CliRunner().invoke(app, ["label", "--model", model, "--input", str(tmp_path), "--out",
                                      str(tmp_path / "out"), "--resume"])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert message in line


def test_retry_errors_needs_resume_and_a_run(tmp_path: Path, model: str) -> None:
    runner = CliRunner()
    args = ["label", "--model", model, "--input", str(tmp_path), "--out", str(tmp_path / "out"), "--retry-errors"]
    without_resume = runner.invoke(app, args)
    assert without_resume.exit_code == 2 and "add --resume" in without_resume.output
    no_run = runner.invoke(app, [*args, "--resume"])
    assert no_run.exit_code == 2 and "no run to retry" in no_run.output
    zero = runner.invoke(app, [*args[:-1], "--max-batch-tokens", "0"])
    assert zero.exit_code == 2 and "--max-batch-tokens must be >= 1" in zero.output
