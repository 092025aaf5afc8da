"""The writer's completeness rule without Ray: a chunk is written once its end row (with
the chunk's row count) and that many distinct rows have come, in any order, with
retried (duplicate) batches, and only once; an empty chunk gives an empty file."""
from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.label import PROGRESS_ROW, ChunkWriter, decode_samples, finish_batch, part_name
from pipeline.sources import Sample
from sempart_core.config import PostConfig


def rows_of(chunk: int, n: int) -> list[pa.Table]:
    """The tables a decode task yields for a chunk of n undecodable samples (no model needed)."""
    samples = (Sample(f"s3://b/{chunk}.tar#{i}.jpg", f"{chunk}-{i}", data=b"not an image") for i in range(n))
    return [finish_batch(t, PostConfig(), "model", "run") for t in decode_samples(samples, chunk, 32, 16)]


def test_chunks_complete_on_end_row_and_all_rows(tmp_path: Path) -> None:
    writer = ChunkWriter(str(tmp_path), "run")
    sizes = {0: 40, 1: 3, 2: 0, 3: 17}
    batches = [b for chunk, n in sizes.items() for b in rows_of(chunk, n)]
    batches += batches[:5]  # retried upstream tasks send some rows twice
    random.Random(0).shuffle(batches)
    end_rows: dict[int, int] = {}  # chunk -> the first batch holding its end row
    for i, b in enumerate(batches):
        if b.column("chunk_rows")[-1].is_valid:
            end_rows.setdefault(b.column("chunk")[0].as_py(), i)
    written = {}
    for i, batch in enumerate(batches):
        summary = writer(batch).to_pylist()
        assert summary[-1] == {"chunk": PROGRESS_ROW, "rows": batch.num_rows, "ok": 0, "empty": 0, "error": 0}
        for rec in summary[:-1]:
            assert rec["chunk"] not in written  # once
            assert i >= end_rows[rec["chunk"]]  # never before its end row
            written[rec["chunk"]] = rec
            assert (tmp_path / part_name("run", rec["chunk"])).exists()
    assert {k: r["rows"] for k, r in written.items()} == sizes
    for chunk, n in sizes.items():
        table = pq.read_table(tmp_path / part_name("run", chunk))
        assert table.column("image_id").to_pylist() == [f"{chunk}-{i}" for i in range(n)]  # in order, no end row
        assert set(table.column("status").to_pylist()) <= {"error"}
    assert not list((tmp_path / "_tmp").iterdir())  # no temporary file left, hidden ones included
