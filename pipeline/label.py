"""`sempart label`: manifest -> fetch + decode -> model (actor pool) -> masks -> Parquet.

Stages (Ray Data, streaming; see DESIGN.md "Labelling pipeline"):
  1. chunk descriptors -> manifest rows (`read_manifest_slice`, pyarrow file system)
  2. fetch bytes, `decode_image`, `prepare_image`; a bad image becomes an error row,
     never a failed block (1 and 2: one CPU task per chunk)
  3. actor pool: the model loaded once per actor, `Predictor.infer` per group of equal
     prepared shapes (one GPU per actor with --gpu; bf16 inside the Predictor)
  4. CPU tasks: `finish_raw` (resize, threshold, boxes, score), COCO RLE
  5. one writer actor: collects each chunk's rows and writes the chunk's file.

Exactly once. The manifest is fixed when a run starts (a folder or URI list is listed
into OUT/_manifests/<run_id>.parquet), and chunk k is its rows
[k * rows_per_file, (k + 1) * rows_per_file). Chunk k is written to exactly one file,
OUT/part-<run_id>-<k:06d>.parquet, only once all of its rows are there: locally under
OUT/_tmp/ and then renamed (atomic), on S3 straight to the key (an object appears only
when its upload completes). So the readable table, OUT/part-*.parquet, is always a set
of complete chunks; a kill at any moment loses at most the chunks in flight, and
`--resume` lists the part files, skips their chunks and labels the rest. A chunk
written twice (a zombie writer of a killed run) lands under the same name with the same
rows. The run's settings live in OUT/_runs/<run_id>.json, so a resume keeps the run id,
manifest and chunking. Readers skip `_`-prefixed paths (_tmp, _runs, _manifests).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import manifest as manifests
from pipeline.cluster import init_ray, worker_resources
from pipeline.schema import LABELS_SCHEMA, SCHEMA_VERSION, STATUS_ERROR, image_id_for
from pipeline.storage import is_s3, pyarrow_filesystem, pyarrow_s3, redact, s3_env
from sempart_core import uri as uris
from sempart_core.config import PostConfig
from sempart_core.images import decode_image, prepare_image
from sempart_core.postprocess import RawPrediction, finish_raw

if TYPE_CHECKING:
    import ray

    from sempart_core.artifact import ArtifactInfo

logger = logging.getLogger(__name__)

DEFAULT_ROWS_PER_FILE = 1000
DEFAULT_BATCH_SIZE = 8
COUNTS_KEY = b"sempart_counts"  # per-file status counts in the Parquet footer
STATUSES = ("ok", "empty", "error")
PROGRESS_EVERY_S = 10.0
DEFAULT_STALL_TIMEOUT_S = 300.0
PROGRESS_ROW = -1  # the chunk of the writer's per-batch row: rows taken, none written yet
DECODE_MEMORY = 2**30  # bytes reserved per decode task (see build_dataset)
DECODE_BATCH = 16  # images per table yielded by a decode task
CPU_STAGE_NICE = 10  # scheduling priority of the light stages when the model runs on CPU
CPU_BLOCK_BYTES = 2**20  # block size on CPU: a few 320 px images, so an actor task is ~one batch

DECODED_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("error", pa.string()),
        ("in_h", pa.int32()),
        ("in_w", pa.int32()),
        ("pixels", pa.large_binary()),  # prepared uint8 [in_h, in_w, 3]
    ]
)
INFERRED_SCHEMA = DECODED_SCHEMA.remove(DECODED_SCHEMA.get_field_index("pixels")).append(
    pa.field("prob", pa.large_binary())  # float32 [in_h, in_w]
).append(pa.field("ncut", pa.float64()))
ROWS_SCHEMA = LABELS_SCHEMA.insert(0, pa.field("row", pa.int64()))


class LabelUsageError(ValueError):
    """A setting the user must change (mismatched resume, no GPU for --gpu, ...)."""


class IncompleteRunError(RuntimeError):
    """The pipeline ended with chunks unwritten (e.g. the writer actor was restarted)."""


@dataclass
class LabelOptions:
    """The flags of `sempart label` (and jobs/label_job.py)."""

    model: str
    input: str
    out: str
    resume: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    actors: int | None = None  # default: one per GPU with --gpu, else 1
    gpu: bool | None = None  # default: use GPUs when the cluster has some
    rows_per_file: int | None = None  # default DEFAULT_ROWS_PER_FILE; fixed per run
    limit: int | None = None  # first N manifest rows; fixed per run
    stall_timeout: float = DEFAULT_STALL_TIMEOUT_S  # fail when no row reaches the writer for this long

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

    @property
    def exit_code(self) -> int:
        return 1 if self.counts.get(STATUS_ERROR, 0) else 0

    def line(self) -> str:
        c = self.counts
        return (
            f"labelled {self.total} images (ok {c['ok']}, empty {c['empty']}, error {c['error']}); "
            f"this run {self.labelled_now} in {self.seconds:.1f} s, {self.images_per_s:.2f} images/s; "
            f"run {self.run_id}; table {self.table}"
        )


# ---------------------------------------------------------------- stage functions


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


@functools.lru_cache(maxsize=1)
def _s3_fs() -> pafs.S3FileSystem:
    return pyarrow_s3()  # one client per worker process, not per image


def fetch_bytes(uri: str) -> bytes:
    """The object's bytes, through pyarrow (local path, file:// or s3://)."""
    if is_s3(uri):
        parsed = urlparse(uri)
        fs, path = _s3_fs(), f"{parsed.netloc}{parsed.path}"
    else:
        fs, path = pyarrow_filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_chunks(batch: pa.Table, manifest: str, rows_per_file: int, total: int) -> pa.Table:
    """Chunk indices -> their manifest rows (row, uri, image_id)."""
    tables = []
    for k in batch.column("chunk").to_pylist():
        start = k * rows_per_file
        tables.append(manifests.read_manifest_slice(manifest, start, min(start + rows_per_file, total)))
    return pa.concat_tables(tables)


def decode_batch(batch: pa.Table, image_size: int, patch: int) -> pa.Table:
    """Fetch, decode and prepare each image; any failure becomes that row's error."""
    out = []
    for row, uri, image_id in zip(*(batch.column(c).to_pylist() for c in ("row", "uri", "image_id"))):
        rec = {"row": row, "uri": uri, "image_id": image_id or image_id_for(uri)}
        try:
            rgb = decode_image(fetch_bytes(uri))
            rec.update(height=rgb.shape[0], width=rgb.shape[1])
            prepared = np.ascontiguousarray(prepare_image(rgb, image_size, patch))
            rec.update(in_h=prepared.shape[0], in_w=prepared.shape[1], pixels=prepared.tobytes())
        except Exception as exc:  # noqa: BLE001 - bad input must not fail the block
            rec["error"] = _one_line(exc)
        out.append(rec)
    return pa.Table.from_pylist(out, schema=DECODED_SCHEMA)


def lower_priority(nice: int) -> None:
    """Run this worker at niceness `nice` (at least), so that its light work fills the
    cores' idle moments instead of preempting the CPU model's threads (see build_dataset)."""
    if nice > os.nice(0):
        os.nice(nice - os.nice(0))


def decode_chunks(
    batch: pa.Table, manifest: str, rows_per_file: int, total: int, image_size: int, patch: int, nice: int = 0
) -> Iterator[pa.Table]:
    """Chunk indices -> decoded rows, DECODE_BATCH images per yielded table.

    One stage run with one chunk per task: as two fused stages (read_chunks, then
    decode_batch with batch_size 16), Ray Data gave each task 16 chunk indices (the
    larger batch size of the two), so each stage held 16,000 images in one block and
    the run advanced in a few large waves."""
    lower_priority(nice)
    rows = read_chunks(batch, manifest, rows_per_file, total)
    for start in range(0, rows.num_rows, DECODE_BATCH):
        yield decode_batch(rows.slice(start, DECODE_BATCH), image_size, patch)


class Infer:
    """Actor: the model, loaded once; infers each group of equally prepared images."""

    def __init__(self, model: str, model_id: str, device: str, batch_size: int, threads: int | None = None):
        from sempart_core.artifact import ArtifactError
        from sempart_core.predictor import load_predictor

        if threads:  # CPU inference: Ray set OMP_NUM_THREADS for the actor's reserved CPUs
            import torch

            torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        self.predictor = load_predictor(model, device=device, batch_size=batch_size)
        if self.predictor.model_id != model_id:  # rows must carry the model that made them
            raise ArtifactError(f"model {redact(model)} changed since the run started: use a new OUT")
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch.column("error").to_pylist()
        in_h, in_w = batch.column("in_h").to_pylist(), batch.column("in_w").to_pylist()
        pixels = batch.column("pixels").to_pylist()
        probs: list[bytes | None] = [None] * n
        ncuts: list[float | None] = [None] * n
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in range(n):
            if errors[i] is None:
                groups[(in_h[i], in_w[i])].append(i)
        for (h, w), idx in groups.items():
            for s in range(0, len(idx), self.batch_size):
                part = idx[s : s + self.batch_size]
                try:
                    images = np.stack([np.frombuffer(pixels[i], np.uint8).reshape(h, w, 3) for i in part])
                    for i, raw in zip(part, self.predictor.infer(images)):
                        probs[i], ncuts[i] = raw.prob.astype(np.float32).tobytes(), raw.ncut
                except Exception as exc:  # noqa: BLE001 - one bad batch, not the block
                    for i in part:
                        errors[i] = f"inference failed: {_one_line(exc)}"
        table = batch.drop_columns(["pixels", "error"])
        table = table.append_column("error", pa.array(errors, pa.string()))
        table = table.append_column("prob", pa.array(probs, pa.large_binary()))
        table = table.append_column("ncut", pa.array(ncuts, pa.float64()))
        return table.select(INFERRED_SCHEMA.names).cast(INFERRED_SCHEMA)


def finish_batch(batch: pa.Table, post: PostConfig, model_id: str, run_id: str, nice: int = 0) -> pa.Table:
    """Probability maps -> table rows: mask at the original size, RLE, boxes, score."""
    lower_priority(nice)
    now = datetime.now(timezone.utc)
    out = []
    for r in batch.to_pylist():
        rec = {k: r[k] for k in ("row", "image_id", "uri", "width", "height")}
        rec.update(model_id=model_id, run_id=run_id, labeled_at=now, error=r["error"])
        if r["error"] is None:
            try:
                prob = np.frombuffer(r["prob"], np.float32).reshape(r["in_h"], r["in_w"]).copy()
                pred = finish_raw(RawPrediction(prob, r["ncut"]), r["height"], r["width"], post)
                rec.update(
                    status=pred.status, mask_rle=pred.rle(), mask_area=pred.mask_area, box=pred.box,
                    boxes=pred.boxes, score=pred.score, ncut=pred.ncut,
                )
            except Exception as exc:  # noqa: BLE001
                rec["error"] = f"postprocess failed: {_one_line(exc)}"
        if rec["error"] is not None:
            rec["status"] = STATUS_ERROR
        out.append(rec)
    return pa.Table.from_pylist(out, schema=ROWS_SCHEMA)


def part_name(run_id: str, chunk: int) -> str:
    return f"part-{run_id}-{chunk:06d}.parquet"


def write_part(table: pa.Table, out: str, name: str) -> None:
    """Write one file so that readers see all of it or nothing (see module doc)."""
    fs, root = pyarrow_filesystem(out)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(f"{root}/_tmp", exist_ok=True)
        tmp = f"{root}/_tmp/{name}.{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, f"{root}/{name}")
    else:
        pq.write_table(table, f"{root}/{name}", filesystem=fs, compression="zstd")


class ChunkWriter:
    """Actor (exactly one): buffers rows per chunk, writes a chunk when it is complete.

    Emits one summary row per written file. Rows seen twice (a retried upstream task)
    are kept once; rows of a chunk already written are dropped.
    """

    def __init__(self, out: str, run_id: str, rows_per_file: int, total: int, nice: int = 0):
        lower_priority(nice)
        self.out, self.run_id, self.rows_per_file, self.total = out, run_id, rows_per_file, total
        self.parts: dict[int, list[pa.Table]] = defaultdict(list)
        self.seen: dict[int, set[int]] = defaultdict(set)
        self.written: set[int] = set()

    def expected(self, chunk: int) -> int:
        return min(self.rows_per_file, self.total - chunk * self.rows_per_file)

    def __call__(self, batch: pa.Table) -> pa.Table:
        done = []
        rows = batch.column("row").to_numpy()
        chunks = rows // self.rows_per_file
        for chunk in map(int, np.unique(chunks)):
            if chunk in self.written:
                continue
            keep = [i for i in np.flatnonzero(chunks == chunk) if int(rows[i]) not in self.seen[chunk]]
            self.seen[chunk].update(int(rows[i]) for i in keep)
            self.parts[chunk].append(batch.take(keep))
            if len(self.seen[chunk]) == self.expected(chunk):
                done.append(self.flush(chunk))
        progress = {"chunk": PROGRESS_ROW, "rows": batch.num_rows, **dict.fromkeys(STATUSES, 0)}  # for the watchdog
        return pa.Table.from_pylist(done + [progress], schema=SUMMARY_SCHEMA)

    def flush(self, chunk: int) -> dict:
        table = pa.concat_tables(self.parts.pop(chunk)).sort_by("row").drop_columns(["row"])
        del self.seen[chunk]
        self.written.add(chunk)
        counts = status_counts(table.column("status").to_pylist())
        meta = {**LABELS_SCHEMA.metadata, COUNTS_KEY: json.dumps(counts).encode()}
        write_part(table.cast(LABELS_SCHEMA).replace_schema_metadata(meta), self.out, part_name(self.run_id, chunk))
        return {"chunk": chunk, "rows": table.num_rows, **counts}


SUMMARY_SCHEMA = pa.schema([("chunk", pa.int64()), ("rows", pa.int64())] + [(s, pa.int64()) for s in STATUSES])


def status_counts(statuses: list[str]) -> dict[str, int]:
    return {s: statuses.count(s) for s in STATUSES}


# ---------------------------------------------------------------- run state on disk


def _runs_dir(out: str) -> str:
    return uris.join(out, "_runs")


def find_run(out: str) -> dict | None:
    """The run recorded in OUT/_runs/ (one run per OUT), or None."""
    fs, root = pyarrow_filesystem(_runs_dir(out))
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    docs = [i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".json")]
    if len(docs) > 1:
        raise LabelUsageError(f"{redact(out)} holds {len(docs)} runs in _runs/: label into a new OUT")
    if not docs:
        return None
    return json.loads(uris.read_bytes(uris.join(_runs_dir(out), docs[0].base_name)))


def save_run(out: str, state: dict) -> None:
    uris.write_bytes(uris.join(_runs_dir(out), f"{state['run_id']}.json"), json.dumps(state, indent=2).encode())


def done_chunks(out: str, run_id: str) -> dict[int, str]:
    """Chunk index -> path of every finished part file of this run (temp files excluded)."""
    fs, root = pyarrow_filesystem(out)
    pattern = re.compile(rf"^part-{re.escape(run_id)}-(\d+)\.parquet$")
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        m = pattern.match(info.base_name)
        if m and info.type == pafs.FileType.File:
            found[int(m.group(1))] = info.path
    return found


def counts_of(out: str, paths: list[str]) -> dict[str, int]:
    """Status counts of finished part files, from their footers only."""
    fs, _ = pyarrow_filesystem(out)
    totals = dict.fromkeys(STATUSES, 0)

    def footer(path: str) -> dict[str, int]:
        return json.loads(pq.read_metadata(path, filesystem=fs).metadata[COUNTS_KEY])

    with ThreadPoolExecutor(16) as pool:
        for c in pool.map(footer, paths):
            for s in STATUSES:
                totals[s] += c[s]
    return totals


def remove_temp_files(out: str) -> None:
    """Leftovers of a killed local writer (S3 writes leave no visible partial object)."""
    fs, root = pyarrow_filesystem(out)
    if isinstance(fs, pafs.LocalFileSystem) and fs.get_file_info(f"{root}/_tmp").type == pafs.FileType.Directory:
        fs.delete_dir_contents(f"{root}/_tmp")


# ---------------------------------------------------------------- driver


def _new_run(opts: LabelOptions, model_id: str) -> dict:
    """Fix the run: its id, manifest (listed now if needed) and chunking."""
    fs, root = pyarrow_filesystem(opts.out)
    if any(i.base_name.startswith("part-") for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))):
        raise LabelUsageError(f"{redact(opts.out)} already holds part files of another run: use a new OUT")
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    kind = manifests.source_kind(opts.input)
    manifest_rel = None
    if kind != "manifest":
        manifest_rel = f"_manifests/{run_id}.parquet"
        manifests.write_manifest(manifests.input_rows(opts.input), uris.join(opts.out, manifest_rel))
    manifest = uris.join(opts.out, manifest_rel) if manifest_rel else opts.input
    n = manifests.manifest_rows(manifest)
    return {
        "run_id": run_id,
        "status": "running",
        "schema_version": SCHEMA_VERSION,
        "model_id": model_id,
        "input_kind": kind,
        "manifest": manifest_rel,  # relative to OUT; null: the input is the manifest
        "manifest_rows": n,
        "rows": n if opts.limit is None else min(n, opts.limit),
        "rows_per_file": opts.rows_per_file or DEFAULT_ROWS_PER_FILE,
        "limit": opts.limit,
        "config": opts.public(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "invocations": 0,
    }


def _check_resume(state: dict, opts: LabelOptions, model_id: str) -> None:
    """A resume must label the same images with the same model and chunking."""
    if state["model_id"] != model_id:
        raise LabelUsageError(
            f"{redact(opts.out)} was labelled with model {state['model_id'][:12]}, not {model_id[:12]}: use a new OUT"
        )
    for key in ("rows_per_file", "limit"):
        given = getattr(opts, key)
        if given is not None and given != state[key]:
            raise LabelUsageError(f"--{key.replace('_', '-')} {given} differs from the run's {state[key]}: drop it")
    if state["manifest"] is None and manifests.manifest_rows(opts.input) != state["manifest_rows"]:
        raise LabelUsageError(f"manifest {redact(opts.input)} changed since the run started: use a new OUT")
    if redact(opts.input) != state["config"]["input"]:
        logger.warning("--input differs from the run's %s: resuming with the run's manifest", state["config"]["input"])


def _resources(opts: LabelOptions) -> tuple[bool, int]:
    """GPU or not, and the inference actors: one per GPU, or on CPU one per CPU."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    gpu = gpus > 0 if opts.gpu is None else opts.gpu
    if gpu and gpus == 0:
        raise LabelUsageError("--gpu given but the Ray cluster has no GPU: use --no-gpu")
    actors = opts.actors or max(gpus if gpu else int(resources.get("CPU", 1)), 1)
    return gpu, actors


def build_dataset(
    pending: list[int], manifest: str, state: dict, art: ArtifactInfo, opts: LabelOptions, gpu: bool, actors: int
) -> ray.data.Dataset:
    """The streaming Ray Data pipeline over the pending chunks; yields summary rows."""
    import ray

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
    cpu_stage = {**remote, "memory": DECODE_MEMORY}
    # On CPU the model is the bottleneck and its threads take every core: the light
    # stages run at a lower priority, filling the moments the model leaves idle rather
    # than stalling its threads (a load of 10 % of one core slowed the model 6.5 % at
    # equal priority, 1 % at nice 10). On a GPU node decode is the stage to keep fed.
    nice = 0 if gpu else CPU_STAGE_NICE
    rows, per_file, run_id = state["rows"], state["rows_per_file"], state["run_id"]
    ds = ray.data.from_items([{"chunk": k} for k in pending], override_num_blocks=min(len(pending), 10_000))
    ds = ds.map_batches(
        decode_chunks, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"manifest": manifest, "rows_per_file": per_file, "total": rows,
                   "image_size": cfg.data.image_size, "patch": patch, "nice": nice},
        **cpu_stage,
    )
    per_actor, _ = worker_resources(actors, gpu)
    infer_resources = {"num_cpus": per_actor["CPU"], "num_gpus": per_actor.get("GPU", 0.0)}
    if gpu:
        threads, pool, infer_env = None, ray.data.ActorPoolStrategy(size=actors), env
    else:
        # On CPU the model is nearly all of the work. By default there is one actor per
        # CPU, each computing with one thread: two 1-thread actors labelled 0.97 s per
        # image here where one 2-thread actor took 1.05 (its threads wait on each other
        # whenever anything else takes a core). The actors reserve the CPUs but one
        # (worker_resources), which the decode/finish tasks need, yet compute on their
        # share of all of them. Small blocks and one task in flight per actor give each
        # actor about one batch at a time, so that the actors share the work evenly to
        # the end of the run.
        threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // actors)
        pool = ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1)
        ds.context.target_max_block_size = CPU_BLOCK_BYTES
        # OpenMP threads that sleep rather than spin when another process takes a core
        # (spinning threads made small ops ~50x slower here when a core was busy).
        infer_env = {**env, "OMP_WAIT_POLICY": "PASSIVE"}
    ds = ds.map_batches(
        Infer, batch_size=opts.batch_size, batch_format="pyarrow", compute=pool, **infer_resources,
        fn_constructor_kwargs={"model": opts.model, "model_id": art.model_id, "device": "cuda" if gpu else "cpu",
                               "batch_size": opts.batch_size, "threads": threads},
        **({"runtime_env": {"env_vars": infer_env}} if infer_env else {}),
    )
    ds = ds.map_batches(
        finish_batch, batch_size=16, batch_format="pyarrow",
        fn_kwargs={"post": cfg.post, "model_id": art.model_id, "run_id": run_id, "nice": nice}, **remote,
    )
    return ds.map_batches(
        ChunkWriter, batch_size=None, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0,
        fn_constructor_kwargs={"out": opts.out, "run_id": run_id, "rows_per_file": per_file, "total": rows,
                               "nice": nice},
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
            logger.warning("could not shut the stalled pipeline down: %s", _one_line(exc))


def consume(ds: ray.data.Dataset, pending: list[int], counts: dict[str, int], stall_timeout: float) -> int:
    """Run the pipeline, adding each written file's status counts to `counts` and
    logging progress; returns the rows written. The driver sees one row per file and
    one per batch the writer takes (chunk PROGRESS_ROW).

    A watchdog: when the writer takes no row for `stall_timeout` seconds (Ray Data can
    wait forever on an actor pool whose actor died, or on a lost node's work), the
    pipeline is shut down and the run fails with one line naming the unwritten chunks."""
    events: queue.Queue = queue.Queue()
    stream = threading.Thread(target=_stream, args=(ds, events), name="sempart-label-stream", daemon=True)
    written: set[int] = set()
    labelled = 0
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
                stream.join(timeout=30)
                missing = sorted(set(pending) - written)
                raise IncompleteRunError(
                    f"no progress for {stall_timeout:g} s (--stall-timeout): {len(missing)} of {len(pending)} "
                    f"files not written (chunks {_missing(missing)}): run again with --resume"
                ) from None
            if batch is None:
                break
            if isinstance(batch, BaseException):
                raise batch
            for rec in batch.to_pylist():
                if rec["chunk"] == PROGRESS_ROW:
                    continue
                written.add(rec["chunk"])
                labelled += rec["rows"]
                for s in STATUSES:
                    counts[s] += rec[s]
            if time.perf_counter() - last_log > PROGRESS_EVERY_S:
                last_log = time.perf_counter()
                logger.info("progress: %d/%d files, %d images, %.2f images/s",
                            len(written), len(pending), labelled, labelled / (last_log - start))
    missing = sorted(set(pending) - written)
    if missing:
        raise IncompleteRunError(
            f"{len(missing)} of {len(pending)} files were not written (chunks {_missing(missing)}): "
            "run again with --resume"
        )
    return labelled


def run_label(opts: LabelOptions) -> LabelSummary:
    """Label every image of the input into OUT (or finish an interrupted run)."""
    from sempart_core.artifact import read_artifact_info

    t0 = time.perf_counter()
    if opts.batch_size < 1 or (opts.rows_per_file or 1) < 1 or (opts.actors or 1) < 1 or (opts.limit or 0) < 0:
        raise LabelUsageError("--batch-size, --rows-per-file and --actors must be >= 1, --limit >= 0")
    art = read_artifact_info(opts.model)  # sempart.json only: the driver needs no torch
    state = find_run(opts.out)
    if state is not None and not opts.resume:
        raise LabelUsageError(
            f"{redact(opts.out)} already holds run {state['run_id']}: pass --resume to finish it, or use a new OUT"
        )
    resumed = state is not None
    if resumed:
        _check_resume(state, opts, art.model_id)
        logger.info("resuming run %s in %s", state["run_id"], redact(opts.out))
    else:
        state = _new_run(opts, art.model_id)
        save_run(opts.out, state)
        logger.info("run %s: %d images -> %s", state["run_id"], state["rows"], redact(opts.out))
    t_list = time.perf_counter() - t0
    manifest = uris.join(opts.out, state["manifest"]) if state["manifest"] else opts.input
    remove_temp_files(opts.out)
    n_chunks = -(-state["rows"] // state["rows_per_file"])
    done = done_chunks(opts.out, state["run_id"])
    counts = counts_of(opts.out, [p for k, p in done.items() if k < n_chunks])
    pending = [k for k in range(n_chunks) if k not in done]
    logger.info("%d of %d chunks to label (%d rows per file)", len(pending), n_chunks, state["rows_per_file"])

    t1 = time.perf_counter()
    labelled, t2 = 0, t1
    if pending:
        init_ray()
        gpu, actors = _resources(opts)
        t2 = time.perf_counter()
        labelled = consume(build_dataset(pending, manifest, state, art, opts, gpu, actors), pending, counts,
                           opts.stall_timeout)
    t_label = time.perf_counter() - t2
    total_s = time.perf_counter() - t0
    timings = {"setup_and_listing_s": t_list, "ray_start_s": t2 - t1, "label_s": t_label, "total_s": total_s}
    summary = LabelSummary(
        run_id=state["run_id"], counts=counts, total=sum(counts.values()), labelled_now=labelled,
        seconds=total_s, images_per_s=labelled / t_label if labelled else 0.0,
        table=uris.join(redact(opts.out), "part-*.parquet"), resumed=resumed,
        timings={k: round(v, 3) for k, v in timings.items()},
    )
    state.update(
        status="finished", counts=counts, invocations=state["invocations"] + 1,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if labelled or "timings" not in state:  # throughput of the last invocation that labelled
        state.update(timings=summary.timings, labelled_last=labelled, images_per_s=round(summary.images_per_s, 3),
                     last_config=opts.public())
    save_run(opts.out, state)
    return summary
