"""List a folder or an S3 prefix once into a manifest Parquet (uri, image_id, size, etag).

Listing a bucket of millions of keys is slow and must not be repeated by every reader,
nor held in memory: keys are streamed (S3 `ListObjectsV2`, 1000 per page; local
`os.scandir`, one folder at a time) into a ParquetWriter that flushes every
`chunk_rows` rows. The labelling pipeline then reads images by manifest rows, and
`label --input MANIFEST.parquet` lists nothing.

One S3 listing request returns at most 1000 keys, so a sequential listing runs at about
one page per round trip. `list_s3` fans out instead: it lists the first levels of
"folders" (`Delimiter='/'`) and then lists the folders found in parallel, keeping the
manifest in key order (see `fan_out`).

A manifest is also the unit of exactly-once labelling: its row order is fixed once
written, so "rows [a, b)" names the same images on every resume.
"""
from __future__ import annotations

import io
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.schema import image_id_for
from pipeline.storage import atomic_local_file, is_s3, pyarrow_filesystem, redact, s3_client

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm"})

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("size", pa.int64()),  # bytes; null when unknown (a list of URIs)
        pa.field("etag", pa.string()),  # S3 ETag; null for local files
        pa.field("mtime", pa.timestamp("us", tz="UTC")),
    ]
)

DEFAULT_CHUNK_ROWS = 8192  # rows per flush and per row group
LIST_THREADS = 16  # S3 listing requests in flight
FAN_OUT_DEPTH = 2  # folder levels listed with Delimiter='/' before listing folders whole


def is_image_name(name: str) -> bool:
    """Image extension, and not a hidden or temporary file ('.' or '_' prefix)."""
    base = name.rsplit("/", 1)[-1]
    return not base.startswith((".", "_")) and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def _row(uri: str, size: int | None, etag: str | None, mtime: datetime | None) -> dict:
    return {"uri": uri, "image_id": image_id_for(uri), "size": size, "etag": etag, "mtime": mtime}


def list_local(root: str, accept: Callable[[str], bool] = is_image_name) -> Iterator[dict]:
    """Files under `root` whose name `accept`s, recursively, in sorted order (one folder in memory)."""
    stack = [os.path.abspath(root)]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        subfolders = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if not entry.name.startswith((".", "_")):
                    subfolders.append(entry.path)
            elif entry.is_file() and accept(entry.name):
                st = entry.stat()
                mtime = datetime.fromtimestamp(st.st_mtime, tz=timezone.utc)
                yield _row(entry.path, st.st_size, None, mtime)
        stack.extend(reversed(subfolders))  # depth-first, in name order


def list_s3(
    prefix_uri: str, page_size: int = 1000, accept: Callable[[str], bool] = is_image_name,
    threads: int = LIST_THREADS, depth: int = FAN_OUT_DEPTH,
) -> Iterator[dict]:
    """Objects under an s3:// prefix whose key `accept`s, in key order, listed in parallel.

    The prefix is listed page by page with `Delimiter='/'`; each "folder" found is listed
    by a thread of a pool (by folder again down to `depth` levels, then whole), up to
    `threads` folders ahead of the one being written, and its rows take its place in the
    key order (every key under a folder sorts next to the folder's name). Memory: the
    rows of the folders listed ahead.
    """
    parsed = urlparse(prefix_uri)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"  # a folder: s3://b/img must not match s3://b/img2/...
    client = s3_client()

    def entries(sub: str) -> Iterator[tuple[str, dict | None]]:
        """(key, row) of the accepted objects and (folder, None) of the sub-folders of `sub`,
        in key order; by folder while `sub` is less than `depth` levels below the prefix."""
        by_folder = depth > 0 and sub[len(prefix):].count("/") < depth
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=sub, PaginationConfig={"PageSize": page_size}, **({"Delimiter": "/"} if by_folder else {})
        )
        for page in pages:
            found = [(o["Key"], o) for o in page.get("Contents", []) if accept(o["Key"])]
            found += [(p["Prefix"], None) for p in page.get("CommonPrefixes", [])]
            for key, obj in sorted(found, key=lambda e: e[0]):
                row = None if obj is None else _row(
                    f"{parsed.scheme}://{bucket}/{key}", int(obj["Size"]), obj["ETag"].strip('"'), obj["LastModified"]
                )
                yield key, row

    pool = ThreadPoolExecutor(threads)
    try:
        yield from in_key_order(entries(prefix), lambda sub: pool.submit(lambda: list(entries(sub))), threads)
    finally:
        pool.shutdown(cancel_futures=True)  # also when the reader stops early


def first_names(src: str, n: int = 1000) -> list[str]:
    """URIs of up to `n` files under a folder or S3 prefix, cheaply (one S3 request), to
    tell what kind of files it holds."""
    if is_s3(src):
        parsed = urlparse(src)
        prefix = parsed.path.lstrip("/")
        prefix += "/" if prefix and not prefix.endswith("/") else ""
        page = s3_client().list_objects_v2(Bucket=parsed.netloc, Prefix=prefix, MaxKeys=n)
        return [f"{parsed.scheme}://{parsed.netloc}/{o['Key']}" for o in page.get("Contents", [])]
    return [row["uri"] for row in itertools.islice(list_images(src, accept=lambda name: True), n)]


def in_key_order(
    entries: Iterator[tuple[str, dict | None]], expand: Callable[[str], Future], ahead: int
) -> Iterator[dict]:
    """Rows of `entries` in order, each folder (row None) replaced by its own entries,
    which `expand(folder)` lists in the background, at most `ahead` folders in flight."""
    queue: deque[dict | Future] = deque()

    def ready() -> Iterator[dict]:
        while queue and (not isinstance(queue[0], Future) or queue[0].done() or len(queue) > ahead):
            head = queue.popleft()
            if isinstance(head, Future):
                yield from in_key_order(iter(head.result()), expand, ahead)
            else:
                yield head

    for key, row in entries:
        queue.append(expand(key) if row is None else row)
        yield from ready()
    while queue:
        head = queue.popleft()
        yield from in_key_order(iter(head.result()), expand, ahead) if isinstance(head, Future) else [head]


def list_images(src: str, accept: Callable[[str], bool] = is_image_name) -> Iterator[dict]:
    """Manifest rows of the files (by default images) under a local folder, file:// URI
    or s3:// prefix whose name `accept`s."""
    if is_s3(src):
        return list_s3(src, accept=accept)
    fs, path = pyarrow_filesystem(src)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no such folder: {redact(src)}")
    return list_local(path, accept)


def read_uri_list(src: str) -> Iterator[dict]:
    """Manifest rows from a text file of URIs, one per line ('#' comments, blanks skipped).

    Relative local paths are taken relative to the list's folder.
    """
    fs, path = pyarrow_filesystem(src)
    base = os.path.dirname(path) if not is_s3(src) else None
    with fs.open_input_stream(path) as raw, io.TextIOWrapper(raw, encoding="utf-8") as lines:
        for line in lines:
            uri = line.strip()
            if not uri or uri.startswith("#"):
                continue
            if base is not None and "://" not in uri and not os.path.isabs(uri):
                uri = os.path.normpath(os.path.join(base, uri))
            yield _row(uri, None, None, None)


def write_manifest(
    rows: Iterable[dict], out: str, chunk_rows: int = DEFAULT_CHUNK_ROWS, schema: pa.Schema = MANIFEST_SCHEMA
) -> int:
    """Stream rows into a Parquet manifest at `out` (path or URI); returns the row count.

    Readers never see a partial manifest: a local file is written by
    `atomic_local_file` (a hidden temporary name, then a rename); an S3 object appears
    only when its upload completes.
    """
    fs, path = pyarrow_filesystem(out)
    if isinstance(fs, pafs.LocalFileSystem):
        with atomic_local_file(path) as stream:
            count = _write_rows(rows, stream, schema, chunk_rows)
    else:
        with fs.open_output_stream(path) as stream:
            count = _write_rows(rows, stream, schema, chunk_rows)
    logger.debug("manifest: %d rows -> %s", count, redact(out))
    return count


def _write_rows(rows: Iterable[dict], stream: Any, schema: pa.Schema, chunk_rows: int) -> int:
    count = 0
    with pq.ParquetWriter(stream, schema, compression="zstd") as writer:
        buffer: list[dict] = []
        for row in rows:
            buffer.append(row)
            if len(buffer) >= chunk_rows:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                count += len(buffer)
                buffer.clear()
        if buffer or count == 0:
            writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
            count += len(buffer)
    return count


def build_manifest(src: str, out: str, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> int:
    """`sempart manifest SRC --out M.parquet`: list a folder/prefix into a manifest."""
    return write_manifest(list_images(src), out, chunk_rows)


def manifest_uris(manifest: str) -> Iterator[dict]:
    """Rows holding the `uri` of each row of a manifest Parquet, streamed."""
    fs, path = pyarrow_filesystem(manifest)
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(columns=["uri"]):
            yield from ({"uri": uri} for uri in batch.column(0).to_pylist() if uri)


def manifest_rows(manifest: str) -> int:
    """Row count from the Parquet footer (no data read)."""
    fs, path = pyarrow_filesystem(manifest)
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
        if "uri" not in meta.schema.names:
            raise ValueError(f"manifest {redact(manifest)} has no 'uri' column")
        return meta.num_rows


def read_manifest_slice(manifest: str, start: int, stop: int, extra: tuple[str, ...] = ()) -> pa.Table:
    """Rows [start, stop) of a manifest as (row, uri, image_id, *extra), reading only the
    row groups that overlap them. `image_id` is sha1(uri) where the manifest has none."""
    fs, path = pyarrow_filesystem(manifest)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        columns = [c for c in ("uri", "image_id") if c in pf.schema_arrow.names] + list(extra)
        groups, first, offset = [], None, 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if offset < stop and offset + n > start:
                groups.append(i)
                first = offset if first is None else first
            offset += n
        if not groups:
            table = pf.schema_arrow.empty_table().select(columns)
        else:
            table = pf.read_row_groups(groups, columns=columns).slice(start - first, stop - start)
    uris = table.column("uri").cast(pa.string())
    if "image_id" in table.column_names:
        ids = table.column("image_id").cast(pa.string())
    else:
        ids = pa.array([image_id_for(u) for u in uris.to_pylist()], pa.string())
    rows = pa.array(range(start, start + len(uris)), pa.int64())
    return pa.table({"row": rows, "uri": uris, "image_id": ids, **{c: table.column(c) for c in extra}})
