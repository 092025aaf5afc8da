"""Manifests: streamed listing of a folder or S3 prefix (moto), URI lists, slices by row.
No Ray here."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline import manifest as m
from pipeline.cli import app
from pipeline.schema import image_id_for
from pipeline.sources import InputSource

pytestmark = pytest.mark.integration


def make_tree(root: Path) -> list[str]:
    """Images in nested folders plus things a listing must skip; returns the images."""
    files = {
        "b.png": b"1", "a.JPG": b"22", "sub/c.jpeg": b"333", "sub/deeper/d.webp": b"4444",
        "z/e.tiff": b"55555", "notes.txt": b"x", ".hidden.png": b"x", "_tmp/f.png": b"x",
        ".cache/g.png": b"x", "sub/h.png.part": b"x",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return [str(root / n) for n in ("a.JPG", "b.png", "sub/c.jpeg", "sub/deeper/d.webp", "z/e.tiff")]


def test_local_listing_is_sorted_filtered_and_written_in_chunks(tmp_path: Path) -> None:
    expected = make_tree(tmp_path / "images")
    out = tmp_path / "manifest.parquet"
    assert m.write_manifest(m.list_images(str(tmp_path / "images")), str(out), chunk_rows=2) == 5
    table = pq.read_table(out)
    assert table.schema.equals(m.MANIFEST_SCHEMA)
    assert table.column("uri").to_pylist() == expected
    assert table.column("size").to_pylist() == [2, 1, 3, 4, 5]
    assert table.column("image_id").to_pylist() == [image_id_for(u) for u in expected]
    assert pq.ParquetFile(out).metadata.num_row_groups == 3  # flushed every 2 rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "manifest.parquet"]  # no temp file left


def test_slices_cross_row_groups(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(11):
        (images / f"{i:02d}.png").write_bytes(b"x" * i)
    out = str(tmp_path / "m.parquet")
    m.write_manifest(m.list_images(str(images)), out, chunk_rows=3)
    full = pd.read_parquet(out)
    assert m.manifest_rows(out) == 11
    for start, stop in [(0, 3), (2, 7), (9, 11), (10, 11), (0, 11)]:
        part = m.read_manifest_slice(out, start, stop)
        assert part.column("row").to_pylist() == list(range(start, stop))
        assert part.column("uri").to_pylist() == full.uri.tolist()[start:stop]


def test_uri_list_and_manifest_without_ids(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "uris.txt"
    listing.write_text("# images\nrel/x.png\n\n  /abs/y.jpg \ns3://bucket/k/z.png\n")
    assert InputSource.resolve(str(listing)).kind == "list"
    rows = list(m.read_uri_list(str(listing)))
    assert [r["uri"] for r in rows] == [str(tmp_path / "lists/rel/x.png"), "/abs/y.jpg", "s3://bucket/k/z.png"]
    assert all(r["size"] is None for r in rows)

    bare = tmp_path / "bare.parquet"  # a user's manifest: just a uri column
    pq.write_table(pa.table({"uri": ["/a.png", "/b.png"]}), bare)
    assert InputSource.resolve(str(bare)).kind == "manifest"
    part = m.read_manifest_slice(str(bare), 1, 2)
    assert part.column("image_id").to_pylist() == [image_id_for("/b.png")]
    assert InputSource.resolve(str(tmp_path / "lists")).kind == "folder"
    with pytest.raises(FileNotFoundError):
        InputSource.resolve(str(tmp_path / "missing"))


def test_s3_listing_pages_and_cli(s3_bucket: str, tmp_path: Path) -> None:
    import boto3

    client = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    keys = ["in/a.png", "in/b.jpg", "in/deep/c.png", "in/skip.txt", "in2/not_under.png", "in/e.gif"]
    for i, key in enumerate(keys):
        client.put_object(Bucket=bucket, Key=key, Body=b"x" * (i + 1))
    rows = list(m.list_s3(f"{s3_bucket}/in", page_size=2))  # several pages
    listed = {o["Key"]: o for o in client.list_objects_v2(Bucket=bucket, Prefix="in/")["Contents"]}
    want = ["in/a.png", "in/b.jpg", "in/deep/c.png", "in/e.gif"]
    assert [r["uri"] for r in rows] == [f"{s3_bucket}/{k}" for k in want]
    assert [r["size"] for r in rows] == [listed[k]["Size"] for k in want]
    assert [r["etag"] for r in rows] == [listed[k]["ETag"].strip('"') for k in want]

    result = CliRunner().invoke(app, ["manifest", f"{s3_bucket}/in", "--out", f"{s3_bucket}/m/manifest.parquet"])
    assert result.exit_code == 0 and "4 images" in result.output, result.output
    from pipeline.storage import pyarrow_s3

    table = pq.read_table(f"{bucket}/m/manifest.parquet", filesystem=pyarrow_s3())
    assert table.column("uri").to_pylist() == [r["uri"] for r in rows]
    missing = CliRunner().invoke(app, ["manifest", str(tmp_path / "nope"), "--out", str(tmp_path / "m.parquet")])
    assert missing.exit_code == 2 and "no such folder" in missing.output


def test_s3_listing_fans_out_in_key_order(s3_bucket: str) -> None:
    """Folders listed in parallel (by folder down to `depth`, then whole) give the rows
    of one sequential listing, in the same order, whatever the depth and page size."""
    import boto3

    client = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    keys = ["in/a.png", "in/b/x.png", "in/b/y/z.png", "in/b0.png", "in/b-.png", "in/c/d/e/f.png", "in/c/g.txt",
            "in/c/h.png", "in/d.png", "in/e/1.png", "in/e/2.png", "in/e/3.png", "in/f/only.txt", "in0/no.png"]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    sequential = [f"{s3_bucket}/{k}" for k in sorted(keys) if k.startswith("in/") and k.endswith(".png")]
    for depth in (0, 1, 2, 5):
        for threads in (1, 3):
            rows = list(m.list_s3(f"{s3_bucket}/in", page_size=2, threads=threads, depth=depth))
            assert [r["uri"] for r in rows] == sequential, (depth, threads)
