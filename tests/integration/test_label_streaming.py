"""`sempart label` streams chunk by chunk: every chunk is its own decode task and reaches
the writer as its own block; with --decode gpu, where the inference actor reads a whole
chunk, the chunk's rows reach the writer in several blocks as the actor makes them.

Regression: with fetch and decode as two fused Ray Data stages, Ray gave each task as
many chunk indices as the larger batch size of the two (16), so a 20,000-image run moved
through every stage in two blocks of up to 16,000 images: worker memory grew with the
input and no file was written before the end. The model is a tiny RANDOM backbone.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import label as labels
from pipeline.cluster import cluster_plan
from pipeline.outdir import OutDir
from sempart_core.artifact import read_artifact_info

pytestmark = pytest.mark.integration

CHUNKS = 17  # more than the decode batch (16): the old fused stages bundled 16 chunks
ROWS = 16  # per chunk: no fewer than any stage's batch size, so Ray need not merge chunks


def write_images(folder: Path, n: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        (folder / f"{i:03d}.png").write_bytes(buf.getvalue())


def test_each_chunk_flows_as_its_own_block(model: str, tmp_path: Path, ray_session) -> None:
    ray_session.data.DataContext.get_current().enable_progress_bars = False
    write_images(tmp_path / "images", ROWS * CHUNKS)
    opts = labels.LabelOptions(model=model, input=str(tmp_path / "images"), out=str(tmp_path / "out"),
                               rows_per_file=ROWS)
    art, out = read_artifact_info(model), OutDir.at(opts.out)
    run = labels._new_run(opts, out, art.model_id)
    job = labels.Job(opts, out, run, art, out.manifest_of(run, opts.input), gpu=False, plan=cluster_plan(1, False),
                     actors=1)
    ds = labels.build_dataset(job, list(range(CHUNKS)))

    blocks = [b.to_pylist() for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    # Each block: the files the writer wrote from one input block, plus its progress row.
    assert all(b[-1]["chunk"] == labels.PROGRESS_ROW for b in blocks)
    blocks = [b[:-1] for b in blocks if len(b) > 1]

    assert sorted(r["chunk"] for b in blocks for r in b) == list(range(CHUNKS))
    assert [len(b) for b in blocks] == [1] * CHUNKS  # one written file per block, as it completes
    assert all(b[0]["rows"] == ROWS for b in blocks)


def test_a_chunk_read_by_the_actor_reaches_the_writer_as_it_goes(model: str, tmp_path: Path, ray_session,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With --decode gpu the inference actor reads a whole chunk in one call; its rows must
    reach the writer (and the stall watchdog) in several blocks, not only at the chunk's
    end. A smaller row block here stands for a chunk many times larger than the block."""
    ray_session.data.DataContext.get_current().enable_progress_bars = False
    monkeypatch.setattr(labels, "ROW_BLOCK_BYTES", 4 * 8192)  # a quarter of it on CPU: ~20 rows of these images
    rows = 4 * ROWS
    write_images(tmp_path / "images", rows)
    opts = labels.LabelOptions(model=model, input=str(tmp_path / "images"), out=str(tmp_path / "out"),
                               rows_per_file=rows, decode="gpu", finish="device")
    art, out = read_artifact_info(model), OutDir.at(opts.out)
    run = labels._new_run(opts, out, art.model_id)
    job = labels.Job(opts, out, run, art, out.manifest_of(run, opts.input), gpu=False, plan=cluster_plan(1, False),
                     actors=1)
    blocks = [b.to_pylist() for b in labels.build_dataset(job, [0]).iter_batches(batch_size=None,
                                                                                    batch_format="pyarrow")]
    taken = [b[-1]["rows"] for b in blocks]  # each writer call's progress row: the rows it took
    assert len(blocks) > 2 and sum(taken) == rows + 1, taken  # the chunk's rows and its end row
    files = [r for b in blocks for r in b[:-1]]
    assert [(f["chunk"], f["rows"]) for f in files] == [(0, rows)]
    assert len(blocks[-1]) == 2  # written once its last rows came
