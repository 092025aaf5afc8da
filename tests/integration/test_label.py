"""`sempart label` end to end on local Ray: table schema and readers, bad inputs, masks
equal to `Predictor.predict`, the run record, and S3 input/output through jobs/label_job.py.

The model is a tiny RANDOM backbone (vit_tiny_patch16_224 at 32 px): these tests check
the pipeline, not mask quality.
"""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from cli_args import ONE_ACTOR
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.manifest import build_manifest
from pipeline.schema import LABELS_SCHEMA, image_id_for
from pipeline.storage import pyarrow_s3
from sempart_core.images import decode_image
from sempart_core.postprocess import rle_to_mask
from sempart_core.predictor import load_predictor
from scripts import load_script

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def scene(seed: int, h: int, w: int) -> np.ndarray:
    """Textured background with a flat coloured rectangle."""
    rng = np.random.default_rng(seed)
    rgb = (rng.random((h, w, 3)) * 80).astype(np.uint8)
    rgb[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = rng.integers(150, 255, 3)
    return rgb


def encoded(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_corpus() -> dict[str, tuple[bytes, dict]]:
    """name -> (bytes, expectation): an error class, or the decoded (width, height)."""
    jpeg = encoded(Image.fromarray(scene(1, 48, 64)), "JPEG", quality=90)
    palette = Image.new("P", (20, 30), 0)
    palette.putpalette([255, 255, 255, 200, 0, 0] + [0] * 762)
    palette.paste(1, (5, 5, 15, 25))
    frames = [Image.fromarray(scene(s, 20, 24)) for s in range(3)]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 24 high, displayed rotated: 24 x 40
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return {
        "zero.jpg": (b"", {"error": "EmptyImageError"}),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], {"error": "TruncatedImageError"}),
        "text.jpg": (b"this is not an image\n" * 3, {"error": "NotAnImageError"}),
        "bomb.png": (png_claiming(100_000, 100_000), {"error": "ImageTooLargeError"}),
        "deleted.png": (encoded(Image.fromarray(scene(2, 32, 32)), "PNG"), {"error": "FileNotFoundError"}),
        "one_pixel.png": (encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), {"size": (1, 1)}),
        "sixteen_bit.png": (
            encoded(Image.fromarray((np.arange(30 * 20).reshape(20, 30) * 100).astype(np.uint16)), "PNG"),
            {"size": (30, 20)},
        ),
        "cmyk.jpg": (encoded(Image.new("CMYK", (30, 20), (0, 128, 255, 0)), "JPEG"), {"size": (30, 20)}),
        "palette_alpha.png": (encoded(palette, "PNG", transparency=0), {"size": (20, 30)}),
        "animated.gif": (gif, {"size": (24, 20)}),
        "exif_rotated.jpg": (
            encoded(Image.fromarray(scene(3, 24, 40)), "JPEG", exif=exif.tobytes()), {"size": (24, 40)}
        ),
    }


GOOD_SIZES = [(48, 64), (64, 48), (40, 40), (48, 64), (33, 71), (64, 48)]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, model: str, ray_session):
    """One `sempart label` run over good images and the bad corpus, from a manifest
    whose 'deleted.png' is removed after listing."""
    ray_session.data.DataContext.get_current().enable_progress_bars = False
    root = tmp_path_factory.mktemp("label")
    images = root / "images"
    images.mkdir()
    expect = {}
    for name, (data, expectation) in bad_corpus().items():
        (images / name).write_bytes(data)
        expect[name] = expectation
    for i, (h, w) in enumerate(GOOD_SIZES):
        Image.fromarray(scene(10 + i, h, w)).save(images / f"good_{i}.png")
        expect[f"good_{i}.png"] = {"size": (w, h)}
    manifest = str(root / "manifest.parquet")
    assert build_manifest(str(images), manifest) == len(expect)
    (images / "deleted.png").unlink()
    out = root / "out"
    result = CliRunner().invoke(app, ["label", "--model", model, "--input", manifest, "--out", str(out),
                                      "--rows-per-file", "4", "--batch-size", "3", "--no-gpu", *ONE_ACTOR])
    return {"out": out, "images": images, "expect": expect, "result": result, "manifest": manifest}


def table_rows(out: Path) -> list[dict]:
    return pq.read_table(out).to_pylist()  # a dataset over OUT: skips _tmp, _runs, _manifests


def test_schema_and_readers(labelled) -> None:
    out, n = labelled["out"], len(labelled["expect"])
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == -(-n // 4)  # ceil: --rows-per-file 4
    for part in parts:
        schema = pq.read_schema(part)
        assert schema.remove_metadata().equals(LABELS_SCHEMA.remove_metadata())
        assert schema.metadata[b"sempart_schema_version"] == b"2"
        meta = pq.read_metadata(part)
        assert meta.num_rows <= 4
        assert meta.row_group(0).column(0).compression == "ZSTD"

    import duckdb
    import pandas as pd
    import polars as pl
    import ray

    (out / "_tmp").mkdir(exist_ok=True)  # what a killed writer leaves: readers must skip it
    (out / "_tmp" / "part-x-000000.parquet.5f3a").write_bytes(b"PAR1 half a file")
    glob = f"{out}/part-*.parquet"
    df = pd.read_parquet(out)
    assert len(df) == n and list(df.columns) == LABELS_SCHEMA.names
    assert pl.read_parquet(glob).height == n
    with duckdb.connect() as con:
        assert con.execute(f"select count(distinct uri) from read_parquet('{glob}')").fetchall() == [(n,)]
    ds = ray.data.read_parquet(str(out))
    assert ds.count() == n and ds.schema().names == LABELS_SCHEMA.names


def test_bad_inputs_give_one_row_each(labelled) -> None:
    result = labelled["result"]
    assert result.exit_code == 1, result.output  # some rows are errors
    assert "error 5" in result.output
    rows = table_rows(labelled["out"])
    by_name = {}
    for row in rows:
        by_name.setdefault(Path(row["uri"]).name, []).append(row)
    assert sorted(by_name) == sorted(labelled["expect"])
    for name, expectation in labelled["expect"].items():
        (row,) = by_name[name]
        assert row["image_id"] == image_id_for(row["uri"])
        if "error" in expectation:
            assert row["status"] == "error" and row["error"].startswith(expectation["error"]), (name, row["error"])
            assert row["mask_rle"] is None
        else:
            assert row["status"] in ("ok", "empty") and row["error"] is None, (name, row["error"])
            assert (row["width"], row["height"]) == expectation["size"], name
            assert row["mask_rle"]["size"] == [row["height"], row["width"]]


def test_masks_equal_predictor_output(labelled, model: str) -> None:
    predictor = load_predictor(model)
    checked = 0
    for row in table_rows(labelled["out"]):
        if row["status"] == "error":
            continue
        rgb = decode_image(Path(row["uri"]).read_bytes())
        (pred,) = predictor.predict([rgb])
        mask = rle_to_mask(row["mask_rle"])
        assert mask.shape == pred.mask.shape == (row["height"], row["width"])
        union = np.logical_or(mask, pred.mask).sum()
        iou = np.logical_and(mask, pred.mask).sum() / union if union else 1.0
        assert iou >= 0.999, (row["uri"], iou)
        assert row["mask_area"] == int(mask.sum())
        assert row["status"] == pred.status
        assert row["score"] == pytest.approx(pred.score, abs=1e-3)
        if pred.box is not None:
            assert row["box"] == pytest.approx(pred.box)
        checked += 1
    assert checked == len(GOOD_SIZES) + 6  # six of the odd inputs decode


def test_run_record_and_resume_rules(labelled, model: str) -> None:
    out = labelled["out"]
    (record_file,) = (out / "_runs").glob("*.json")
    record = json.loads(record_file.read_text())
    statuses = [r["status"] for r in table_rows(out)]
    assert record["counts"] == {s: statuses.count(s) for s in ("ok", "empty", "error")}
    assert record["status"] == "finished" and record["images_per_s"] > 0
    assert record["model_id"] == table_rows(out)[0]["model_id"]
    assert {r["run_id"] for r in table_rows(out)} == {record["run_id"]}
    assert "testing" not in record_file.read_text()  # no S3 keys

    runner = CliRunner()
    again = runner.invoke(app, ["label", "--model", model, "--input", labelled["manifest"], "--out", str(out)])
    assert again.exit_code == 2 and "--resume" in again.output
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / "part-leftover.parquet.0a1b").write_bytes(b"partial")
    done = runner.invoke(app, ["label", "--model", model, "--input", labelled["manifest"], "--out", str(out), "--resume"])
    assert done.exit_code == 1 and f"labelled {len(labelled['expect'])} images" in done.output
    assert {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == mtimes  # nothing redone
    assert not list((out / "_tmp").iterdir())  # leftovers of a killed writer are removed
    other = runner.invoke(app, ["label", "--model", model, "--input", labelled["manifest"], "--out", str(out),
                                "--resume", "--rows-per-file", "7"])
    assert other.exit_code == 2 and "rows-per-file" in other.output


def test_inference_actor_refuses_a_model_changed_since_the_run_started(model: str) -> None:
    from pipeline.label import Infer
    from sempart_core.artifact import ArtifactError, read_artifact_info

    Infer(model, model_id=read_artifact_info(model).model_id, device="cpu", batch_size=1)
    with pytest.raises(ArtifactError, match="changed since the run started"):
        Infer(model, model_id="0" * 64, device="cpu", batch_size=1)


def test_uri_list_input_and_limit(labelled, model: str, tmp_path: Path) -> None:
    listing = tmp_path / "uris.txt"
    images = labelled["images"]
    relative = os.path.relpath(images / "good_1.png", tmp_path)  # to the list's folder
    listing.write_text(f"# three images\n{images}/good_0.png\n\n{relative}\n{images}/good_2.png\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["label", "--model", model, "--input", str(listing), "--out", str(out),
                                      "--limit", "2", "--no-gpu", *ONE_ACTOR])
    assert result.exit_code == 0, result.output
    rows = table_rows(out)
    assert sorted(r["uri"] for r in rows) == [f"{images}/good_0.png", f"{images}/good_1.png"]
    assert len(list((out / "_manifests").glob("*.parquet"))) == 1  # the list, as this run's manifest


def test_job_config_example_uses_label_option_names() -> None:
    import typer

    defaults = load_script(REPO / "jobs" / "label_job.py", "label_job").load_defaults(str(REPO / "jobs" / "configs" / "label.yaml"))
    options = {p.name for p in typer.main.get_command(app).commands["label"].params}
    assert defaults and set(defaults) <= options


def test_s3_input_and_output_through_the_job(s3_bucket: str, ray_session, model: str, tmp_path: Path) -> None:
    """Images under an S3 prefix, the table written to S3, options from a YAML file."""
    import boto3

    ray_session.data.DataContext.get_current().enable_progress_bars = False
    client = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    keys = [f"in/sub/{i}.png" for i in range(5)] + ["in/notes.txt", "in2/x.png"]
    for i, key in enumerate(keys):
        client.put_object(Bucket=bucket, Key=key, Body=encoded(Image.fromarray(scene(i, 40, 56)), "PNG"))
    config = tmp_path / "label.yaml"
    config.write_text(yaml.safe_dump({"model": model, "input": f"{s3_bucket}/in", "rows-per-file": 2,
                                      "batch_size": 4, "gpu": False}))
    with pytest.raises(SystemExit) as exit_info:
        load_script(REPO / "jobs" / "label_job.py", "label_job").main(["--config", str(config), "--out", f"{s3_bucket}/labels"])
    assert exit_info.value.code == 0

    fs = pyarrow_s3()
    table = pq.read_table(f"{bucket}/labels", filesystem=fs)
    assert sorted(table.column("uri").to_pylist()) == [f"{s3_bucket}/in/sub/{i}.png" for i in range(5)]
    assert set(table.column("status").to_pylist()) <= {"ok", "empty"}
    assert set(table.column("width").to_pylist()) == {56}
    names = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="labels/")["Contents"]]
    assert sum(n.startswith("labels/part-") for n in names) == 3
    assert any(n.startswith("labels/_runs/") for n in names)
    assert fs.get_file_info(f"{bucket}/labels/_tmp").type == pafs.FileType.NotFound
