"""The label watchdog (`consume`, --stall-timeout): a pipeline that stops producing
fails the run with one line naming the unwritten chunks, instead of hanging; a
pipeline that ends with chunks unwritten names them too. Real Ray Data pipelines on
the session's local Ray, standing in for the label pipeline's summary rows."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from cli_args import ONE_ACTOR
from processes import local_ray_env

from pipeline.label import PROGRESS_ROW, STATUSES, SUMMARY_SCHEMA, IncompleteRunError, consume

pytestmark = pytest.mark.integration


def summary(chunk: int, rows: int, given_up: str | None = None, s3_retries: int = 0) -> dict:
    return {"chunk": chunk, "rows": rows, **dict.fromkeys(STATUSES, 0), "ok": rows if chunk != PROGRESS_ROW else 0,
            "s3_retries": s3_retries if chunk != PROGRESS_ROW else None, "device_s": 0.5 * rows if chunk != PROGRESS_ROW else None,
            "given_up": given_up}


def test_stalled_pipeline_fails_with_the_missing_chunks(ray_session) -> None:
    written = pa.Table.from_pylist([summary(0, 5)], schema=SUMMARY_SCHEMA)

    def stall(batch: dict) -> pa.Table:
        """The stage never answers (as a pool whose actor died). Defined here so that
        Ray ships it by value to its workers."""
        time.sleep(60)
        return written

    ds = ray_session.data.range(1, override_num_blocks=1).map_batches(stall, batch_size=None)
    counts = dict.fromkeys(STATUSES, 0)
    with pytest.raises(IncompleteRunError) as info:  # before the stage answers, at 60 s
        consume(ds, [0, 1, 2], counts, stall_timeout=10)
    assert str(info.value) == ("no progress for 10 s (--stall-timeout): 3 of 3 files not written "
                               "(chunks 0, 1, 2): run again with --resume")
    assert counts == dict.fromkeys(STATUSES, 0)


def test_finished_pipeline_names_unwritten_chunks(ray_session) -> None:
    rows = [summary(PROGRESS_ROW, 3), summary(0, 3)] + [summary(k, 1) for k in range(2, 14)]
    ds = ray_session.data.from_arrow(pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA))
    counts = dict.fromkeys(STATUSES, 0)
    tally = consume(ds, [0, *range(2, 14)], counts, stall_timeout=60)
    assert (tally.rows, tally.s3_retries) == (3 + 12, 0)  # progress rows count no file
    assert tally.device_s == 0.5 * (3 + 12) and tally.first_row_s is not None
    assert counts == {"ok": 15, "empty": 0, "error": 0}
    with pytest.raises(IncompleteRunError, match=r"^12 of 25 files were not written \(chunks 1, 14, 15, 16, 17, 18, 19, 20, 21, 22 and 2 more\): run again"):
        consume(ds, list(range(25)), dict.fromkeys(STATUSES, 0), stall_timeout=60)


def test_given_up_chunks_are_named_with_the_first_reason(ray_session) -> None:
    """Chunks the writer gave up (unreadable, unwritable) are not written: the run ends
    naming them, with why the first one failed."""
    rows = [summary(0, 3, s3_retries=4), summary(2, 0, "chunk 2 not written: OSError: boom", s3_retries=1),
            summary(1, 0, "chunk 1 not read: x")]
    ds = ray_session.data.from_arrow(pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA))
    counts = dict.fromkeys(STATUSES, 0)
    with pytest.raises(IncompleteRunError) as info:
        consume(ds, [0, 1, 2], counts, stall_timeout=60)
    assert str(info.value) == ("2 of 3 files were not written (chunks 1, 2): run again with --resume "
                               "(chunk 1 not read: x)")
    assert counts["ok"] == 3 and info.value.tally.s3_retries == 5


def test_after_a_stall_the_watchdog_line_is_the_last_thing_printed(ray_tmp: Path, model: str, tmp_path: Path) -> None:
    """A real `sempart label` whose inference actor never starts: its model's weights are
    a named pipe no one writes, so loading them blocks forever (the driver reads only
    sempart.json). The watchdog stops the run, and its line is the last one printed:
    Ray Data's threads printed tracebacks after it, burying what to do."""
    stalled = tmp_path / "model"
    shutil.copytree(model, stalled)
    (stalled / "model.safetensors").unlink()
    os.mkfifo(stalled / "model.safetensors")
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((32, 40, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "label", "--model", str(stalled), "--input", str(folder),
         "--out", str(tmp_path / "labels"), "--no-gpu", "--stall-timeout", "15", *ONE_ACTOR],
        env=local_ray_env(ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )
    assert run.returncode == 1, run.stdout[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last == ("error: no progress for 15 s (--stall-timeout): 1 of 1 files not written (chunks 0): "
                    "run again with --resume"), run.stdout[-3000:]
