"""`sempart label`: manifest -> fetch + decode -> model (actor pool) -> masks -> Parquet.

Stages (Ray Data, streaming; docs/design.md, "How one image flows"):
  1. chunk descriptors -> the chunk's images (`sources.ChunkSource`: image files by
     manifest rows, a WebDataset shard read as one stream, or rows of Parquet files)
  2. `decode_image`, `prepare_image`; a bad image becomes an error row, never a failed
     block (1 and 2: one CPU task per chunk; with --decode gpu, in the inference actor,
     `ChunkInfer`, decoding on its device)
  3. actor pool: the model loaded once per actor, `Predictor.infer` per batch of equal
     prepared shapes within a token budget, split in halves when memory runs out; an
     image out of memory alone is an error row (sempart_core/batching.py; one GPU per
     actor with --gpu; bf16 inside the Predictor)
  4. CPU tasks: `finish_raw` (resize, threshold, boxes, score), COCO RLE; with --finish
     device the actor finishes the maps on its device and, without instances, the rows
     too (no finish tasks)
  5. one writer actor: collects each chunk's rows and writes the chunk's file.

Exactly once. The manifest is fixed when a run starts (an input other than a manifest
is listed into OUT/_manifests/<run_id>.parquet), and chunk k is its rows
[k * rows_per_file, (k + 1) * rows_per_file), or shard k of a WebDataset input (one
manifest row per shard, whose sample count is known only once it is read). Each row
carries (chunk, row in chunk); the chunk's reader (a decode task, or `ChunkInfer`) ends
it with an end row holding the chunk's row count, which flows on to the writer.
Chunk k is written to exactly one file, OUT/part-<run_id>-<k:06d>.parquet, only once its
end row and all of its rows are there: locally under OUT/_tmp/ and then renamed
(atomic), on S3 straight to the key (an object appears only when its upload completes).
So the readable table, OUT/part-*.parquet, is always a set of complete chunks; a kill at
any moment loses at most the chunks in flight, and `--resume` lists the part files,
skips their chunks and labels the rest. A chunk
written twice (a zombie writer of a killed run) lands under the same name with the same
rows. The run's settings live in OUT/_runs/<run_id>.json (`LabelRun`), so a resume keeps
the run id, manifest and chunking. Readers skip `_`-prefixed paths (_tmp, _runs, _manifests).

`--resume --retry-errors` then labels the error rows of the part files again, through the
same stages (decode keeps only the chunk's error rows), and `ErrorRetryWriter` writes each
such file again whole, under its name, with those rows replaced: one row per image at any
moment, and a rerun retries what is still an error.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline import manifest as manifests
from pipeline import sources, storage
from pipeline.cluster import ResourcePlan, cluster_plan, init_ray
from pipeline.outdir import ATTEMPTS_KEY, PART_PATTERN, LabelRun, OutDir, RetryRecord, status_counts, sum_counts
from pipeline.schema import LABELS_SCHEMA, STATUS_ERROR, STATUSES, conform, image_id_for
from pipeline.labeler import (
    DECODED_SCHEMA,
    INFERRED_SCHEMA,
    ROWS_SCHEMA,
    Labeler,
    finish_rows,
    instance_config,
    needs_image,
    one_line,
    result_columns,
)
from pipeline.storage import redact, s3_env
from sempart_core.batching import DEFAULT_MAX_BATCH_TOKENS
from sempart_core.config import INSTANCE_MODES, InstanceConfig, PostConfig
from sempart_core.images import decode_image, prepare_image

if TYPE_CHECKING:
    import ray

    from sempart_core.artifact import ArtifactInfo

logger = logging.getLogger(__name__)

DEFAULT_ROWS_PER_FILE = 1000
DEFAULT_BATCH_SIZE = 8
PROGRESS_EVERY_S = 10.0
STREAM_STOP_GRACE_S = 5.0  # after a stall, how long the driver waits for the stopped pipeline
DEFAULT_STALL_TIMEOUT_S = 300.0
PROGRESS_ROW = -1  # the chunk of the writer's per-batch row: rows taken, none written yet
DECODE_MEMORY = 2**30  # bytes reserved per decode task (see build_dataset)
DECODE_BATCH = 16  # images per table yielded by a decode task
FETCH_THREADS = 16  # image reads in flight per inference actor that fetches its own (ChunkInfer)
CPU_STAGE_NICE = 10  # scheduling priority of the light stages when the model runs on CPU
CPU_BLOCK_BYTES = 2**20  # block size on CPU: a few 320 px images, so an actor task is ~one batch
ROW_BLOCK_BYTES = 2**20  # block size with --decode gpu on a GPU, where only rows flow: ~1,000 rows

END_OF_CHUNK = "end of chunk"  # the error text of a chunk's end row (dropped by the writer)
CHUNK_FAILED = -1  # chunk_rows of the end row of a chunk its decode task could not read; its error says why

class LabelUsageError(ValueError):
    """A setting the user must change (mismatched resume, no GPU for --gpu, ...)."""


@dataclass
class Tally:
    """What a pipeline's summary rows add up to (`consume`)."""

    rows: int = 0  # written
    s3_retries: int = 0  # of the image reads
    device_s: float = 0.0  # CPU time of the inference actors' device stages (decode, model, finish)
    first_row_s: float | None = None  # from the start until the writer took its first rows


class IncompleteRunError(RuntimeError):
    """The pipeline ended with chunks unwritten (e.g. the writer actor was restarted);
    `tally` says what it did until then."""

    def __init__(self, message: str, tally: Tally | None = None):
        super().__init__(message)
        self.tally = tally or Tally()


@dataclass
class LabelOptions:
    """The flags of `sempart label` (and jobs/label_job.py)."""

    model: str
    input: str
    out: str
    resume: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    actors: int | None = None  # default: one per GPU with --gpu, else one per CPU (cluster.plan_workers)
    gpu: bool | None = None  # default: use GPUs when the cluster has some
    rows_per_file: int | None = None  # default DEFAULT_ROWS_PER_FILE; fixed per run
    limit: int | None = None  # first N manifest rows; fixed per run
    retry_errors: bool = False  # with resume: label the error rows of the run's part files again
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS  # tokens per model call (sempart_core/batching.py)
    image_column: str | None = None  # Parquet input: the column of image bytes (default: detected)
    id_column: str | None = None  # Parquet input: the column of image ids (default: sha1 of uri)
    decode: str | None = None  # "gpu": decode JPEGs in the inference actor; default: gpu with --gpu, else cpu
    stall_timeout: float = DEFAULT_STALL_TIMEOUT_S  # fail when no row reaches the writer for this long
    instances: int | None = None  # objects per image in `instances` (default 0: none); fixed per run
    instances_from: str | None = None  # "maskcut" (default) or "sempart" (the model's mask first); fixed per run
    finish: str | None = None  # "device": maps finished where the model ran (default with --gpu); "cpu": in CPU tasks

    def public(self) -> dict:
        """The options with URIs redacted, for logs and _runs/*.json."""
        return {**asdict(self), "model": redact(self.model), "input": redact(self.input), "out": redact(self.out)}


@dataclass
class LabelSummary:
    run_id: str
    counts: dict[str, int]
    total: int  # rows in the finished table
    labelled_now: int  # rows labelled by this invocation
    seconds: float
    images_per_s: float
    table: str = ""
    resumed: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    retried: int = 0  # error rows labelled again (--retry-errors), part of labelled_now
    still_errors: int = 0  # of those, rows that failed again

    @property
    def exit_code(self) -> int:
        return 1 if self.counts.get(STATUS_ERROR, 0) else 0

    def line(self) -> str:
        c = self.counts
        return (
            f"labelled {self.total} images (ok {c['ok']}, empty {c['empty']}, error {c['error']}); "
            f"this run {self.labelled_now} in {self.seconds:.1f} s, {self.images_per_s:.2f} images/s; "
            + (f"retried {self.retried} error rows, {self.still_errors} still errors; " if self.retried else "")
            + f"run {self.run_id}; table {self.table}"
        )


# ---------------------------------------------------------------- stage functions


def decode_sample(sample: sources.Sample, image_size: int, patch: int, decode: str = "cpu") -> dict:
    """Decode and prepare one image; any failure becomes the row's error. With decode
    "gpu" the row carries the encoded bytes (in_h null) for the inference actor."""
    rec = {"uri": sample.uri, "image_id": sample.image_id or image_id_for(sample.uri)}
    try:
        if sample.error is not None:
            raise sample.error
        if decode == "gpu":
            rec["pixels"] = sample.data
            return rec
        rgb = decode_image(sample.data)
        rec.update(height=rgb.shape[0], width=rgb.shape[1])
        prepared = np.ascontiguousarray(prepare_image(rgb, image_size, patch))
        rec.update(in_h=prepared.shape[0], in_w=prepared.shape[1], pixels=prepared.tobytes())
    except Exception as exc:  # noqa: BLE001 - bad input must not fail the block
        rec["error"] = one_line(exc)
    return rec


def decode_samples(
    samples: Iterator[sources.Sample], chunk: int, image_size: int, patch: int, decode: str = "cpu",
    per_table: int = DECODE_BATCH,
) -> Iterator[pa.Table]:
    """One chunk's samples -> decoded rows, `per_table` per table, then its end row."""
    out: list[dict] = []
    n, retries_before = 0, storage.retries()
    for sample in samples:
        out.append({**decode_sample(sample, image_size, patch, decode), "chunk": chunk, "row": n})
        n += 1
        if len(out) == per_table:
            yield pa.Table.from_pylist(out, schema=DECODED_SCHEMA)
            out = []
    out.append({"chunk": chunk, "row": -1, "chunk_rows": n, "s3_retries": storage.retries() - retries_before,
                "uri": "", "image_id": "", "error": END_OF_CHUNK})
    yield pa.Table.from_pylist(out, schema=DECODED_SCHEMA)


def lower_priority(nice: int) -> None:
    """Run this worker at niceness `nice` (at least), so that its light work fills the
    cores' idle moments instead of preempting the CPU model's threads (see build_dataset)."""
    if nice > os.nice(0):
        os.nice(nice - os.nice(0))


def decode_chunks(
    batch: pa.Table, source: sources.ChunkSource, image_size: int, patch: int, nice: int = 0,
    errors_of_run: tuple[str, str] | None = None, decode: str = "cpu", per_table: int = DECODE_BATCH,
    fetch_threads: int = 1,
) -> Iterator[pa.Table]:
    """Chunk indices -> decoded rows, `per_table` images per yielded table. With
    `errors_of_run` (OUT, run id; --retry-errors) only the rows that are errors in the
    chunks' part files.

    One stage with one chunk per task, so that chunks stream through the run: as two
    fused stages Ray Data would give each task as many chunks as the larger batch size of
    the two, and the run would advance in a few large waves (benchmarks/README.md)."""
    lower_priority(nice)
    for chunk in batch.column("chunk").to_pylist():
        samples = source.samples(chunk, fetch_threads)
        if errors_of_run is not None:
            samples = error_samples(samples, chunk, *errors_of_run)
        try:
            yield from decode_samples(samples, chunk, image_size, patch, decode, per_table)
        except Exception as exc:  # noqa: BLE001 - the chunk is left to --resume, the run goes on
            logger.warning("chunk %d could not be read, left for --resume: %s", chunk, one_line(exc))
            yield failed_chunk_row(chunk, exc)


def failed_chunk_row(chunk: int, exc: BaseException) -> pa.Table:
    """The end row of a chunk that could not be read (its manifest slice, its shard's
    member index, ...): the writer drops the chunk and reports why; --resume labels it."""
    return pa.Table.from_pylist([{"chunk": chunk, "row": -1, "chunk_rows": CHUNK_FAILED, "uri": "", "image_id": "",
                                  "error": f"chunk {chunk} not read: {one_line(exc)}"}], schema=DECODED_SCHEMA)


class Infer(Labeler):
    """The inference stage of `sempart label` (an actor, the model loaded once): the
    Labeler, fed DECODED rows (images prepared by the decode tasks, or their encoded
    bytes with --decode gpu, decoded here on the model's device) and giving INFERRED
    rows (each image's map and ncut, or its device-finished label) to the finish tasks;
    or, given `finish_args` (finish "device" and no instances, so that only compressing
    runs is left), the finished rows themselves (`finish_batch`), for the writer: a
    finish task would cost more CPU per row than that work (benchmarks/README.md)."""

    def __init__(self, *args, finish_args: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.finish_args = finish_args

    def __call__(self, batch: pa.Table) -> pa.Table:
        inferred = self.inferred(batch)
        return inferred if self.finish_args is None else finish_batch(inferred, **self.finish_args)

    def inferred(self, batch: pa.Table) -> pa.Table:
        """DECODED rows -> INFERRED rows; a failure of the whole batch makes its images error rows."""
        try:
            return self.infer_decoded(batch)
        except Exception as exc:  # noqa: BLE001 - the block's images become error rows, the run goes on
            message = f"inference failed: {one_line(exc)}"
            failed = batch.drop_columns(["pixels", "error"]).append_column(
                "error", pa.array([e or message for e in batch.column("error").to_pylist()], pa.string()))
            for field in INFERRED_SCHEMA:
                if field.name not in failed.column_names:
                    failed = failed.append_column(field, pa.nulls(batch.num_rows, field.type))
            return failed.select(INFERRED_SCHEMA.names)

    def infer_decoded(self, batch: pa.Table) -> pa.Table:
        started = time.thread_time()  # this thread's CPU: torch computes in it (one thread per actor on CPU)
        n = batch.num_rows
        errors = batch.column("error").to_pylist()
        sizes = {name: batch.column(name).to_pylist() for name in ("in_h", "in_w", "width", "height")}
        in_h, in_w, width, height = sizes["in_h"], sizes["in_w"], sizes["width"], sizes["height"]
        pixels = batch.column("pixels").to_pylist()
        images: list = [None] * n
        encoded = [i for i in range(n) if errors[i] is None and in_h[i] is None]
        prepared, decode_errors = self.decode_encoded([pixels[i] for i in encoded])
        for i, image, error in zip(encoded, prepared, decode_errors):
            errors[i] = error
            if image is not None:
                images[i] = image.pixels
                in_h[i], in_w[i] = image.pixels.shape[:2]
                height[i], width[i] = image.height, image.width
        for i in range(n):
            if errors[i] is None and images[i] is None:
                images[i] = np.frombuffer(pixels[i], np.uint8).reshape(in_h[i], in_w[i], 3)
        results = self.infer(images, errors, [(width[i], height[i]) for i in range(n)])
        images_in = sum(r is not None for r in results) or 1
        device_s = (time.thread_time() - started) / images_in
        columns = {name: pa.array(values, pa.int32()) for name, values in sizes.items()} | {
            "error": pa.array(errors, pa.string()),
            "device_s": pa.array([device_s if r is not None else None for r in results], pa.float64()),
            **result_columns(results, images, needs_image(self.predictor.instances)),
        }
        table = batch.drop_columns(["pixels", "error", *sizes])
        for name, values in columns.items():
            table = table.append_column(name, values)
        return table.select(INFERRED_SCHEMA.names).cast(INFERRED_SCHEMA)


def finish_batch(batch: pa.Table, post: PostConfig, model_id: str, run_id: str, nice: int = 0,
                 instances: InstanceConfig | None = None) -> pa.Table:
    """Probability maps -> table rows: mask at the original size, RLE, boxes, score,
    instances (`finish_rows`). A failure of the whole batch makes its images error rows
    (the run goes on)."""
    lower_priority(nice)
    try:
        return finish_rows(batch, post, model_id, run_id, instances)
    except Exception as exc:  # noqa: BLE001
        return finish_rows(batch.drop_columns(["error"]).append_column(
            "error", pa.array([e or f"postprocess failed: {one_line(exc)}" for e in batch.column("error").to_pylist()],
                              pa.string())), post, model_id, run_id, instances)


class ChunkInfer(Infer):
    """The inference stage with --decode gpu: the actor reads its chunks itself (image
    files `FETCH_THREADS` at a time), decodes them on its device and infers them (and
    finishes them, as `Infer`). So a chunk's bytes make one hop, storage to actor, with
    no decode tasks: such a task cost more CPU per row than fetching the bytes it carried
    (benchmarks/README.md).

    Fed chunk descriptors; yields what `decode_chunks` then `Infer` give, so the rows,
    error rows, end rows and given-up chunks are those of the task path."""

    def __init__(self, source: sources.ChunkSource, image_size: int, patch: int,
                 errors_of_run: tuple[str, str] | None, **infer_kwargs):
        super().__init__(**infer_kwargs)
        self.source, self.image_size, self.patch, self.errors_of_run = source, image_size, patch, errors_of_run

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for decoded in decode_chunks(batch, self.source, self.image_size, self.patch, errors_of_run=self.errors_of_run,
                                     decode="gpu", per_table=max(DECODE_BATCH, self.batch_size),
                                     fetch_threads=FETCH_THREADS):
            yield super().__call__(decoded)


class ChunkWriter:
    """Actor (exactly one): buffers rows per chunk, writes a chunk when it is complete:
    its end row has come (with the chunk's row count) and that many distinct rows.

    Emits one summary row per chunk it is done with: written, or given up (its decode
    task could not read it, or its file could not be written: the row's `given_up` says
    why, and --resume labels it). Rows seen twice (a retried upstream task) are kept
    once; rows of a chunk it is done with are dropped.
    """

    def __init__(self, out: str | OutDir, run_id: str, nice: int = 0):
        lower_priority(nice)
        self.out, self.run_id = OutDir.at(out), run_id
        self.parts: dict[int, list[pa.Table]] = defaultdict(list)
        self.seen: dict[int, set[int]] = defaultdict(set)
        self.expected: dict[int, int] = {}
        # per chunk: S3 retries (its end row) and device seconds (its rows, each counted once)
        self.stats: dict[int, dict[str, float]] = defaultdict(lambda: dict.fromkeys(STAT_COLUMNS, 0))
        self.closed: set[int] = set()  # written or given up

    def __call__(self, batch: pa.Table) -> pa.Table:
        done = []
        chunks, rows = batch.column("chunk").to_numpy(), batch.column("row").to_numpy()
        ends, errors = batch.column("chunk_rows").to_pylist(), batch.column("error").to_pylist()
        retries, device_s = batch.column("s3_retries").to_pylist(), batch.column("device_s").to_pylist()
        for chunk in map(int, np.unique(chunks)):
            if chunk in self.closed:
                continue
            keep, failure, stats = [], None, self.stats[chunk]
            for i in np.flatnonzero(chunks == chunk):
                if ends[i] == CHUNK_FAILED:
                    failure = errors[i]
                elif ends[i] is not None:
                    self.expected[chunk] = ends[i]
                    stats["s3_retries"] += retries[i] or 0
                elif int(rows[i]) not in self.seen[chunk]:
                    self.seen[chunk].add(int(rows[i]))
                    stats["device_s"] += device_s[i] or 0.0
                    keep.append(i)
            if failure is not None:
                done.append(self.give_up(chunk, failure))
                continue
            if keep:
                self.parts[chunk].append(batch.take(pa.array(keep, pa.int64())))
            if len(self.seen[chunk]) == self.expected.get(chunk):
                done.append(self.write(chunk))
        progress = {"chunk": PROGRESS_ROW, "rows": batch.num_rows, **dict.fromkeys(STATUSES, 0)}  # for the watchdog
        return pa.Table.from_pylist(done + [progress], schema=SUMMARY_SCHEMA)

    def write(self, chunk: int) -> dict:
        """`flush`, or give the chunk up when its file cannot be written (storage that
        stays down through every retry): the run goes on, --resume writes it."""
        try:
            return self.flush(chunk)
        except Exception as exc:  # noqa: BLE001
            return self.give_up(chunk, f"chunk {chunk} not written: {one_line(exc)}")

    def flush(self, chunk: int) -> dict:
        stats, table = self.stats[chunk], self.take(chunk)
        counts = self.out.write_part(table, OutDir.part_name(self.run_id, chunk))
        return {"chunk": chunk, "rows": table.num_rows, **counts, **stats}

    def take(self, chunk: int) -> pa.Table:
        """The chunk's rows in order, as output rows; from now on the chunk is closed."""
        table = pa.concat_tables(self.parts.pop(chunk, []) or [ROWS_SCHEMA.empty_table()])
        table = table.sort_by("row").select(LABELS_SCHEMA.names)
        for state in (self.seen, self.expected, self.stats):
            state.pop(chunk, None)
        self.closed.add(chunk)
        return table

    def give_up(self, chunk: int, error: str) -> dict:
        """Drop the chunk's rows; its summary row says why."""
        logger.warning("%s: left for --resume", error)
        stats = self.stats[chunk]
        self.take(chunk)
        return {"chunk": chunk, "rows": 0, **dict.fromkeys(STATUSES, 0), **stats, "given_up": error}


class ErrorRetryWriter(ChunkWriter):
    """Actor (exactly one) for --retry-errors: once every error row of a part file is
    labelled again, the file is written again whole with those rows replaced, under its
    own name (OutDir.write_part: local temp + rename, on S3 one object replaced whole), so the
    table keeps one row per image whenever the run stops. Emits one summary row per
    file, counting the relabelled rows only."""

    def flush(self, chunk: int) -> dict:
        stats, relabelled = self.stats[chunk], self.take(chunk)
        name = OutDir.part_name(self.run_id, chunk)
        merged, attempts = merge_retried(self.out.read_part(name), relabelled, name)
        self.out.write_part(merged, name, attempts)
        return {"chunk": chunk, "rows": relabelled.num_rows, **status_counts(relabelled.column("status").to_pylist()),
                **stats}


def error_samples(
    samples: Iterator[sources.Sample], chunk: int, out: OutDir, run_id: str
) -> Iterator[sources.Sample]:
    """The samples of `chunk` that are error rows in its part file, which holds the
    chunk's samples in the same order (--retry-errors)."""
    name = OutDir.part_name(run_id, chunk)
    done = out.read_part(name, columns=["uri", "status"])
    uris_done, statuses = done.column("uri").to_pylist(), done.column("status").to_pylist()
    changed = RuntimeError(f"{name} does not hold the images of its chunk in order: the input changed since the run")
    count = 0
    for sample in samples:
        if count >= len(uris_done) or sample.uri != uris_done[count]:
            raise changed
        if statuses[count] == STATUS_ERROR:
            yield sample
        count += 1
    if count != len(uris_done):
        raise changed


def merge_retried(old: pa.Table, relabelled: pa.Table, name: str) -> tuple[pa.Table, dict[str, int]]:
    """A part file's table with its error rows replaced by `relabelled` (their new rows,
    in order), and the attempts per image_id of every row tried more than once."""
    uris = old.column("uri").to_pylist()
    positions = [i for i, s in enumerate(old.column("status").to_pylist()) if s == STATUS_ERROR]
    if [uris[i] for i in positions] != relabelled.column("uri").to_pylist():
        raise RuntimeError(f"{name} changed while its errors were labelled again: run --retry-errors again")
    index = np.arange(old.num_rows)
    index[positions] = old.num_rows + np.arange(len(positions))
    both = pa.concat_tables([conform(t).replace_schema_metadata(None) for t in (old, relabelled)])
    attempts = json.loads((old.schema.metadata or {}).get(ATTEMPTS_KEY, b"{}"))
    for image_id in relabelled.column("image_id").to_pylist():
        attempts[image_id] = attempts.get(image_id, 1) + 1
    return both.take(index), attempts


STAT_COLUMNS = ("s3_retries", "device_s")  # summed per chunk by the writer, then by `consume`
SUMMARY_SCHEMA = pa.schema(
    [("chunk", pa.int64()), ("rows", pa.int64())] + [(s, pa.int64()) for s in STATUSES]
    + [("s3_retries", pa.int64()),  # of the chunk's reads (storage.read_object)
       ("device_s", pa.float64()),  # of its rows in the inference actors' device stages
       ("given_up", pa.string())]  # why a chunk was given up; null when its file was written
)


# ---------------------------------------------------------------- driver


def _new_run(opts: LabelOptions, out: OutDir, model_id: str) -> LabelRun:
    """Fix the run: its id, manifest (listed now if needed) and chunking."""
    if out.part_files():
        raise LabelUsageError(f"{out.name} already holds part files of another run: use a new OUT")
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    src = sources.InputSource.resolve(opts.input, opts.image_column)
    if src.kind == sources.SHARDS and (opts.rows_per_file is not None or opts.limit is not None):
        raise LabelUsageError("--rows-per-file and --limit do not apply to .tar shards (one file per shard): drop them")
    run = LabelRun(run_id=run_id, model_id=model_id, input_kind=src.kind, image_column=src.image_column,
                   manifest=None, manifest_rows=0, rows=0, limit=opts.limit, config=opts.public(), started_at=_now(),
                   rows_per_file=1 if src.kind == sources.SHARDS else opts.rows_per_file or DEFAULT_ROWS_PER_FILE,
                   instances=opts.instances or 0, instances_from=opts.instances_from or INSTANCE_MODES[0])
    if src.kind != sources.MANIFEST:
        run.manifest = OutDir.manifest_name(run_id)
        rows, schema = src.manifest_rows(opts.id_column)
        manifests.write_manifest(rows, out.manifest_of(run, opts.input), schema=schema)
    run.manifest_rows = manifests.manifest_rows(out.manifest_of(run, opts.input))
    run.rows = run.manifest_rows if opts.limit is None else min(run.manifest_rows, opts.limit)
    return run


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_resume(run: LabelRun, opts: LabelOptions, out: OutDir, model_id: str) -> None:
    """A resume must label the same images with the same model and chunking."""
    if run.model_id != model_id:
        raise LabelUsageError(
            f"{out.name} was labelled with model {run.model_id[:12]}, not {model_id[:12]}: use a new OUT"
        )
    for key in ("rows_per_file", "limit", "instances", "instances_from"):
        given, recorded = getattr(opts, key), getattr(run, key)
        if given is not None and given != recorded:
            raise LabelUsageError(f"--{key.replace('_', '-')} {given} differs from the run's {recorded}: drop it")
    if run.manifest is None and manifests.manifest_rows(opts.input) != run.manifest_rows:
        raise LabelUsageError(f"manifest {redact(opts.input)} changed since the run started: use a new OUT")
    if redact(opts.input) != run.config.get("input"):
        logger.warning("--input differs from the run's %s: resuming with the run's manifest", run.config.get("input"))


def _resources(opts: LabelOptions) -> tuple[bool, ResourcePlan, int]:
    """GPU or not, the resource plan (cluster.plan_workers: fails at once, with one line,
    when the actors cannot run on the cluster as it is) and the number of inference
    actors: one per GPU, or on CPU one per CPU."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    gpu = gpus > 0 if opts.gpu is None else opts.gpu
    if gpu and gpus == 0:
        raise LabelUsageError("--gpu given but the Ray cluster has no GPU: use --no-gpu")
    actors = opts.actors or max(gpus if gpu else int(resources.get("CPU", 1)), 1)
    return gpu, cluster_plan(actors, gpu), actors


@dataclass
class Job:
    """One invocation, resolved once: what `build_dataset` wires together."""

    opts: LabelOptions
    out: OutDir
    run: LabelRun
    art: ArtifactInfo
    manifest: str  # URI of the run's manifest
    gpu: bool
    plan: ResourcePlan
    actors: int


def build_dataset(job: Job, pending: list[int], retry: bool = False) -> ray.data.Dataset:
    """The streaming Ray Data pipeline over the pending chunks; yields summary rows.
    With `retry` (--retry-errors) it labels the error rows of those chunks' part files
    again and rewrites the files."""
    import ray

    opts, out, run, art, gpu, plan, actors = job.opts, job.out, job.run, job.art, job.gpu, job.plan, job.actors
    cfg = art.config
    patch = art.meta.get("patch_size")
    if patch is None:  # an artifact from before sempart.json recorded it
        from sempart_core.backbone import patch_size_of

        patch = patch_size_of(cfg.backbone.name)
    env = s3_env()
    remote = {"runtime_env": {"env_vars": env}} if env else {}
    # A decode worker holds Python with pyarrow and PIL (no torch), one image at the
    # pixel limit (3 bytes/px, ~0.27 GB) and the output block Ray Data fills (up to
    # DataContext.target_max_block_size, 128 MiB): reserve 1 GiB. As these resources
    # differ from the actors', Ray also keeps this CPU stage out of the inference actors
    # (it fuses a task stage into a following actor stage whose resources are equal).
    # The CPU stages reserve what the resource plan leaves them (cluster.plan_workers).
    cpu_stage = {**remote, "memory": DECODE_MEMORY, "num_cpus": plan.stage_cpus}
    # On CPU the model is the bottleneck and its threads take every core: the light
    # stages run at a lower priority, filling the moments the model leaves idle rather
    # than stalling its threads (measured in benchmarks/README.md, label_throughput).
    # On a GPU node decode is the stage to keep fed.
    nice = 0 if gpu else CPU_STAGE_NICE
    decode = opts.decode or ("gpu" if gpu else "cpu")
    finish = opts.finish or ("device" if gpu else "cpu")
    rows, per_file, run_id = run.rows, run.rows_per_file, run.run_id
    ds = ray.data.from_items([{"chunk": k} for k in pending], override_num_blocks=min(len(pending), 10_000))
    # No task error ends a run. The stages turn what they can into error rows or given-up
    # chunks (decode_chunks, Infer, finish_batch, ChunkWriter); a block that fails anyway
    # (a bug, a library error) is dropped, its chunk is unwritten and named at the end,
    # and --resume labels it. System failures (a lost node) are retried by Ray.
    ds.context.max_errored_blocks = -1
    source = sources.ChunkSource(kind=run.input_kind, manifest=job.manifest, rows_per_file=per_file, total=rows,
                                 out=out, run_id=run_id, image_column=run.image_column)
    errors_of_run = (out, run_id) if retry else None
    finish_args = {"post": cfg.post, "model_id": art.model_id, "run_id": run_id,
                   "instances": instance_config(run.instances, run.instances_from)}
    infer_kwargs = {"model": opts.model, "model_id": art.model_id, "device": "cuda" if gpu else "cpu",
                    "batch_size": opts.batch_size, "threads": plan.threads, "max_batch_tokens": opts.max_batch_tokens,
                    "decode": decode, "instances": run.instances, "instances_from": run.instances_from,
                    "finish": finish}
    # No finish tasks when the device finishes the maps and there are no instances to
    # refine: the inference actors give the writer its rows.
    finish_here = finish == "device" and not run.instances
    if finish_here:
        infer_kwargs["finish_args"] = finish_args
    if decode == "gpu":
        # The inference actors read their chunks and decode them on their device (nvJPEG
        # on a GPU, torchvision's decoder on a CPU): no decode tasks.
        infer, infer_batch = ChunkInfer, 1
        infer_kwargs |= {"source": source, "image_size": cfg.data.image_size, "patch": patch,
                         "errors_of_run": errors_of_run}
    else:
        infer, infer_batch = Infer, opts.batch_size
        ds = ds.map_batches(
            decode_chunks, batch_size=1, batch_format="pyarrow",
            fn_kwargs={"source": source, "image_size": cfg.data.image_size, "patch": patch, "nice": nice,
                       "errors_of_run": errors_of_run, "decode": decode},
            **cpu_stage,
        )
    infer_resources = {"num_cpus": plan.resources["CPU"], "num_gpus": plan.resources.get("GPU", 0.0)}
    if gpu:
        pool, infer_env = ray.data.ActorPoolStrategy(size=actors), env
    else:
        # On CPU the model is nearly all of the work. By default there is one actor per
        # CPU, each computing with one thread: a multi-threaded actor's threads wait on
        # each other whenever anything else takes a core (benchmarks/README.md). The
        # actors reserve the CPUs but one (cluster.plan_workers), which the decode/finish
        # tasks need, and compute with as many threads as they reserve whole CPUs (at
        # least one). Small blocks and one task in flight per actor give each actor about
        # one batch at a time, so that the actors share the work evenly to the end.
        pool = ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1)
        ds.context.target_max_block_size = CPU_BLOCK_BYTES
        # OpenMP threads that sleep rather than spin when another process takes a core:
        # spinning threads slow small ops many times over when a core is busy.
        infer_env = {**env, "OMP_WAIT_POLICY": "PASSIVE"}
    if decode == "gpu":
        # No images flow between stages, only rows (~1 KB each): small blocks bring a
        # chunk's rows to the writer, and to the stall watchdog, as the actor makes them.
        # Ray Data's default (128 MiB) would hold them to the chunk's end: with 100,000
        # rows per file, minutes. Each block costs CPU in the actor, the driver and the
        # writer (256 KiB blocks: ~0.2 CPU-ms per row more than whole chunks, measured in
        # benchmarks/README.md), hence ~1,000 rows on a GPU, a few seconds of work; on a
        # CPU, where a row can take a second, a quarter of that.
        ds.context.target_max_block_size = ROW_BLOCK_BYTES if gpu else ROW_BLOCK_BYTES // 4
    ds = ds.map_batches(
        infer, batch_size=infer_batch, batch_format="pyarrow", compute=pool, **infer_resources,
        fn_constructor_kwargs=infer_kwargs, **({"runtime_env": {"env_vars": infer_env}} if infer_env else {}),
    )
    if not finish_here:
        ds = ds.map_batches(finish_batch, batch_size=16, batch_format="pyarrow", fn_kwargs={**finish_args, "nice": nice},
                            num_cpus=plan.stage_cpus, **remote)
    return ds.map_batches(
        ErrorRetryWriter if retry else ChunkWriter, batch_size=None, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0,
        fn_constructor_kwargs={"out": out, "run_id": run_id, "nice": nice},
        **remote,
    )


def _missing(chunks: list[int]) -> str:
    """A short list of chunk indices for a one-line message."""
    shown = ", ".join(map(str, chunks[:10]))
    return shown + (f" and {len(chunks) - 10} more" if len(chunks) > 10 else "")


def _stream(ds: ray.data.Dataset, events: queue.Queue) -> None:
    """Iterate the pipeline's output into `events`; then None, or the error it raised."""
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            events.put(batch)
    except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread
        events.put(exc)
    else:
        events.put(None)


def _stop(ds: ray.data.Dataset) -> None:
    """Shut down the pipeline's executor (its actors and tasks). Ray Data has no public
    call for this; the executor of a running dataset is `_current_executor`."""
    executor = getattr(ds, "_current_executor", None)
    if executor is not None:
        try:
            executor.shutdown(force=True)
        except Exception as exc:  # noqa: BLE001 - the run fails with the stall error anyway
            logger.warning("could not shut the stalled pipeline down: %s", one_line(exc))


def consume(ds: ray.data.Dataset, pending: list[int], counts: dict[str, int], stall_timeout: float) -> Tally:
    """Run the pipeline, adding each written file's status counts to `counts` and
    logging progress; returns what the summary rows add up to. The driver sees one row
    per file and one per batch the writer takes (chunk PROGRESS_ROW).

    A watchdog: when the writer takes no row for `stall_timeout` seconds (Ray Data can
    wait forever on an actor pool whose actor died, or on a lost node's work), the
    pipeline is shut down and the run fails with one line naming the unwritten chunks.
    Chunks the pipeline gave up (unreadable, unwritable) are named the same way, with
    the first one's reason."""
    events: queue.Queue = queue.Queue()
    stream = threading.Thread(target=_stream, args=(ds, events), name="sempart-label-stream", daemon=True)
    written: set[int] = set()
    given_up: dict[int, str] = {}
    tally = Tally()
    start = last_log = time.perf_counter()
    with warnings.catch_warnings():
        # Ray Data warns when an actor pool gets fewer input blocks than actors; it counts
        # the chunk descriptors, yet each decode task yields many blocks.
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
        stream.start()
        while True:
            try:
                batch = events.get(timeout=stall_timeout)
            except queue.Empty:
                _stop(ds)
                # A short grace for the stream to end with the executor; a stalled iterator
                # may never return, and its thread is a daemon. Files written meanwhile
                # are on storage, where --resume looks.
                stream.join(timeout=STREAM_STOP_GRACE_S)
                missing = sorted(set(pending) - written)
                raise IncompleteRunError(
                    f"no progress for {stall_timeout:g} s (--stall-timeout): {len(missing)} of {len(pending)} "
                    f"files not written (chunks {_missing(missing)}): run again with --resume", tally
                ) from None
            if batch is None:
                break
            if isinstance(batch, BaseException):
                raise batch
            if tally.first_row_s is None:
                tally.first_row_s = time.perf_counter() - start
                taken = sum(r for c, r in zip(batch.column("chunk").to_pylist(), batch.column("rows").to_pylist())
                            if c == PROGRESS_ROW)
                logger.info("first rows at the writer after %.1f s (%d rows)", tally.first_row_s, taken)
            for rec in batch.to_pylist():
                if rec["chunk"] == PROGRESS_ROW:
                    continue
                tally.s3_retries += rec["s3_retries"] or 0
                tally.device_s += rec["device_s"] or 0.0
                if rec["given_up"] is not None:
                    given_up[rec["chunk"]] = rec["given_up"]
                    continue
                written.add(rec["chunk"])
                tally.rows += rec["rows"]
                for s in STATUSES:
                    counts[s] += rec[s]
            if time.perf_counter() - last_log > PROGRESS_EVERY_S:
                last_log = time.perf_counter()
                logger.info("progress: %d/%d files, %d images, %.2f images/s",
                            len(written), len(pending), tally.rows, tally.rows / (last_log - start))
    missing = sorted(set(pending) - written)
    if missing:
        first = min(given_up, default=None)
        raise IncompleteRunError(
            f"{len(missing)} of {len(pending)} files were not written (chunks {_missing(missing)}): "
            "run again with --resume" + (f" ({given_up[first]})" if first is not None else ""), tally
        )
    return tally


def run_label(opts: LabelOptions) -> LabelSummary:
    """Label every image of the input into OUT (or finish an interrupted run; with
    retry_errors, then label the error rows of its part files again)."""
    from sempart_core.artifact import read_artifact_info

    t0, s3_retries_before = time.perf_counter(), storage.retries()
    if opts.batch_size < 1 or (opts.rows_per_file or 1) < 1 or (opts.actors or 1) < 1 or (opts.limit or 0) < 0:
        raise LabelUsageError("--batch-size, --rows-per-file and --actors must be >= 1, --limit >= 0")
    if opts.max_batch_tokens < 1:
        raise LabelUsageError(f"--max-batch-tokens must be >= 1, got {opts.max_batch_tokens}")
    if opts.decode not in (None, "gpu", "cpu") or opts.finish not in (None, "device", "cpu"):
        raise LabelUsageError(f"--decode takes gpu or cpu and --finish device or cpu, not {opts.decode!r}, "
                              f"{opts.finish!r}")
    if (opts.instances or 0) < 0 or opts.instances_from not in (None, *INSTANCE_MODES):
        raise LabelUsageError(f"--instances takes N >= 0 and --instances-from {' or '.join(INSTANCE_MODES)}")
    if opts.retry_errors and not opts.resume:
        raise LabelUsageError("--retry-errors relabels the error rows of the run in OUT: add --resume")
    art = read_artifact_info(opts.model)  # sempart.json only: the driver needs no torch
    out = OutDir.at(opts.out)
    run = out.find_run()
    if run is not None and not opts.resume:
        raise LabelUsageError(f"{out.name} already holds run {run.run_id}: pass --resume to finish it, or use a new OUT")
    if run is None and opts.retry_errors:
        raise LabelUsageError(f"{out.name} holds no run to retry: label into it first")
    resumed = run is not None
    if run is not None:
        _check_resume(run, opts, out, art.model_id)
        logger.info("resuming run %s in %s", run.run_id, out.name)
    else:
        run = _new_run(opts, out, art.model_id)
        out.save_run(run)
        logger.info("run %s: %d images -> %s", run.run_id, run.rows, out.name)
    t_list = time.perf_counter() - t0
    out.remove_temp_files()
    done = {k: p for k, p in out.done_chunks(run.run_id).items() if k < run.chunks}
    per_file = dict(zip(done, out.footer_counts(list(done.values()))))
    counts = sum_counts(per_file.values())
    pending = [k for k in range(run.chunks) if k not in done]
    # Files finished before this invocation; those it writes now got their first try.
    retry = {k: c[STATUS_ERROR] for k, c in per_file.items() if c[STATUS_ERROR]} if opts.retry_errors else {}
    logger.info("%d of %d chunks to label (%d rows per file)", len(pending), run.chunks, run.rows_per_file)

    t1 = time.perf_counter()
    labelled, retried, relabelled, t2 = 0, 0, dict.fromkeys(STATUSES, 0), t1
    if pending or retry:
        init_ray()
        job = Job(opts, out, run, art, out.manifest_of(run, opts.input), *_resources(opts))
        t2 = time.perf_counter()
    passes: list[Tally] = []
    try:
        if pending:
            passes.append(consume(build_dataset(job, pending), pending, counts, opts.stall_timeout))
            labelled = passes[-1].rows
        if retry:
            logger.info("labelling again %d error rows in %d part files", sum(retry.values()), len(retry))
            passes.append(consume(build_dataset(job, sorted(retry), retry=True), sorted(retry), relabelled,
                                  opts.stall_timeout))
            retried = passes[-1].rows
    except IncompleteRunError as exc:  # the record keeps what this invocation met
        run.s3_retries += sum(t.s3_retries for t in [*passes, exc.tally]) + storage.retries() - s3_retries_before
        try:
            out.save_run(run)
        except Exception as save_error:  # noqa: BLE001 - the run's own error is the one to report
            logger.warning("could not update the run record: %s", one_line(save_error))
        raise
    if retry:
        labelled += retried
        counts = {s: counts[s] + relabelled[s] for s in STATUSES}
        counts[STATUS_ERROR] -= retried
        run.retries.append(RetryRecord(at=_now(), files=len(retry), rows=retried, **relabelled))
    t_label = time.perf_counter() - t2
    total_s = time.perf_counter() - t0
    timings = {"setup_and_listing_s": t_list, "ray_start_s": t2 - t1, "label_s": t_label, "total_s": total_s,
               "first_row_s": passes[0].first_row_s if passes and passes[0].first_row_s is not None else 0.0,
               "device_cpu_s": sum(t.device_s for t in passes)}
    summary = LabelSummary(
        run_id=run.run_id, counts=counts, total=sum(counts.values()), labelled_now=labelled,
        seconds=total_s, images_per_s=labelled / t_label if labelled else 0.0,
        table=f"{out.name.rstrip('/')}/{PART_PATTERN}", resumed=resumed,
        timings={k: round(v, 3) for k, v in timings.items()},
        retried=retried, still_errors=relabelled[STATUS_ERROR],
    )
    run.status, run.counts, run.finished_at = "finished", counts, _now()
    run.invocations += 1
    run.s3_retries += sum(t.s3_retries for t in passes) + storage.retries() - s3_retries_before
    if labelled or run.timings is None:  # throughput of the last invocation that labelled
        run.timings, run.labelled_last = summary.timings, labelled
        run.images_per_s, run.last_config = round(summary.images_per_s, 3), opts.public()
    out.save_run(run)
    return summary
