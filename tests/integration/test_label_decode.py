"""`sempart label --decode gpu` on a CPU-only Ray: the inference actor decodes the JPEG
bytes with torchvision (the path that runs nvJPEG on a GPU) and the table matches the
PIL path's (`--decode cpu`) row for row: sizes after EXIF orientation, statuses, error
classes and masks.
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


def test_gpu_decode_path_on_cpu_matches_pil_path(tmp_path: Path, model: str, ray_session) -> None:
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
    for decode in ("cpu", "gpu"):
        out = tmp_path / decode
        result = CliRunner().invoke(app, ["label", "--model", model, "--input", str(images), "--out", str(out),
                                          "--no-gpu", "--decode", decode, "--batch-size", "3", *ONE_ACTOR])
        assert result.exit_code == 1, result.output  # the three bad files are error rows
        tables[decode] = {row["uri"].rsplit("/", 1)[-1]: row for row in pq.read_table(out).to_pylist()}

    cpu, gpu = tables["cpu"], tables["gpu"]
    assert cpu.keys() == gpu.keys() == {p.name for p in images.iterdir()}
    assert (gpu["rotated.jpg"]["width"], gpu["rotated.jpg"]["height"]) == Image.open(photos[0]).size
    ious = []
    for name, want in cpu.items():
        got = gpu[name]
        assert (got["status"], got["width"], got["height"]) == (want["status"], want["width"], want["height"]), name
        if want["status"] == "error":
            assert got["error"].split(":")[0] == want["error"].split(":")[0], name
            continue
        a, b = rle_to_mask(want["mask_rle"]), rle_to_mask(got["mask_rle"])
        union = np.logical_or(a, b).sum()
        ious.append(np.logical_and(a, b).sum() / union if union else 1.0)
    assert sorted(n for n, r in cpu.items() if r["status"] == "error") == ["photo.png", "text.jpg", "truncated.jpg"]
    assert len(ious) == len(photos) + 1
    assert np.mean(ious) >= 0.98, ious
