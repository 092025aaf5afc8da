"""The output table of `sempart label` (docs/design.md, "Output table", schema version 1).

One row per input image, errors included. The Arrow schema below is the contract that
users' queries and exports depend on; change it only with a new SCHEMA_VERSION.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa

SCHEMA_VERSION = 1

STATUS_OK = "ok"
STATUS_EMPTY = "empty"
STATUS_ERROR = "error"
STATUSES = (STATUS_OK, STATUS_EMPTY, STATUS_ERROR)

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
BOX_TYPE = pa.list_(pa.float32())  # 4 values, xyxy; a plain list reads everywhere

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
        pa.field("model_id", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("labeled_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={b"sempart_schema_version": str(SCHEMA_VERSION).encode()},
)


def image_id_for(uri: str) -> str:
    """Stable id of an image when the manifest gives none: sha1 of its URI."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()
