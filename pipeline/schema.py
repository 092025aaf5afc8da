"""The output table of `sempart label` (docs/design.md, "Output table", schema version 2).

One row per input image, errors included. The Arrow schema below is the contract that
users' queries and exports depend on; change it only with a new SCHEMA_VERSION.

Version 2 added `instances` (one entry per object, `sempart label --instances N`); it is
null without --instances. The change is additive: version-1 files read with this schema
give a null `instances`, and version-1 readers ignore the column.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa

SCHEMA_VERSION = 2

STATUS_OK = "ok"
STATUS_EMPTY = "empty"
STATUS_ERROR = "error"
STATUSES = (STATUS_OK, STATUS_EMPTY, STATUS_ERROR)

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
BOX_TYPE = pa.list_(pa.float32())  # 4 values, xyxy; a plain list reads everywhere
INSTANCE_TYPE = pa.struct(
    [
        ("mask_rle", RLE_TYPE),  # the object's mask, disjoint from the others'
        ("box", BOX_TYPE),  # xyxy of the whole mask
        ("area", pa.int64()),
        ("score", pa.float32()),  # in [0, 1], ranks the image's instances by quality
        ("ncut", pa.float32()),  # of the cut that found it
    ]
)

LABELS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("mask_rle", RLE_TYPE),
        pa.field("mask_area", pa.int64()),
        pa.field("box", BOX_TYPE),
        pa.field("boxes", pa.list_(BOX_TYPE)),
        pa.field("score", pa.float32()),
        pa.field("ncut", pa.float32()),
        pa.field("instances", pa.list_(INSTANCE_TYPE)),  # largest first; null without --instances
        pa.field("model_id", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("labeled_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={b"sempart_schema_version": str(SCHEMA_VERSION).encode()},
)


def conform(table: pa.Table) -> pa.Table:
    """`table` in LABELS_SCHEMA: columns of a newer version that an older file lacks
    (`instances` in a version-1 file) become nulls."""
    for field in LABELS_SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(LABELS_SCHEMA.names).cast(LABELS_SCHEMA)


def image_id_for(uri: str) -> str:
    """Stable id of an image when the manifest gives none: sha1 of its URI."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()
