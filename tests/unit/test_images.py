"""decode_image and the size helpers, on images generated in memory with PIL.

Expected pixels come from an independent route where one exists (float formulas,
ImageOps.exif_transpose, Image.alpha_composite, hand-built PNG bytes).
"""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from sempart_core.images import (
    DEFAULT_MAX_PIXELS,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    decode_image,
    input_shape,
    prepare_image,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def handmade_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG built byte by byte (signature, IHDR, one IDAT of filter-0 rows, IEND)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def assert_one_line(exc: pytest.ExceptionInfo) -> None:
    message = str(exc.value)
    assert message and "\n" not in message


# --- plain decoding -------------------------------------------------------------


def test_rgb_png_is_exact_and_writable():
    rgb = random_rgb(30, 41)
    out = decode_image(encode(Image.fromarray(rgb), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (30, 41, 3)
    np.testing.assert_array_equal(out, rgb)
    assert out.flags.writeable and out.flags.c_contiguous


def test_one_by_one_image():
    out = decode_image(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))
    np.testing.assert_array_equal(out, [[[10, 20, 30]]])


def test_grayscale_l_repeats_channels():
    gray = np.tile(np.arange(256, dtype=np.uint8), (5, 1))
    out = decode_image(encode(Image.fromarray(gray, "L"), "PNG"))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))


def test_one_bit_image():
    bits = np.zeros((8, 16), dtype=bool)
    bits[2:5, 3:11] = True
    data = encode(Image.fromarray(bits).convert("1"), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    out = decode_image(data)
    np.testing.assert_array_equal(out, np.repeat(bits[..., None], 3, axis=2) * 255)


# --- EXIF orientation -----------------------------------------------------------


def with_orientation(im: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif.tobytes())


def test_exif_orientation_6_rotates_jpeg_clockwise():
    # Stored 40 wide x 20 high, red 10x10 top-left corner, blue elsewhere.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[...] = BLUE
    stored[:10, :10] = RED
    out = decode_image(with_orientation(Image.fromarray(stored), "JPEG", 6))
    assert out.shape == (40, 20, 3)  # displayed 20 wide x 40 high
    # Orientation 6 = rotate 90 deg clockwise to display: top-left goes to top-right.
    np.testing.assert_allclose(out[3, 16], RED, atol=40)
    np.testing.assert_allclose(out[3, 3], BLUE, atol=40)
    np.testing.assert_allclose(out[36, 16], BLUE, atol=40)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pil_exif_transpose(orientation):
    data = with_orientation(Image.fromarray(random_rgb(7, 12, seed=orientation)), "PNG", orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    out = decode_image(data)
    assert out.shape == ((12, 7, 3) if orientation >= 5 else (7, 12, 3))
    np.testing.assert_array_equal(out, expected)


def tiff_exif(tag_type: int, count: int, value: bytes) -> bytes:
    """EXIF block with one Orientation entry of any type, built by hand."""
    entry = struct.pack("<HHI", 0x0112, tag_type, count) + value
    return b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + entry + struct.pack("<I", 0)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",
        tiff_exif(2, 4, b"abc\x00"),
        tiff_exif(3, 1, b"\x09\x00\x00\x00"),
    ],
    ids=["broken-ifd", "text-orientation", "orientation-9"],
)
def test_unusable_exif_keeps_the_pixels_upright(exif):
    rgb = random_rgb(6, 9)
    data = encode(Image.fromarray(rgb), "PNG", exif=exif)
    np.testing.assert_array_equal(decode_image(data), rgb)


# --- alpha, palettes, CMYK ------------------------------------------------------


def over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference compositing in floats (never exactly .5, so rounding is unambiguous)."""
    a = alpha.astype(np.float64) / 255.0
    return np.floor(color * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def test_la_is_composited_on_white():
    rng = np.random.default_rng(1)
    la = rng.integers(0, 256, (20, 30, 2), dtype=np.uint8)
    la[0, 0] = (0, 0)  # fully transparent black -> white
    la[0, 1] = (0, 255)  # opaque black stays black
    out = decode_image(encode(Image.fromarray(la, "LA"), "PNG"))
    expected = over_white(la[..., 0], la[..., 1])
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))
    np.testing.assert_array_equal(out[0, 0], WHITE)
    np.testing.assert_array_equal(out[0, 1], (0, 0, 0))


def test_rgba_matches_float_formula_and_pil_alpha_composite():
    rgba = np.random.default_rng(2).integers(0, 256, (25, 35, 4), dtype=np.uint8)
    im = Image.fromarray(rgba, "RGBA")
    out = decode_image(encode(im, "PNG"))
    np.testing.assert_array_equal(out, over_white(rgba[..., :3], rgba[..., 3:]))
    pil = np.asarray(Image.alpha_composite(Image.new("RGBA", im.size, WHITE), im).convert("RGB"))
    assert np.abs(out.astype(int) - pil).max() <= 1


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(fmt):
    index = np.zeros((10, 12), np.uint8)
    index[:, 4:8] = 1
    index[:, 8:] = 2
    im = Image.fromarray(index, "P")
    im.putpalette([0, 0, 0, *RED, *GREEN] + [0] * (253 * 3))
    data = encode(im, fmt, transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data)
    np.testing.assert_array_equal(out[:, :4], np.broadcast_to(WHITE, (10, 4, 3)))
    np.testing.assert_array_equal(out[:, 4:8], np.broadcast_to(RED, (10, 4, 3)))
    np.testing.assert_array_equal(out[:, 8:], np.broadcast_to(GREEN, (10, 4, 3)))


def test_rgb_png_with_transparent_colour_key():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, :3] = (1, 2, 3)
    rgb[:, 3:] = BLUE
    out = decode_image(encode(Image.fromarray(rgb), "PNG", transparency=(1, 2, 3)))
    np.testing.assert_array_equal(out[:, :3], np.broadcast_to(WHITE, (4, 3, 3)))
    np.testing.assert_array_equal(out[:, 3:], np.broadcast_to(BLUE, (4, 3, 3)))


def test_cmyk_jpeg():
    cmyk = np.zeros((16, 32, 4), np.uint8)
    cmyk[:, :16] = (255, 0, 0, 0)  # pure cyan
    cmyk[:, 16:] = (0, 0, 0, 255)  # pure black ink
    data = encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data).astype(int)
    assert out.shape == (16, 32, 3)
    np.testing.assert_allclose(out[4:12, 2:12], np.broadcast_to((0, 255, 255), (8, 10, 3)), atol=8)
    np.testing.assert_allclose(out[4:12, 20:30], np.zeros((8, 10, 3)), atol=8)


# --- high bit depth -------------------------------------------------------------


def test_16bit_gray_png_is_scaled_not_clipped():
    gradient = np.linspace(0, 65535, 300).round().astype(np.uint16)
    values = np.tile(gradient, (4, 1))
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode in {"I;16", "I"}
    out = decode_image(data)
    expected = np.floor(values / 257.0 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)
    assert len(np.unique(out)) > 200  # a clip to 255 would leave almost one value


def test_16bit_gray_png_with_transparent_value():
    values = np.full((3, 5), 1000, np.uint16)
    values[:, 0] = 5000
    out = decode_image(encode(Image.fromarray(values), "PNG", transparency=5000))
    np.testing.assert_array_equal(out[:, 0], np.full((3, 3), 255))
    np.testing.assert_array_equal(out[:, 1:], np.full((3, 4, 3), round(1000 / 257)))


def test_handmade_16bit_rgb_png():
    rng = np.random.default_rng(3)
    samples = rng.integers(0, 65536, (6, 9, 3)).astype(">u2")
    rows = b"".join(b"\x00" + samples[y].tobytes() for y in range(6))
    out = decode_image(handmade_png(9, 6, 16, 2, rows))
    assert out.shape == (6, 9, 3)
    assert np.abs(out - samples / 257.0).max() <= 1.0


def test_float_tiff_in_unit_range_is_times_255():
    values = np.linspace(0.2, 0.6, 12, dtype=np.float32).reshape(3, 4)  # not stretched
    data = encode(Image.fromarray(values, "F"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = decode_image(data)
    np.testing.assert_array_equal(out[..., 0], np.floor(values * 255.0 + 0.5).astype(np.uint8))


def test_out_of_range_samples_are_stretched_min_to_max():
    floats = np.array([[-5.0, 0.0, 5.0]], np.float32)
    out_f = decode_image(encode(Image.fromarray(floats, "F"), "TIFF"))[0, :, 0]
    np.testing.assert_array_equal(out_f, [0, 128, 255])
    ints = np.array([[-100000, 0, 100000]], np.int32)
    data = encode(Image.fromarray(ints, "I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(decode_image(data)[0, :, 0], [0, 128, 255])


# --- animation ------------------------------------------------------------------


@pytest.mark.parametrize("fmt,kwargs", [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})])
def test_animated_image_gives_first_frame(fmt, kwargs):
    frames = [Image.new("RGB", (12, 10), c) for c in (RED, GREEN, BLUE)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=50, **kwargs)
    data = buf.getvalue()
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode_image(data)
    np.testing.assert_array_equal(out, np.broadcast_to(RED, (10, 12, 3)))


# --- bad input ------------------------------------------------------------------


def test_zero_bytes():
    with pytest.raises(EmptyImageError) as exc:
        decode_image(b"")
    assert_one_line(exc)


def test_text_is_not_an_image():
    text = b"uri,label\ns3://bucket/a.jpg,cat\n" * 20
    with pytest.raises(NotAnImageError) as exc:
        decode_image(text)
    assert_one_line(exc)


def test_all_errors_are_value_errors():
    for cls in (EmptyImageError, NotAnImageError, TruncatedImageError, ImageTooLargeError):
        assert issubclass(cls, ImageDecodeError) and issubclass(cls, ValueError)


TRUNCATABLE = ["JPEG", "PNG", "GIF", "BMP", "TIFF"]


def truncated(fmt: str) -> bytes:
    data = encode(Image.fromarray(random_rgb(64, 80, seed=4)), fmt)
    return data[: len(data) * 2 // 3]


@pytest.mark.parametrize("fmt", [*TRUNCATABLE, "WEBP"])
def test_truncated_image(fmt):
    with pytest.raises(TruncatedImageError) as exc:
        decode_image(truncated(fmt))
    assert_one_line(exc)


@pytest.mark.parametrize("fmt", TRUNCATABLE)
def test_truncated_image_even_if_pil_is_told_to_accept_it(fmt, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = truncated(fmt)
    Image.open(io.BytesIO(data)).load()  # PIL alone now accepts it and fills grey
    with pytest.raises(TruncatedImageError):
        decode_image(data)


def test_truncated_jpeg_header():
    data = encode(Image.new("RGB", (10, 10)), "JPEG")
    with pytest.raises(TruncatedImageError):
        decode_image(data[:100])


def test_png_cut_inside_its_header_is_a_decode_error():
    with pytest.raises(ImageDecodeError):
        decode_image(encode(Image.new("RGB", (10, 10)), "PNG")[:20])


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    return handmade_png(width, height, 8, 2, b"\x00" * 16)


@pytest.mark.parametrize("pil_limit", ["default", None])
def test_decompression_bomb_is_refused_from_the_header(pil_limit, monkeypatch):
    if pil_limit is None:  # our check must not depend on PIL's global limit
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    data = huge_png_header()
    assert len(data) < 100
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as exc:
        decode_image(data)
    # Decoding 10^10 pixels would take minutes and 30 GB; the header check takes ms.
    assert time.perf_counter() - start < 2.0
    assert_one_line(exc)


def test_max_pixels_boundary():
    data = encode(Image.new("RGB", (50, 40), RED), "PNG")
    assert decode_image(data, max_pixels=2000).shape == (40, 50, 3)
    with pytest.raises(ImageTooLargeError, match="50x40"):
        decode_image(data, max_pixels=1999)


def test_pil_global_state_is_untouched():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for data in (huge_png_header(), truncated("JPEG"), b"", b"text", encode(Image.new("RGB", (3, 3)), "PNG")):
        try:
            decode_image(data, max_pixels=5)
        except ImageDecodeError:
            pass
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before
    assert DEFAULT_MAX_PIXELS == 89_478_485


def test_headerless_formats_only_when_asked():
    data = encode(Image.new("RGB", (5, 4), GREEN), "TGA")
    with pytest.raises(NotAnImageError):
        decode_image(data)
    np.testing.assert_array_equal(decode_image(data, formats=None), np.broadcast_to(GREEN, (4, 5, 3)))


def test_unknown_format_name_is_a_clear_error():
    with pytest.raises(ValueError, match="NOSUCHFORMAT") as exc:
        decode_image(encode(Image.new("RGB", (2, 2)), "PNG"), formats=("PNG", "nosuchformat"))
    assert not isinstance(exc.value, ImageDecodeError)  # a caller's mistake, not bad data


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_corrupted_bytes_give_an_image_or_a_decode_error(fmt):
    """Random byte damage: never another exception type, never a hang."""
    base = encode(Image.fromarray(random_rgb(24, 32, seed=5)), fmt)
    rng = np.random.default_rng(6)
    start = time.perf_counter()
    outcomes = set()
    for _ in range(150):
        data = bytearray(base)
        for pos in rng.integers(0, len(data), rng.integers(1, 6)):
            data[pos] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(1, len(data)))]
        try:
            out = decode_image(bytes(data), max_pixels=1_000_000)
        except ImageDecodeError as exc:
            assert "\n" not in str(exc)
            outcomes.add(type(exc).__name__)
        else:
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
            outcomes.add("ok")
    assert time.perf_counter() - start < 30.0
    assert len(outcomes) >= 2  # the damage really did hit something


# --- backbone input size ----------------------------------------------------------


@pytest.mark.parametrize(
    "shape,size,patch,expected",
    [
        ((300, 400), 320, 8, (320, 424)),  # 426.7 -> nearest multiple of 8
        ((400, 300), 224, 16, (304, 224)),  # 298.7 -> 304
        ((224, 224), 224, 16, (224, 224)),
        ((5, 1000), 64, 8, (64, 256)),  # panorama: longer side capped at 4x
        ((1, 1), 64, 16, (64, 64)),
        ((3, 500), 8, 16, (16, 32)),  # never below one patch
    ],
)
def test_input_shape(shape, size, patch, expected):
    h, w = input_shape(*shape, size, patch)
    assert (h, w) == expected and h % patch == 0 and w % patch == 0


def test_prepare_image_antialiases_fine_texture():
    checker = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)
    rgb = np.repeat(checker[..., None], 3, axis=2)
    out = prepare_image(rgb, 16, 8).astype(int)
    assert out.shape == (16, 16, 3)
    # Nearest-neighbour sampling would give 0 or 255; an averaging filter gives ~127.
    assert np.abs(out - 127.5).max() <= 16


def test_prepare_image_keeps_constant_colour_and_skips_no_op():
    rgb = np.empty((30, 50, 3), np.uint8)
    rgb[...] = (12, 200, 99)
    np.testing.assert_array_equal(prepare_image(rgb, 12, 4), np.broadcast_to((12, 200, 99), (12, 20, 3)))
    same = random_rgb(32, 48)
    assert prepare_image(same, 32, 16) is same
