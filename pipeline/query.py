"""SQL over the output table of `sempart label`, with DuckDB scanning a pyarrow dataset.

The table is the files `OUT/part-*.parquet` (docs/design.md, "Output table"); everything
else under OUT (`_runs/`, `_tmp/`, `_manifests/`, hidden or `_`-prefixed names) is
bookkeeping or partial output and is never read as data.

DuckDB reads the files through pyarrow (`con.register("labels", dataset)`), so S3 works
with the same file system as the rest of the pipeline and no DuckDB extension (httpfs)
is ever downloaded. Queries are read-only twice over: only a single SELECT statement
is accepted, and the connection runs with external access disabled, extension
autoloading off and its configuration locked, so a SELECT cannot read or write other
files (`read_csv('/etc/passwd')`, `COPY`) either.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

from pipeline.outdir import PART_PATTERN, OutDir
from pipeline.schema import LABELS_SCHEMA

logger = logging.getLogger(__name__)

TABLE_NAME = "labels"
DEFAULT_BATCH_ROWS = 1024

# Settings that make a connection unable to touch anything but registered tables.
_SAFE_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "python_enable_replacements": False,  # no implicit scans of Python variables
}


class QueryError(ValueError):
    """A query that is not a single read-only SELECT, or that DuckDB rejects."""


def open_labels(out: str | OutDir) -> pads.Dataset:
    """A pyarrow dataset over OUT's part files (`OutDir.part_files`: never `_tmp/`,
    `_runs/`, `_manifests/` or partial names), read with the contract's schema.

    Raises FileNotFoundError when OUT holds no part files (nothing labelled there yet).
    """
    out = OutDir.at(out)
    files = out.part_files()
    if not files:
        raise FileNotFoundError(f"no {PART_PATTERN} files under {out.name}: is this the --out of `sempart label`?")
    logger.debug("labels table at %s: %d part files", out.name, len(files))
    return pads.dataset(files, schema=LABELS_SCHEMA, format="parquet", filesystem=out.fs)


def check_read_only(sql: str) -> str:
    """The text of `sql` if it is exactly one SELECT (WITH, FROM-first, VALUES ... too).

    Uses DuckDB's own parser, so comments, strings and odd spacing cannot disguise a
    second statement or a write.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"cannot parse the query: {_first_line(exc)}") from exc
    if len(statements) != 1:
        raise QueryError(f"give exactly one SELECT query, got {len(statements)} statements")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryError(f"only read-only SELECT queries are allowed, got a {kind.name} statement")
    return sql


def where_query(predicate: str | None, columns: list[str] | None = None) -> str:
    """`SELECT columns FROM labels [WHERE (predicate)]`, for `--where` filters.

    The predicate sits on its own lines so that a trailing `--` comment cannot swallow
    the closing parenthesis; the whole query still goes through `check_read_only`.
    """
    select = ", ".join(f'"{c}"' for c in columns) if columns else "*"
    sql = f"SELECT {select} FROM {TABLE_NAME}"
    if predicate is not None and predicate.strip():
        sql += f" WHERE (\n{predicate}\n)"
    return sql


@contextmanager
def labels_connection(out: str | OutDir) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB connection where `labels` is OUT's table and nothing else is reachable."""
    dataset = open_labels(out)
    con = duckdb.connect(config=dict(_SAFE_CONFIG))
    try:
        con.register(TABLE_NAME, dataset)
        con.execute("SET lock_configuration = true")
        yield con
    finally:
        con.close()


def query_batches(
    out: str | OutDir, sql: str, batch_rows: int = DEFAULT_BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """Stream the result of a read-only query as record batches of at most `batch_rows`.

    DuckDB scans the part files lazily, so memory stays bounded by the batch (plus
    whatever the query itself needs, e.g. a sort).
    """
    check_read_only(sql)
    with labels_connection(out) as con:
        reader = _execute(con, sql, batch_rows)
        try:
            yield from reader
        except duckdb.Error as exc:  # errors found while running, not planning
            raise QueryError(f"query failed: {_first_line(exc)}") from exc


def run_query(out: str | OutDir, sql: str, limit: int | None = None) -> pa.Table:
    """The result of a read-only SQL query over the table `labels`, as an Arrow table.

    With `limit`, only the first `limit` rows are fetched (the scan stops there).
    """
    if limit is not None and limit < 0:
        raise QueryError(f"limit must be >= 0, got {limit}")
    check_read_only(sql)
    batches: list[pa.RecordBatch] = []
    taken = 0
    with labels_connection(out) as con:
        reader = _execute(con, sql, DEFAULT_BATCH_ROWS)
        try:
            for batch in reader:
                if limit is not None and taken + batch.num_rows >= limit:
                    batches.append(batch.slice(0, limit - taken))
                    break
                batches.append(batch)
                taken += batch.num_rows
        except duckdb.Error as exc:
            raise QueryError(f"query failed: {_first_line(exc)}") from exc
        return pa.Table.from_batches(batches, schema=reader.schema)


def _execute(con: duckdb.DuckDBPyConnection, sql: str, batch_rows: int) -> pa.RecordBatchReader:
    """Plan and start a query; binder errors (unknown column, type) become QueryError."""
    try:
        return _arrow_reader(con.sql(sql), batch_rows)
    except duckdb.Error as exc:
        raise QueryError(f"query failed: {_first_line(exc)}") from exc


def _arrow_reader(relation: duckdb.DuckDBPyRelation, batch_rows: int) -> pa.RecordBatchReader:
    """`to_arrow_reader` (DuckDB >= 1.4) or its older name `fetch_record_batch`."""
    method = getattr(relation, "to_arrow_reader", None) or relation.fetch_record_batch
    return method(batch_rows)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- text output for `sempart query` -------------------------------------------------


def write_csv(batches: Iterator[pa.RecordBatch], out: Any) -> int:
    """Write batches as CSV to a binary stream; nested values become JSON text."""
    writer: pacsv.CSVWriter | None = None
    rows = 0
    for batch in batches:
        flat = _nested_as_json(batch)
        if writer is None:
            writer = pacsv.CSVWriter(out, flat.schema)
        writer.write_batch(flat)
        rows += batch.num_rows
    if writer is not None:
        writer.close()
    return rows


def write_json_lines(batches: Iterator[pa.RecordBatch], out: TextIO) -> int:
    """Write one JSON object per row (JSON Lines); NaN/inf become null, times ISO 8601."""
    rows = 0
    for batch in batches:
        for row in batch.to_pylist():
            out.write(json.dumps(_jsonable(row), ensure_ascii=False) + "\n")
        rows += batch.num_rows
    return rows


def format_table(table: pa.Table, max_cell: int = 40) -> str:
    """A plain aligned text table for humans; long cells are cut with '…'."""
    names = table.column_names
    cells = [[_cell(v, max_cell) for v in table.column(n).to_pylist()] for n in names]
    widths = [max([len(n)] + [len(c) for c in col]) for n, col in zip(names, cells)]
    lines = [
        "  ".join(n.ljust(w) for n, w in zip(names, widths)),
        "  ".join("-" * w for w in widths),
    ]
    for i in range(table.num_rows):
        lines.append("  ".join(col[i].ljust(w) for col, w in zip(cells, widths)).rstrip())
    lines.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(lines)


def _cell(value: Any, max_cell: int) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"  # float32 columns widened to float64 print long tails
    text = value if isinstance(value, str) else json.dumps(_jsonable(value), ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= max_cell else text[: max_cell - 1] + "…"


def _jsonable(value: Any) -> Any:
    """Plain JSON values: datetimes to ISO strings, bytes to text, NaN/inf to None."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # decimals, durations, ...


def _nested_as_json(batch: pa.RecordBatch) -> pa.RecordBatch:
    """CSV has no nested values: lists, structs and maps become JSON strings."""
    columns = []
    fields = []
    for field, column in zip(batch.schema, batch.columns):
        if pa.types.is_nested(field.type):
            column = pa.array(
                [None if v is None else json.dumps(_jsonable(v)) for v in column.to_pylist()],
                type=pa.string(),
            )
            field = pa.field(field.name, pa.string())
        columns.append(column)
        fields.append(field)
    return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields))
