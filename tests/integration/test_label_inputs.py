"""`sempart label` over WebDataset shards and Parquet files of image bytes, locally and on
S3 (moto server): one row per sample, ids and URIs, error rows for broken samples and a
cut shard, masks equal to `Predictor.predict`, images read back for export; and a
manifest that `label` reuses without listing again.

The model is a tiny RANDOM backbone: these tests check the pipeline, not mask quality.
Real JPEGs come from tests/data/duts-te.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from instance_rows import check_instances
from PIL import Image
from cli_args import ONE_ACTOR
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.outdir import OutDir
from pipeline.schema import image_id_for
from pipeline.sources import ImageReader
from pipeline.storage import pyarrow_filesystem
from sempart_core.images import decode_image
from sempart_core.postprocess import rle_to_mask
from sempart_core.predictor import load_predictor

pytestmark = pytest.mark.integration
PHOTOS = sorted((Path(__file__).resolve().parents[1] / "data" / "duts-te" / "images").glob("*.jpg"))[:4]


def photo(i: int) -> bytes:
    return PHOTOS[i].read_bytes()


def tiny_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((24, 40, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Store:
    """Where a test puts its input and labels: a local folder or an S3 bucket (moto)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put(self, key: str, data: bytes) -> str:
        fs, path = pyarrow_filesystem(self.uri(key))
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return self.uri(key)

    def delete(self, key: str) -> None:
        fs, path = pyarrow_filesystem(self.uri(key))
        fs.delete_file(path)

    def labels(self, key: str) -> list[dict]:
        fs, path = pyarrow_filesystem(self.uri(key))
        return pq.read_table(path, filesystem=fs).to_pylist()  # skips _runs, _manifests


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path, ray_session) -> Store:
    ray_session.data.DataContext.get_current().enable_progress_bars = False
    if request.param == "s3":
        return Store(request.getfixturevalue("s3_bucket"))
    return Store(str(tmp_path / "store"))


def make_shards(store: Store) -> dict[str, dict]:
    """Two shards under in/: one with broken samples, one cut in the middle. Returns the
    expected rows by image_id: uri, source bytes (ok rows) or error class."""
    truncated = photo(1)[: len(photo(1)) // 2]
    first = tar_of([
        ("000000.jpg", photo(0)), ("000000.txt", b"a caption"), ("000000.json", b"{}"),
        ("000001.txt", b"a sample with no image"),
        ("000002.jpg", truncated), ("000002.txt", b"x"),
        ("000003.jpg", b"this is text, not a jpeg\n" * 4),
        ("sub/000004.png", tiny_png(4)), ("sub/000004.cls", b"3"),
    ])
    second = tar_of([("000005.jpg", photo(2)), ("000005.txt", b"y"), ("000006.jpg", photo(3)),
                     ("000007.jpg", photo(0)), ("000007.txt", b"z")])
    cut = second.index(photo(0)) + 1000  # inside the last image's data
    a = store.put("in/shard-000000.tar", first)
    b = store.put("in/shard-000001.tar", second[:cut])
    store.put("in/readme.md", b"not a shard")
    return {
        "000000": {"uri": f"{a}#000000.jpg", "data": photo(0)},
        "000001": {"uri": f"{a}#000001.txt", "error": "NoImageMemberError"},
        "000002": {"uri": f"{a}#000002.jpg", "error": "TruncatedImageError"},
        "000003": {"uri": f"{a}#000003.jpg", "error": "NotAnImageError"},
        "sub/000004": {"uri": f"{a}#sub/000004.png", "data": tiny_png(4)},
        "000005": {"uri": f"{b}#000005.jpg", "data": photo(2)},
        "000006": {"uri": f"{b}#000006.jpg", "data": photo(3)},
        image_id_for(b): {"uri": b, "error": "CorruptShardError: shard truncated or corrupt after member 000006.jpg"},
    }


def make_parquet(store: Store) -> dict[str, dict]:
    """Two Parquet files under in/ with an HF-style `image` struct (bytes, path), an id
    column and row groups of 2 rows; one row with a path, one not an image, one null."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    files = {
        "in/a.parquet": [("p0", photo(0), None), ("p1", photo(1), "photos/one.jpg"), ("p2", b"no image", ""),
                         ("p3", None, None)],
        "in/b.parquet": [("p4", photo(2), None), ("p5", tiny_png(5), None), ("p6", photo(3), None)],
    }
    expect = {}
    for key, rows in files.items():
        table = pa.table({
            "id": [r[0] for r in rows],
            "image": pa.array([None if r[1] is None else {"bytes": r[1], "path": r[2]} for r in rows], image),
            "caption": [f"caption {r[0]}" for r in rows],
        })
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=2)
        uri = store.put(key, buf.getvalue())
        for i, (image_id, data, path) in enumerate(rows):
            expect[image_id] = {"uri": path or f"{uri}#{i}", "data": data}
    expect["p2"] = {"uri": expect["p2"]["uri"], "error": "NotAnImageError"}
    expect["p3"] = {"uri": expect["p3"]["uri"], "error": "EmptyImageError"}
    return expect


def check_table(rows: list[dict], expect: dict[str, dict], model: str, out: str) -> None:
    """One row per expected image: ids, URIs, statuses, errors; masks equal to predict;
    each image read back from its URI."""
    assert sorted(r["image_id"] for r in rows) == sorted(expect)
    predictor, reader = load_predictor(model), ImageReader(OutDir.at(out))
    for row in rows:
        want = expect[row["image_id"]]
        assert row["uri"] == want["uri"]
        if "error" in want:
            assert row["status"] == "error" and row["error"].startswith(want["error"]), row["error"]
            continue
        assert row["status"] in ("ok", "empty") and row["error"] is None, row["error"]
        assert reader.read(row["uri"]) == want["data"]  # a tar member: one ranged read
        (pred,) = predictor.predict([decode_image(want["data"])])
        mask = rle_to_mask(row["mask_rle"])
        assert mask.shape == pred.mask.shape == (row["height"], row["width"])
        union = np.logical_or(mask, pred.mask).sum()
        assert (np.logical_and(mask, pred.mask).sum() / union if union else 1.0) >= 0.999
        assert row["status"] == pred.status
        if row["instances"] is not None:
            check_instances(row, 2)


def label(model: str, store: Store, *extra: str):
    return CliRunner().invoke(app, ["label", "--model", model, "--input", store.uri("in"), "--out",
                                    store.uri("out"), "--batch-size", "3", "--no-gpu", *ONE_ACTOR, *extra])


def test_webdataset_shards(store: Store, model: str, tmp_path: Path) -> None:
    expect = make_shards(store)
    result = label(model, store, "--instances", "2")
    assert result.exit_code == 1, result.output  # some rows are errors
    assert "labelled 8 images (ok" in result.output and "error 4" in result.output
    rows = store.labels("out")
    check_table(rows, expect, model, store.uri("out"))

    fs, root = pyarrow_filesystem(store.uri("out"))
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)))
    assert sum(n.startswith("part-") for n in names) == 2  # one file per shard
    assert sum(n.startswith("members-") for n in names) == 2  # each shard's member index

    masks = CliRunner().invoke(app, ["export", store.uri("out"), "--masks", str(tmp_path / "masks"),
                                     "--gallery", str(tmp_path / "gallery")])
    assert masks.exit_code == 0, masks.output
    assert "8 rows, 4 written, 4 skipped" in masks.output  # masks of the ok/empty rows
    assert "8 written, 4 images unreadable" in masks.output  # gallery: only the error rows' images fail
    assert (tmp_path / "masks" / "sub_000004.png").exists()


def test_parquet_image_bytes(store: Store, model: str, tmp_path: Path) -> None:
    expect = make_parquet(store)
    result = label(model, store, "--id-column", "id", "--rows-per-file", "3", "--instances", "2")
    assert result.exit_code == 1, result.output
    assert "labelled 7 images" in result.output and "error 2" in result.output
    rows = store.labels("out")
    check_table(rows, expect, model, store.uri("out"))
    gallery = CliRunner().invoke(app, ["export", store.uri("out"), "--gallery", str(tmp_path / "gallery")])
    assert gallery.exit_code == 0 and "7 written, 2 images unreadable" in gallery.output, gallery.output

    if store.root.startswith("s3://"):
        return  # the rest reads the input like the local run does
    other = tmp_path / "explicit"  # --image-column named, ids from the uri
    explicit = CliRunner().invoke(app, ["label", "--model", model, "--input", expect["p4"]["uri"].split("#")[0],
                                        "--out", str(other), "--image-column", "image", "--no-gpu", *ONE_ACTOR])
    assert explicit.exit_code == 0, explicit.output
    assert sorted(r["image_id"] for r in pq.read_table(other).to_pylist()) == sorted(
        image_id_for(expect[k]["uri"]) for k in ("p4", "p5", "p6"))
    wrong = CliRunner().invoke(app, ["label", "--model", model, "--input", store.uri("in"),
                                     "--out", str(tmp_path / "wrong"), "--image-column", "caption"])
    assert wrong.exit_code == 2 and "--image-column caption" in wrong.output


def test_label_reuses_a_manifest_without_listing(s3_bucket: str, ray_session, model: str) -> None:
    """A bucket listed once (`sempart manifest`) is not listed again by `label`: objects
    added after the manifest are not labelled, deleted ones give error rows."""
    store = Store(s3_bucket)
    ray_session.data.DataContext.get_current().enable_progress_bars = False
    listed = [store.put(f"in/{i}/img.png", tiny_png(i)) for i in range(3)]
    made = CliRunner().invoke(app, ["manifest", store.uri("in"), "--out", store.uri("manifest.parquet")])
    assert made.exit_code == 0 and "3 images" in made.output and "keys/s" in made.output, made.output
    store.put("in/9/new.png", tiny_png(9))
    store.delete("in/0/img.png")
    result = CliRunner().invoke(app, ["label", "--model", model, "--input", store.uri("manifest.parquet"),
                                      "--out", store.uri("out"), "--no-gpu", *ONE_ACTOR])
    assert result.exit_code == 1, result.output
    rows = {r["uri"]: r for r in store.labels("out")}
    assert sorted(rows) == listed  # the manifest's rows, not the bucket's keys now
    assert rows[listed[0]]["status"] == "error" and "FileNotFoundError" in rows[listed[0]]["error"]
