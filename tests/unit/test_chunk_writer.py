"""The writer's completeness rule without Ray: a chunk is written once its end row (with
the chunk's row count) and that many distinct rows have come, in any order, with
retried (duplicate) batches, and only once; an empty chunk gives an empty file."""
from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.label import PROGRESS_ROW, ChunkWriter, decode_chunks, decode_samples, finish_batch
from pipeline.outdir import OutDir
from pipeline.sources import ChunkSource, Sample
from sempart_core.config import PostConfig


def rows_of(chunk: int, n: int) -> list[pa.Table]:
    """The tables a decode task yields for a chunk of n undecodable samples (no model needed)."""
    samples = (Sample(f"s3://b/{chunk}.tar#{i}.jpg", f"{chunk}-{i}", data=b"not an image") for i in range(n))
    return [finish_batch(t, PostConfig(), "model", "run") for t in decode_samples(samples, chunk, 32, 16)]


def test_chunks_complete_on_end_row_and_all_rows(tmp_path: Path) -> None:
    writer = ChunkWriter(OutDir.at(str(tmp_path)), "run")
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
        assert summary[-1] == {"chunk": PROGRESS_ROW, "rows": batch.num_rows, "ok": 0, "empty": 0, "error": 0,
                               "s3_retries": None, "device_s": None, "given_up": None}
        for rec in summary[:-1]:
            assert rec["chunk"] not in written  # once
            assert i >= end_rows[rec["chunk"]]  # never before its end row
            written[rec["chunk"]] = rec
            assert (tmp_path / OutDir.part_name("run", rec["chunk"])).exists()
    assert {k: r["rows"] for k, r in written.items()} == sizes
    for chunk, n in sizes.items():
        table = pq.read_table(tmp_path / OutDir.part_name("run", chunk))
        assert table.column("image_id").to_pylist() == [f"{chunk}-{i}" for i in range(n)]  # in order, no end row
        assert set(table.column("status").to_pylist()) <= {"error"}
    assert not list((tmp_path / "_tmp").iterdir())  # no temporary file left, hidden ones included


def test_a_chunk_that_cannot_be_read_is_given_up_not_the_run(tmp_path: Path) -> None:
    """The decode task of a chunk whose manifest cannot be read (storage down through
    every retry; here it is gone) ends the chunk with a failed end row instead of
    raising (a raising task ended the whole run); the writer gives the chunk up, says
    why, and ignores anything else of it; the other chunks are written."""
    source = ChunkSource(kind="list", manifest=str(tmp_path / "gone.parquet"), rows_per_file=4, total=8,
                         out=OutDir.at(str(tmp_path)), run_id="run")
    [failed] = list(decode_chunks(pa.table({"chunk": [1]}), source, 32, 16))
    writer = ChunkWriter(OutDir.at(str(tmp_path)), "run")
    [given_up, _] = writer(finish_batch(failed, PostConfig(), "model", "run")).to_pylist()
    assert given_up["chunk"] == 1 and given_up["rows"] == 0
    assert given_up["given_up"].startswith("chunk 1 not read: FileNotFoundError")
    for batch in rows_of(1, 3) + rows_of(0, 2):
        summary = writer(batch).to_pylist()
        assert all(rec["chunk"] != 1 for rec in summary)
    assert sorted(p.name for p in tmp_path.glob("part-*")) == [OutDir.part_name("run", 0)]


def test_a_chunk_that_cannot_be_written_is_given_up_not_the_run(tmp_path: Path) -> None:
    """Writing fails (here OUT is a file, not a folder): the chunk is given up with the
    reason, and the writer goes on."""
    out = tmp_path / "out"
    out.write_text("not a folder")
    writer = ChunkWriter(OutDir.at(str(out)), "run")
    summaries = [rec for batch in rows_of(0, 2) for rec in writer(batch).to_pylist() if rec["chunk"] == 0]
    assert [(r["rows"], r["given_up"].split(":")[0]) for r in summaries] == [(0, "chunk 0 not written")]
