"""`sempart label --decode gpu` on a CPU-only Ray: the inference actor reads the chunks
and decodes the JPEG bytes with torchvision (the path that runs nvJPEG on a GPU), and
the table matches the PIL path's (`--decode cpu`) row for row: sizes after EXIF
orientation, statuses, error classes and masks. With `--finish device` (the actor
finishes the rows) each decode gives the rows it gives with CPU finish tasks.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from cli_args import ONE_ACTOR
from typer.testing import CliRunner

from pipeline.cli import app
from sempart_core.postprocess import rle_to_mask

pytestmark = pytest.mark.integration
PHOTOS = Path(__file__).resolve().parents[1] / "data" / "duts-te" / "images"


def rotated_jpeg(photo: Path) -> bytes:
    """The photo stored sideways with EXIF orientation 6 (displayed rotated back)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.open(photo).transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=92, exif=exif)
    return buf.getvalue()


def label(images: Path, out: Path, model: str, decode: str, finish: str, *extra: str):
    return CliRunner().invoke(app, ["label", "--model", model, "--input", str(images), "--out", str(out), "--no-gpu",
                                    "--decode", decode, "--finish", finish, "--batch-size", "3", *ONE_ACTOR, *extra])


def iou(want: dict, got: dict) -> float:
    a, b = rle_to_mask(want["mask_rle"]), rle_to_mask(got["mask_rle"])
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def assert_same_rows(want: dict, got: dict) -> None:
    """Tables of the same decode, finished on the CPU and on the device: equal rows."""
    assert want.keys() == got.keys()
    for name, a in want.items():
        b = got[name]
        assert (a["status"], a["width"], a["height"], a["error"]) == (b["status"], b["width"], b["height"], b["error"])
        if a["status"] != "error":
            assert iou(a, b) >= 0.999, name
            assert (a["box"] is None) == (b["box"] is None) and abs(a["score"] - b["score"]) <= 1e-3, name
            if a["box"] is not None:
                assert max(abs(x - y) for x, y in zip(a["box"], b["box"])) <= 1, name


def test_every_stage_wiring_gives_the_pil_paths_rows(tmp_path: Path, model: str, ray_session) -> None:
    """The four wirings of `sempart label`: decode in CPU tasks (cpu) or in the inference
    actor, which then reads the chunks itself (gpu); finish in CPU tasks (cpu) or on the
    model's device, the actor giving the writer its rows (device)."""
    ray_session.data.DataContext.get_current().enable_progress_bars = False
    images = tmp_path / "images"
    images.mkdir()
    photos = sorted(PHOTOS.glob("*.jpg"))[:6]
    for photo in photos:
        shutil.copy(photo, images / photo.name)
    (images / "rotated.jpg").write_bytes(rotated_jpeg(photos[0]))
    whole = photos[1].read_bytes()
    (images / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (images / "text.jpg").write_bytes(b"this is not an image\n" * 3)
    (images / "photo.png").write_bytes(b"")  # an empty file named like a PNG

    tables = {}
    for decode, finish in (("cpu", "cpu"), ("gpu", "cpu"), ("cpu", "device"), ("gpu", "device")):
        result = label(images, tmp_path / f"{decode}-{finish}", model, decode, finish)
        assert result.exit_code == 1, result.output  # the three bad files are error rows
        rows = pq.read_table(tmp_path / f"{decode}-{finish}").to_pylist()
        tables[decode, finish] = {row["uri"].rsplit("/", 1)[-1]: row for row in rows}

    cpu, gpu = tables["cpu", "cpu"], tables["gpu", "cpu"]
    assert cpu.keys() == gpu.keys() == {p.name for p in images.iterdir()}
    assert (gpu["rotated.jpg"]["width"], gpu["rotated.jpg"]["height"]) == Image.open(photos[0]).size
    ious = []
    for name, want in cpu.items():
        got = gpu[name]
        assert (got["status"], got["width"], got["height"]) == (want["status"], want["width"], want["height"]), name
        if want["status"] == "error":
            assert got["error"].split(":")[0] == want["error"].split(":")[0], name
            continue
        ious.append(iou(want, got))
    assert sorted(n for n, r in cpu.items() if r["status"] == "error") == ["photo.png", "text.jpg", "truncated.jpg"]
    assert len(ious) == len(photos) + 1
    assert np.mean(ious) >= 0.98, ious
    assert_same_rows(cpu, tables["cpu", "device"])
    assert_same_rows(gpu, tables["gpu", "device"])

    # --retry-errors with the actor reading the chunks: only the error rows go again
    retry = label(images, tmp_path / "gpu-device", model, "gpu", "device", "--resume", "--retry-errors")
    assert retry.exit_code == 1 and "retried 3 error rows, 3 still errors" in retry.output, retry.output
    again = {row["uri"].rsplit("/", 1)[-1]: row for row in pq.read_table(tmp_path / "gpu-device").to_pylist()}
    assert_same_rows(tables["gpu", "device"], again)
