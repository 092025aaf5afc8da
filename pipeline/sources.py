"""What `sempart label` reads: the kinds of input, the images of one chunk, reading one back.

Input kinds (`InputSource.resolve` decides, once per run), and what the run's manifest
(OUT/_manifests/<run_id>.parquet, written once when the run starts) holds for each:

- images (`folder`, `list`, `manifest`): a folder/prefix of image files, a text file of
  image URIs, or a manifest Parquet with a `uri` column (used as is). One manifest row
  per image; chunk k is rows [k * rows_per_file, (k + 1) * rows_per_file).
- `shards`: WebDataset tar shards (a folder/prefix of `*.tar`, a brace pattern such as
  `s3://b/shards/{00000..00999}.tar`, a text file of shard URIs, or one `.tar`). One
  manifest row per shard; chunk k is shard k, read once as a stream, since its sample
  count is unknown until it is read (and indexing shards first would read every byte
  twice). One row per sample key; the byte offset and size of every member go to
  OUT/_manifests/<run_id>/members-<k>.parquet as the shard is read, so that one image is
  read back by one ranged read.
- `parquet`: Parquet files whose rows hold encoded images (`--image-column`: binary, or a
  struct with `bytes` as Hugging Face's `Image` feature writes it). One manifest row per
  image, from the footers and the id/path columns only (no image bytes); chunks as for
  images; a chunk reads the row groups that hold its rows.

Row URIs: an image's own URI; `<shard uri>#<member>` for a tar member; `<file uri>#<row>`
for a Parquet row (or the struct's `path` where it is not empty). `ImageReader` reads an
image back from any of them.
"""
from __future__ import annotations

import itertools
import re
import tarfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import manifest as manifests
from pipeline.schema import image_id_for
from pipeline.outdir import LabelRun, OutDir
from pipeline.storage import is_s3, pyarrow_filesystem, read_object, read_range, redact

IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference within a sample
IMAGE_COLUMNS = ("image", "jpg", "img", "bytes")  # detected when --image-column is not given
STREAM_BUFFER = 8 * 2**20  # bytes per read request while streaming a shard
FOLDER, LIST, MANIFEST = "folder", "list", "manifest"  # images
SHARDS, PARQUET = "shards", "parquet"

BYTES_MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("file", pa.string(), nullable=False),  # the Parquet file holding the bytes
        pa.field("file_row", pa.int64(), nullable=False),  # row index in that file
    ]
)
MEMBERS_SCHEMA = pa.schema(
    [
        pa.field("member", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),  # of the member's data in the shard
        pa.field("size", pa.int64(), nullable=False),
    ]
)
_TAR_URI = re.compile(r"^(?P<file>.+?\.tar)#(?P<member>.+)$")
_PARQUET_URI = re.compile(r"^(?P<file>.+?\.parquet)#(?P<row>\d+)$")
_BRACES = re.compile(r"\{([^{}]*)\}")


class NoImageMemberError(ValueError):
    """A WebDataset sample without a jpg, jpeg, png or webp member."""


class CorruptShardError(ValueError):
    """A shard that is not a tar file, or ends (truncated, corrupt) in the middle."""


@dataclass
class Sample:
    """One input image of a chunk: its bytes, or why there are none."""

    uri: str
    image_id: str
    data: bytes | None = None
    error: Exception | None = None


# ---------------------------------------------------------------- input kinds and the run's manifest


def expand_braces(pattern: str) -> Iterator[str]:
    """`a{00..02}b{x,y}` -> a00bx, a00by, a01bx, ... (ranges keep the zero padding), lazily."""
    match = _BRACES.search(pattern)
    if match is None:
        yield pattern
        return
    body = match.group(1)
    if re.fullmatch(r"\d+\.\.\d+", body):
        lo, hi = body.split("..")
        width = len(lo) if lo.startswith("0") else 0
        choices: Iterator[str] = (str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    else:
        choices = iter(body.split(","))
    head, tail = pattern[: match.start()], pattern[match.end() :]
    for choice in choices:
        for rest in expand_braces(tail):
            yield head + choice + rest


def _is_shard_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith((".", "_")) and base.lower().endswith(".tar")


def _is_parquet_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith((".", "_")) and base.lower().endswith(".parquet")


def _first_uri(src: str) -> str | None:
    """The first URI of a text list (to tell a list of shards from a list of images)."""
    return next((row["uri"] for row in manifests.read_uri_list(src)), None)


@dataclass(frozen=True)
class InputSource:
    """An --input (or --data), resolved once (`InputSource.resolve`): what the run reads
    (`kind`, as the run record keeps it) and how SRC names it (`layout`)."""

    uri: str
    kind: str  # folder | list | manifest (images), shards or parquet
    layout: str  # folder (a folder/prefix) | file (one file) | list (a text file of URIs) | pattern (braces)
    image_column: str | None = None  # parquet: the column of image bytes

    @classmethod
    def resolve(cls, src: str, image_column: str | None = None) -> InputSource:
        """A folder/prefix is told by its first entries (it holds one kind of file); a
        Parquet file is a table of image bytes when it has --image-column or a detectable
        image column, else a manifest (a `uri` column); another file is a text list of
        image or shard URIs, or one .tar shard."""
        if _BRACES.search(src):
            return cls(src, SHARDS, "pattern")
        fs, path = pyarrow_filesystem(src)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            if path.lower().endswith(".parquet"):
                column = find_image_column(_parquet_schema(src), image_column, src)
                return cls(src, PARQUET, "file", column) if column else cls(src, MANIFEST, "file")
            if _is_shard_name(src):
                return cls(src, SHARDS, "file")
            return cls(src, SHARDS if _is_shard_name(_first_uri(src) or "") else LIST, "list")
        if info.type != pafs.FileType.Directory and not (is_s3(src) and info.type == pafs.FileType.NotFound):
            raise FileNotFoundError(f"no such file or folder: {redact(src)}")  # an S3 prefix reads as NotFound
        names = manifests.first_names(src)
        if any(map(_is_shard_name, names)):
            return cls(src, SHARDS, "folder")
        if any(map(_is_parquet_name, names)) and not any(map(manifests.is_image_name, names)):
            return cls(src, PARQUET, "folder", _folder_image_column(src, image_column))
        return cls(src, FOLDER, "folder")

    def image_rows(self) -> Iterator[dict]:
        """Manifest rows (at least `uri`) of the images of an image kind."""
        if self.kind == FOLDER:
            return manifests.list_images(self.uri)
        if self.kind == LIST:
            return manifests.read_uri_list(self.uri)
        if self.kind == MANIFEST:
            return manifests.manifest_uris(self.uri)
        raise ValueError(f"{redact(self.uri)} holds {self.kind}: give a folder, a list or a manifest of images")

    def manifest_rows(self, id_column: str | None = None) -> tuple[Iterator[dict], pa.Schema]:
        """Rows and schema of the run's manifest (inputs other than a manifest)."""
        if self.kind == SHARDS:
            return self._shard_rows(), manifests.MANIFEST_SCHEMA
        if self.kind == PARQUET:
            return _bytes_rows(self._parquet_files(), self.image_column, id_column), BYTES_MANIFEST_SCHEMA
        return self.image_rows(), manifests.MANIFEST_SCHEMA

    def _shard_rows(self) -> Iterator[dict]:
        if self.layout == "pattern":
            return ({"uri": u, "image_id": image_id_for(u)} for u in expand_braces(self.uri))
        if self.layout == "file":
            return iter([{"uri": self.uri, "image_id": image_id_for(self.uri)}])
        if self.layout == "list":
            return ({**row, "image_id": image_id_for(row["uri"])} for row in manifests.read_uri_list(self.uri))
        return manifests.list_images(self.uri, accept=_is_shard_name)

    def _parquet_files(self) -> Iterator[str]:
        if self.layout == "file":
            return iter([self.uri])
        return (row["uri"] for row in manifests.list_images(self.uri, accept=_is_parquet_name))


def _folder_image_column(src: str, given: str | None) -> str:
    """The image column of a folder of Parquet files, from its first file (checked on
    every file as it is listed)."""
    first = next((row["uri"] for row in manifests.list_images(src, accept=_is_parquet_name)), None)
    if first is None:
        raise FileNotFoundError(f"no .parquet files under {redact(src)}")
    column = find_image_column(_parquet_schema(first), given, first)
    if column is None:
        raise ValueError(f"{redact(first)} has no image column ({', '.join(IMAGE_COLUMNS)}): name it with --image-column")
    return column


# ---------------------------------------------------------------- Parquet files of image bytes


def _parquet_schema(uri: str) -> pa.Schema:
    fs, path = pyarrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).schema_arrow


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_image_type(t.field("bytes").type)


def find_image_column(schema: pa.Schema, given: str | None, where: str) -> str | None:
    """The column holding image bytes: `given` (checked), else the first of IMAGE_COLUMNS
    with a binary or struct<bytes: binary> type, else None."""
    if given is not None:
        if given not in schema.names:
            raise ValueError(f"--image-column {given}: no such column in {redact(where)} ({', '.join(schema.names)})")
        if not _is_image_type(schema.field(given).type):
            raise ValueError(f"--image-column {given} in {redact(where)} is {schema.field(given).type}, "
                             "not binary nor a struct with a binary 'bytes' field")
        return given
    return next((c for c in IMAGE_COLUMNS if c in schema.names and _is_image_type(schema.field(c).type)), None)


def _bytes_rows(files: Iterator[str], image_column: str, id_column: str | None) -> Iterator[dict]:
    """One manifest row per image row, reading only the id and `path` columns."""
    for file in files:
        fs, path = pyarrow_filesystem(file)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            column = find_image_column(schema, image_column, file)
            if id_column is not None and id_column not in schema.names:
                raise ValueError(f"--id-column {id_column}: no such column in {redact(file)}")
            struct = schema.field(column).type
            with_path = pa.types.is_struct(struct) and struct.get_field_index("path") >= 0
            columns = ([id_column] if id_column else []) + ([f"{column}.path"] if with_path else [])
            offset = 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                table = pf.read_row_group(g, columns=columns) if columns else None
                ids = table.column(id_column).to_pylist() if id_column else [None] * n
                paths = table.column(column).combine_chunks().field("path").to_pylist() if with_path else [None] * n
                for i in range(n):
                    uri = paths[i] or f"{file}#{offset + i}"
                    image_id = str(ids[i]) if ids[i] is not None else image_id_for(uri)
                    yield {"uri": uri, "image_id": image_id, "file": file, "file_row": offset + i}
                offset += n


def _cell_bytes(value: bytes | dict | None) -> bytes:
    """Image bytes of a cell: binary, or {bytes, path} (bytes, else the file at path)."""
    if isinstance(value, dict):
        if value.get("bytes") is None and value.get("path"):
            return read_object(value["path"])
        value = value.get("bytes")
    return value or b""


def read_parquet_rows(file: str, rows: list[int], column: str) -> list[bytes | dict | None]:
    """The `column` cells of `rows` (sorted) of one Parquet file, reading only the row
    groups that hold them."""
    fs, path = pyarrow_filesystem(file)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        cells, start, want = [], 0, iter(rows)
        row = next(want, None)
        for g in range(pf.metadata.num_row_groups):
            stop = start + pf.metadata.row_group(g).num_rows
            if row is not None and row < stop:
                group = pf.read_row_group(g, columns=[column]).column(0)
                while row is not None and row < stop:
                    cells.append(group[row - start].as_py())
                    row = next(want, None)
            start = stop
    if len(cells) != len(rows):
        raise IndexError(f"{redact(file)} has {start} rows, not row {rows[len(cells)]}")
    return cells


def parquet_samples(rows: pa.Table, column: str) -> Iterator[Sample]:
    """The samples of manifest rows (uri, image_id, file, file_row), one file at a time."""
    records = rows.to_pylist()
    for file, group in itertools.groupby(records, key=lambda r: r["file"]):
        group = list(group)
        try:
            cells = read_parquet_rows(file, [r["file_row"] for r in group], column)
        except Exception as exc:  # noqa: BLE001 - a missing or corrupt file: error rows
            yield from (Sample(r["uri"], r["image_id"], error=exc) for r in group)
            continue
        for r, cell in zip(group, cells):
            try:
                yield Sample(r["uri"], r["image_id"], data=_cell_bytes(cell))
            except Exception as exc:  # noqa: BLE001
                yield Sample(r["uri"], r["image_id"], error=exc)


# ---------------------------------------------------------------- WebDataset shards


def split_member(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member: WebDataset's `__key__` is the name up to the
    first dot of its base name, with its folder."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _sample_of(shard: str, key: str, members: list[str], image: tuple[str, bytes] | None) -> Sample:
    if image is not None:
        return Sample(f"{shard}#{image[0]}", key, data=image[1])
    exts = ", ".join(sorted({split_member(m)[1] or "(none)" for m in members}))
    return Sample(f"{shard}#{members[0]}", key, error=NoImageMemberError(
        f"sample {key} has no {'/'.join(IMAGE_MEMBER_EXTENSIONS)} member (has: {exts})"))


class _TailReader:
    """A read-only stream that counts the bytes read and keeps the last few of them, to
    check where tarfile stopped (it ends quietly on a cut or corrupt header)."""

    KEEP = 4 * tarfile.RECORDSIZE  # tarfile reads one record at a time

    def __init__(self, raw) -> None:
        self.raw, self.pos, self.tail = raw, 0, bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.pos += len(data)
        self.tail += data
        del self.tail[: -self.KEEP]
        return data

    def block_at(self, offset: int) -> bytes:
        """The 512 bytes at `offset` (fewer where the stream ends), reading on if needed."""
        while self.pos < offset + tarfile.BLOCKSIZE and self.read(offset + tarfile.BLOCKSIZE - self.pos):
            pass
        start = offset - (self.pos - len(self.tail))
        return bytes(self.tail[max(start, 0) : start + tarfile.BLOCKSIZE])


def shard_samples(shard: str, members_out: str) -> Iterator[Sample]:
    """The samples of one tar shard, read once as a stream; then writes its member index
    (name, key, data offset, size) to `members_out`.

    A shard that breaks (truncated, corrupt, not a tar) yields the samples completed
    before the break and one error sample whose uri is the shard. tarfile ends quietly
    on a cut or invalid header, so the block where it stopped must be the end-of-archive
    (zero) block."""
    index: list[dict] = []
    key, members, image = None, [], None
    broken: Exception | None = None
    try:
        fs, path = pyarrow_filesystem(shard)
        with fs.open_input_stream(path, buffer_size=STREAM_BUFFER) as raw:
            reader = _TailReader(raw)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    member_key, ext = split_member(info.name)
                    if member_key != key and members:
                        yield _sample_of(shard, key, members, image)
                        members, image = [], None
                    key = member_key
                    entry = {"member": info.name, "key": key, "offset": info.offset_data, "size": info.size}
                    if ext in IMAGE_MEMBER_EXTENSIONS and (image is None or _preferred(ext, image[0])):
                        image = (info.name, tar.extractfile(info).read())  # raises if cut short
                    index.append(entry)
                    members.append(info.name)
                end = reader.block_at(tar.offset)
            if len(end) < tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"unexpected end of data at byte {reader.pos}")
            if end.count(0) != tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"invalid member header at byte {tar.offset}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        broken = exc
    if members and (broken is None or image is not None):
        yield _sample_of(shard, key, members, image)
    if broken is not None:
        where = f"after member {index[-1]['member']}" if index else "at its start"
        yield Sample(shard, image_id_for(shard), error=CorruptShardError(
            f"shard truncated or corrupt {where} ({len(index)} members read): {type(broken).__name__}: {broken}"))
    manifests.write_manifest(index, members_out, schema=MEMBERS_SCHEMA)


def _preferred(ext: str, current: str) -> bool:
    return IMAGE_MEMBER_EXTENSIONS.index(ext) < IMAGE_MEMBER_EXTENSIONS.index(split_member(current)[1])


# ---------------------------------------------------------------- one chunk of a run


@dataclass(frozen=True)
class ChunkSource:
    """How a decode task (or, with --decode gpu, the inference actor) finds the images
    of chunk k (see the module doc)."""

    kind: str
    manifest: str  # the run's manifest (URI)
    rows_per_file: int  # manifest rows per chunk
    total: int  # manifest rows of the run
    out: OutDir
    run_id: str
    image_column: str | None = None  # `parquet` only

    def samples(self, chunk: int, fetch_threads: int = 1) -> Iterator[Sample]:
        """The chunk's samples in manifest order. Image files are read `fetch_threads`
        at a time (object storage answers each read after tens of ms: one reader would
        leave a GPU waiting); shards and Parquet rows are read as one stream."""
        start = chunk * self.rows_per_file
        rows = manifests.read_manifest_slice(
            self.manifest, start, min(start + self.rows_per_file, self.total),
            extra=("file", "file_row") if self.kind == PARQUET else (),
        )
        if self.kind == SHARDS:
            for shard in rows.column("uri").to_pylist():
                yield from shard_samples(shard, self.out.members_uri(self.run_id, chunk))
        elif self.kind == PARQUET:
            yield from parquet_samples(rows, self.image_column)
        else:
            yield from read_in_order(zip(rows.column("uri").to_pylist(), rows.column("image_id").to_pylist()),
                                     fetch_threads)


def read_sample(uri: str, image_id: str) -> Sample:
    """One image file's sample; a missing or unreadable file is the sample's error."""
    try:
        return Sample(uri, image_id, data=read_object(uri))
    except Exception as exc:  # noqa: BLE001 - missing, unreadable: an error row
        return Sample(uri, image_id, error=exc)


def read_in_order(rows: Iterator[tuple[str, str]], threads: int) -> Iterator[Sample]:
    """`read_sample` of each (uri, image_id), in order, with up to `threads` reads in
    flight and at most 2 x `threads` samples read ahead."""
    if threads <= 1:
        yield from itertools.starmap(read_sample, rows)
        return
    pool, ahead = ThreadPoolExecutor(threads, thread_name_prefix="sempart-fetch"), deque()
    try:
        for row in rows:
            ahead.append(pool.submit(read_sample, *row))
            if len(ahead) >= 2 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()
    finally:  # also when the reader stops early: reads not started are dropped
        pool.shutdown(cancel_futures=True)


# ---------------------------------------------------------------- reading an image back


class ImageReader:
    """The bytes of the image a labels row's `uri` names, for export and review.

    A tar member is one ranged read at the offset the run recorded (the shard is never
    scanned); a Parquet row reads that row's row group; a `path` taken from a Parquet
    image struct is found in the run's manifest; anything else is read by its URI.
    """

    def __init__(self, out: OutDir | None = None):
        self.out = out
        self._run: LabelRun | None = None
        self._shards: dict[str, int] | None = None
        self._members: dict[int, dict[str, tuple[int, int]]] = {}
        self._paths: dict[str, tuple[str, int]] | None = None

    def read(self, uri: str) -> bytes:
        if m := _TAR_URI.match(uri):
            offset, size = self._member(m.group("file"), m.group("member"))
            return read_range(m.group("file"), offset, size)
        if m := _PARQUET_URI.match(uri):
            return self._parquet_cell(m.group("file"), int(m.group("row")))
        if _is_shard_name(uri):  # the row of a broken shard: not an image, and never read whole
            raise ValueError(f"{redact(uri)} is a shard, not an image")
        try:
            return read_object(uri)
        except (FileNotFoundError, OSError, ValueError):
            source = self._path_source(uri)
            if source is None:
                raise
            return self._parquet_cell(*source)

    def run(self) -> LabelRun | None:
        """The run record of OUT (None without OUT or record)."""
        if self._run is None and self.out is not None:
            self._run = self.out.find_run()
        return self._run

    def _manifest(self, kind: str) -> str | None:
        """The run's own manifest when the run read an input of `kind`."""
        run = self.run()
        if run is None or run.input_kind != kind or not run.manifest:
            return None
        return self.out.manifest_of(run, "")

    def _member(self, shard: str, member: str) -> tuple[int, int]:
        manifest = self._manifest(SHARDS)
        if manifest is None:
            raise FileNotFoundError(f"{redact(shard)}: no member index (not a shard run in {self.out.name if self.out else '-'})")
        if self._shards is None:
            uris_ = _read_table(manifest, ["uri"]).column("uri").to_pylist()
            self._shards = {u: k for k, u in enumerate(uris_)}
        chunk = self._shards.get(shard)
        if chunk is None:
            raise FileNotFoundError(f"{redact(shard)} is not a shard of run {self.run().run_id}")
        if chunk not in self._members:
            table = _read_table(self.out.members_uri(self.run().run_id, chunk))
            self._members[chunk] = {
                r["member"]: (r["offset"], r["size"]) for r in table.select(["member", "offset", "size"]).to_pylist()
            }
        found = self._members[chunk].get(member)
        if found is None:
            raise FileNotFoundError(f"no member {member} in {redact(shard)}")
        return found

    def _parquet_cell(self, file: str, row: int) -> bytes:
        run = self.run()
        column = (run.image_column if run else None) or find_image_column(_parquet_schema(file), None, file)
        if column is None:
            raise ValueError(f"{redact(file)} has no image column")
        return _cell_bytes(read_parquet_rows(file, [row], column)[0])

    def _path_source(self, uri: str) -> tuple[str, int] | None:
        """(file, row) of a row whose uri is a struct `path` (held in memory once loaded)."""
        manifest = self._manifest(PARQUET)
        if manifest is None:
            return None
        if self._paths is None:
            table = _read_table(manifest, ["uri", "file", "file_row"])
            self._paths = {
                u: (f, r) for u, f, r in zip(*(table.column(c).to_pylist() for c in ("uri", "file", "file_row")))
                if u != f"{f}#{r}"
            }
        return self._paths.get(uri)


def _read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = pyarrow_filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)
