"""The device decode path (sempart_core.gpu_decode) run on the CPU, against the PIL path
(decode_image + prepare_image), and the ordering of prefetched copies."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sempart_core.gpu_decode import PreparedImage, decode_and_prepare
from sempart_core.images import ImageDecodeError, decode_image, prepare_image
from sempart_core.prefetch import DeviceCopier, prefetch

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "data" / "duts-te" / "images").glob("*.jpg"))


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def cpu_path(data: bytes, image_size: int, patch: int) -> np.ndarray:
    return prepare_image(decode_image(data), image_size, patch)


def test_real_photos_match_the_pil_path_pixel_for_pixel():
    """torchvision's CPU decoder and PIL's are both libjpeg-turbo (integer IDCT and chroma
    upsampling, identical on every CPU) and the resize is PIL's integer arithmetic, so the
    prepared inputs are equal, not only close."""
    datas = [p.read_bytes() for p in PHOTOS[:12]]
    for data, got in zip(datas, decode_and_prepare(datas, 96, 8)):
        assert isinstance(got, PreparedImage)
        want = cpu_path(data, 96, 8)
        assert got.pixels.dtype == torch.uint8 and tuple(got.pixels.shape) == want.shape
        assert (got.height, got.width) == decode_image(data).shape[:2]
        np.testing.assert_array_equal(got.pixels.numpy(), want)


def test_masks_equal_the_pil_path_on_real_photos(tmp_path):
    """Predictions from the device-decoded inputs against the PIL-decoded ones, on one
    random-backbone model, with TokenCut (a real partition of the features) and with
    untrained SEMPART heads (maps near the threshold: their masks follow any difference
    in the inputs; 1 level on a tenth of the values gave a mean IoU of 0.95 on held-out
    photos before the resize was PIL's own)."""
    from sempart_core.artifact import save_untrained_artifact
    from sempart_core.config import SempartConfig
    from sempart_core.predictor import load_predictor

    cfg = SempartConfig()
    cfg.backbone.name, cfg.backbone.weights, cfg.data.image_size = "vit_tiny_patch16_224", "random", 128
    save_untrained_artifact(str(tmp_path / "m"), cfg)
    datas = [p.read_bytes() for p in PHOTOS]
    assert len(datas) >= 10
    prepared = decode_and_prepare(datas, 128, 16)
    for method in ("sempart", "tokencut"):
        predictor = load_predictor(str(tmp_path / "m"), method=method)
        reference = predictor.predict([decode_image(d) for d in datas])
        ours = [predictor.finish(predictor.infer(g.pixels.unsqueeze(0))[0], g.height, g.width) for g in prepared]
        ious = [mask_iou(a.mask, b.mask) for a, b in zip(ours, reference)]
        assert np.mean(ious) >= 0.98, (method, ious)
        diffs = [np.abs(a.prob - b.prob).mean() for a, b in zip(ours, reference)]
        assert np.mean(diffs) < 1e-3, (method, diffs)
    assert 0.02 < np.mean([r.mask.mean() for r in reference]) < 0.98  # TokenCut's: not trivially empty/full


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_displayed_as_the_pil_path_does(orientation):
    # Asymmetric content: a wrong flip or rotation moves the bright corner block.
    stored = np.full((48, 80, 3), 40, np.uint8)
    stored[:16, :24] = (250, 30, 30)
    stored[30:, 60:] = (30, 30, 250)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    data = encode(im, "JPEG", quality=95, exif=exif.tobytes())
    got = decode_and_prepare([data], 32, 8)[0]
    want = cpu_path(data, 32, 8)
    assert tuple(got.pixels.shape) == want.shape
    assert (got.height, got.width) == ((80, 48) if orientation >= 5 else (48, 80))
    assert np.abs(got.pixels.numpy().astype(int) - want).mean() < 2.0


def outcome(result) -> tuple:
    if isinstance(result, ImageDecodeError):
        return type(result).__name__, str(result)
    return "ok", tuple(result.pixels.shape)


def test_other_inputs_take_the_cpu_path_with_its_errors():
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(rgb), "JPEG")
    inputs = {
        "png": encode(Image.fromarray(rgb), "PNG"),
        "cmyk jpeg": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "gray jpeg": encode(Image.fromarray(rgb).convert("L"), "JPEG"),
        "truncated jpeg": jpeg[: len(jpeg) * 2 // 3],
        "text named .jpg": b"not an image at all",
        "empty": b"",
        "jpeg": jpeg,
    }
    results = decode_and_prepare(list(inputs.values()), 32, 8)
    for (name, data), got in zip(inputs.items(), results):
        try:
            want = ("ok", cpu_path(data, 32, 8).shape)
        except ImageDecodeError as exc:
            want = (type(exc).__name__, str(exc))
        assert outcome(got) == want, name
    assert [outcome(r)[0] for r in results] == [
        "ok", "ok", "ok", "TruncatedImageError", "NotAnImageError", "EmptyImageError", "ok"
    ]
    np.testing.assert_array_equal(results[0].pixels.numpy(), cpu_path(inputs["png"], 32, 8))  # PIL did it


def test_pixel_limit_is_the_cpu_paths():
    data = encode(Image.new("RGB", (64, 48)), "JPEG")
    got = decode_and_prepare([data], 32, 8, max_pixels=64 * 48 - 1)[0]
    assert outcome(got)[0] == "ImageTooLargeError"


def test_a_jpeg_the_decoder_rejects_falls_back_alone():
    """Scan data replaced by zeros: the header passes, decode fails or gives pixels; the
    other images of the batch are decoded either way."""
    rgb = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    good = encode(Image.fromarray(rgb), "JPEG")
    sos = good.index(b"\xff\xda")
    damaged = good[: sos + 12] + b"\xff\x00" * 200 + b"\xff\xd9"
    results = decode_and_prepare([good, damaged, good], 32, 8)
    assert outcome(results[0]) == outcome(results[2]) == ("ok", (32, 48, 3))
    assert outcome(results[1])[0] in {"ok", "ImageDecodeError", "TruncatedImageError"}


def test_prefetch_starts_the_next_copy_before_yielding_the_current():
    events: list[str] = []

    def start(batch: int):
        events.append(f"start {batch}")
        return lambda: events.append(f"wait {batch}") or batch * 10

    for result in prefetch(range(3), start):
        events.append(f"compute {result}")
    assert events == [
        "start 0", "start 1", "wait 0", "compute 0", "start 2", "wait 1", "compute 10", "wait 2", "compute 20",
    ]
    assert list(prefetch([], start)) == []


def test_device_copier_on_cpu_returns_the_tensor():
    x = torch.arange(6, dtype=torch.uint8).reshape(2, 3)
    out = list(prefetch([x, x + 1], DeviceCopier("cpu")))
    assert torch.equal(out[0], x) and torch.equal(out[1], x + 1)
