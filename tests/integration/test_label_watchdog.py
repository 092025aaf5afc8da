"""The label watchdog (`consume`, --stall-timeout): a pipeline that stops producing
fails the run with one line naming the unwritten chunks, instead of hanging; a
pipeline that ends with chunks unwritten names them too. Real Ray Data pipelines on
the session's local Ray, standing in for the label pipeline's summary rows."""
from __future__ import annotations

import time

import pyarrow as pa
import pytest

from pipeline.label import PROGRESS_ROW, STATUSES, SUMMARY_SCHEMA, IncompleteRunError, consume

pytestmark = pytest.mark.integration


def summary(chunk: int, rows: int) -> dict:
    return {"chunk": chunk, "rows": rows, **dict.fromkeys(STATUSES, 0), "ok": rows if chunk != PROGRESS_ROW else 0}


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
    assert consume(ds, [0, *range(2, 14)], counts, stall_timeout=60) == 3 + 12  # progress rows count no file
    assert counts == {"ok": 15, "empty": 0, "error": 0}
    with pytest.raises(IncompleteRunError, match=r"^12 of 25 files were not written \(chunks 1, 14, 15, 16, 17, 18, 19, 20, 21, 22 and 2 more\): run again"):
        consume(ds, list(range(25)), dict.fromkeys(STATUSES, 0), stall_timeout=60)
