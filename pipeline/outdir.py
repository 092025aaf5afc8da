"""OUT, the folder or prefix a labelling run writes: its layout, and every read and write in it.

    OUT/part-<run_id>-<chunk:06d>.parquet             the table: one file per chunk
    OUT/_runs/<run_id>.json                            the run record (`LabelRun`)
    OUT/_manifests/<run_id>.parquet                    the run's manifest (inputs other than a manifest)
    OUT/_manifests/<run_id>/members-<chunk:06d>.parquet   where each member of tar shard `chunk` lies
    OUT/_tmp/                                          local files being written

Readers skip `_`-prefixed names: only `part-*.parquet` at OUT's own level is data.
`OutDir` resolves OUT's file system once; the label stages, sources, export and query
take it (it pickles, so Ray sends it to workers) instead of a URI to resolve again.

A part file appears whole or not at all: locally it is written under `_tmp/`, fsynced
and renamed into place; on S3 an object appears only when its upload completes. Its
footer counts its rows per status (`sempart_counts`), so a resume counts finished files
without reading them, and, once rewritten by --retry-errors, the tries of each
relabelled image (`sempart_attempts`).
"""
from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, fields

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.schema import LABELS_SCHEMA, SCHEMA_VERSION, STATUSES, conform
from pipeline.storage import atomic_local_file, pyarrow_filesystem, redact

PART_PATTERN = "part-*.parquet"
COUNTS_KEY = b"sempart_counts"  # per-file status counts in the Parquet footer
ATTEMPTS_KEY = b"sempart_attempts"  # image_id -> tries, for the rows labelled again (--retry-errors)
RUN_RECORD_VERSION = 1  # raised only when a change is not backward compatible


class RunRecordError(ValueError):
    """OUT holds no readable run record, or more than one."""


def status_counts(statuses: Iterable[str]) -> dict[str, int]:
    statuses = list(statuses)
    return {s: statuses.count(s) for s in STATUSES}


def sum_counts(per_file: Iterable[dict[str, int]]) -> dict[str, int]:
    per_file = list(per_file)
    return {s: sum(c[s] for c in per_file) for s in STATUSES}


@dataclass
class RetryRecord:
    """One --retry-errors pass: its part files, rows and the rows' new statuses."""

    at: str
    files: int
    rows: int
    ok: int = 0
    empty: int = 0
    error: int = 0


@dataclass
class LabelRun:
    """The run record, OUT/_runs/<run_id>.json: what a resume must keep (id, manifest,
    chunking, model) and what the run did (counts, timings, retries)."""

    run_id: str
    model_id: str
    manifest: str | None  # relative to OUT; None: the input is the manifest
    manifest_rows: int
    rows: int  # rows labelled: manifest_rows, or fewer with limit
    rows_per_file: int
    input_kind: str = "manifest"
    image_column: str | None = None  # Parquet-with-bytes input: the column of image bytes
    limit: int | None = None
    instances: int = 0  # --instances: objects per image in the `instances` column
    instances_from: str = "maskcut"  # --instances-from
    schema_version: int = SCHEMA_VERSION  # of the output table
    status: str = "running"  # running | finished
    config: dict = field(default_factory=dict)  # LabelOptions.public() of the first invocation
    started_at: str = ""
    finished_at: str | None = None
    invocations: int = 0  # finished invocations (first run, resumes, retries)
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] | None = None  # of the last invocation that labelled
    labelled_last: int | None = None
    images_per_s: float | None = None
    last_config: dict | None = None
    retries: list[RetryRecord] = field(default_factory=list)
    s3_retries: int = 0  # S3 retries of the image reads and of the driver's requests (storage.py says which count)
    record_version: int = RUN_RECORD_VERSION

    @property
    def chunks(self) -> int:
        return -(-self.rows // self.rows_per_file)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, where: str = "run record") -> LabelRun:
        """Read a record of this or an older version (fields it lacks take defaults);
        anything else is a RunRecordError of one line."""
        if not isinstance(data, dict):
            raise RunRecordError(f"{where} is not a label run record (a JSON object)")
        version = data.get("record_version", 1)  # records before this field were version 1
        if not isinstance(version, int) or version > RUN_RECORD_VERSION:
            raise RunRecordError(f"{where} has record version {version!r}: written by a newer sempart, upgrade it")
        own = {f.name: f for f in fields(cls)}
        missing = [n for n, f in own.items() if f.default is MISSING and f.default_factory is MISSING and n not in data]
        if missing:
            raise RunRecordError(f"{where} is not a label run record: no {', '.join(missing)}")
        known = {k: v for k, v in data.items() if k in own}
        try:
            known["retries"] = [RetryRecord(**r) for r in known.get("retries", [])]
            run = cls(**known)
        except TypeError as exc:
            raise RunRecordError(f"{where} has a malformed retries entry: {exc}") from None
        for name in ("manifest_rows", "rows", "rows_per_file", "invocations"):
            if not isinstance(getattr(run, name), int) or getattr(run, name) < 0:
                raise RunRecordError(f"{where} has {name} {getattr(run, name)!r}, not a count")
        if run.rows_per_file < 1:
            raise RunRecordError(f"{where} has rows_per_file {run.rows_per_file}, not >= 1")
        return run


@dataclass(frozen=True)
class OutDir:
    """OUT with its file system resolved once (`OutDir.at(uri)`)."""

    uri: str
    fs: pafs.FileSystem = field(repr=False, compare=False)
    root: str  # OUT inside `fs`

    @classmethod
    def at(cls, out: str | OutDir) -> OutDir:
        """OUT given as a URI (or already resolved)."""
        if isinstance(out, OutDir):
            return out
        fs, root = pyarrow_filesystem(out)
        return cls(str(out), fs, root)

    @property
    def name(self) -> str:
        """OUT for messages and logs (credentials removed)."""
        return redact(self.uri)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, relative: str) -> str:
        """A path under OUT, inside `fs`."""
        return f"{self.root}/{relative}"

    def _files(self, relative: str = "") -> list[pafs.FileInfo]:
        """The files directly under OUT/relative (none when it does not exist)."""
        folder = self.path(relative) if relative else self.root
        infos = self.fs.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))
        return [i for i in infos if i.type == pafs.FileType.File]

    # ------------------------------------------------------------ the table

    @staticmethod
    def part_name(run_id: str, chunk: int) -> str:
        return f"part-{run_id}-{chunk:06d}.parquet"

    def part_files(self) -> list[str]:
        """The data files of the table, sorted (so row order is reproducible): only OUT's
        own level, and only names matching PART_PATTERN (never `_tmp/`, `.x` or `.tmp`)."""
        return sorted(i.path for i in self._files() if fnmatch.fnmatchcase(i.base_name, PART_PATTERN))

    def done_chunks(self, run_id: str) -> dict[int, str]:
        """Chunk index -> path of every finished part file of run `run_id`."""
        pattern = re.compile(rf"^part-{re.escape(run_id)}-(\d+)\.parquet$")
        return {int(m.group(1)): i.path for i in self._files() if (m := pattern.match(i.base_name))}

    def footer_counts(self, paths: list[str]) -> list[dict[str, int]]:
        """Status counts of each finished part file, from its footer only."""

        def footer(path: str) -> dict[str, int]:
            return json.loads(pq.read_metadata(path, filesystem=self.fs).metadata[COUNTS_KEY])

        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(footer, paths))

    def read_part(self, name: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(name), columns=columns, filesystem=self.fs)

    def write_part(self, table: pa.Table, name: str, attempts: dict[str, int] | None = None) -> dict[str, int]:
        """Write a part file, all or nothing (module docstring), with its status counts
        (and the tries of retried rows) in its footer; returns the counts."""
        counts = status_counts(table.column("status").to_pylist())
        meta = {**LABELS_SCHEMA.metadata, COUNTS_KEY: json.dumps(counts).encode()}
        if attempts:
            meta[ATTEMPTS_KEY] = json.dumps(attempts).encode()
        table = conform(table).replace_schema_metadata(meta)
        if self.is_local:
            with atomic_local_file(self.path(name), tmp_dir=self.path("_tmp")) as f:
                pq.write_table(table, f, compression="zstd")
        else:
            pq.write_table(table, self.path(name), filesystem=self.fs, compression="zstd")
        return counts

    def remove_temp_files(self) -> None:
        """Leftovers of a killed local writer (S3 writes leave no visible partial object)."""
        if self.is_local and self.fs.get_file_info(self.path("_tmp")).type == pafs.FileType.Directory:
            self.fs.delete_dir_contents(self.path("_tmp"))

    # ------------------------------------------------------------ the run record

    def find_run(self) -> LabelRun | None:
        """The run recorded in OUT/_runs/ (one run per OUT), or None."""
        docs = [i for i in self._files("_runs") if i.base_name.endswith(".json")]
        if len(docs) > 1:
            raise RunRecordError(f"{self.name} holds {len(docs)} runs in _runs/: label into a new OUT")
        if not docs:
            return None
        where = f"{self.name.rstrip('/')}/_runs/{docs[0].base_name}"
        try:
            with self.fs.open_input_stream(docs[0].path) as f:
                data = json.loads(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunRecordError(f"{where} is not JSON ({exc}): remove it only if OUT holds no part files") from None
        return LabelRun.from_dict(data, where)

    def save_run(self, run: LabelRun) -> None:
        self._write_bytes(f"_runs/{run.run_id}.json", json.dumps(run.to_dict(), indent=2).encode())

    def _write_bytes(self, relative: str, data: bytes) -> None:
        """A small file under OUT, whole or not at all (a rename locally, one PUT on S3)."""
        if self.is_local:
            with atomic_local_file(self.path(relative)) as f:
                f.write(data)
        else:
            with self.fs.open_output_stream(self.path(relative)) as f:
                f.write(data)

    # ------------------------------------------------------------ manifests

    @staticmethod
    def manifest_name(run_id: str) -> str:
        """The run's manifest, relative to OUT (what LabelRun.manifest records)."""
        return f"_manifests/{run_id}.parquet"

    def manifest_of(self, run: LabelRun, given: str) -> str:
        """URI of the manifest a run reads: its own under OUT, or the manifest it was given."""
        return f"{self.uri.rstrip('/')}/{run.manifest}" if run.manifest else given

    def members_uri(self, run_id: str, chunk: int) -> str:
        """URI of the member index of tar shard `chunk` of a run."""
        return f"{self.uri.rstrip('/')}/_manifests/{run_id}/members-{chunk:06d}.parquet"
