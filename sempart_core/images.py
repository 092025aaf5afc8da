"""Decode untrusted image bytes into an RGB array, and size helpers for the backbone.

Labelling runs over millions of images from object storage, so every input is
untrusted: it may be empty, not an image, truncated, a decompression bomb, or in any
of PIL's modes. `decode_image` turns all of these into either an HxWx3 uint8 RGB array
(displayed orientation, alpha composited on white) or an `ImageDecodeError` subclass
with a one-line message, which the pipeline stores in the row's `error` column.

PIL global state (`Image.MAX_IMAGE_PIXELS`, `ImageFile.LOAD_TRUNCATED_IMAGES`) is
neither changed nor relied on: the pixel limit is checked here from the header, and
truncation is detected by watching reads, so another library flipping those globals in
the same process changes nothing.
"""
from __future__ import annotations

import functools
import io
import logging
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image

logger = logging.getLogger(__name__)

# PIL's own default for Image.MAX_IMAGE_PIXELS (about 0.25 GB of RGB at 3 bytes/px).
DEFAULT_MAX_PIXELS = 89_478_485

# Formats tried by default. A closed list keeps exotic plugins away from untrusted
# bytes (EPS runs Ghostscript in a subprocess; headerless formats such as TGA would
# claim random bytes). Phone JPEGs with a multi-picture segment (MPO) open as JPEG.
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM")

# Transparent pixels are composited on white: transparent backgrounds are usually
# drawn on white pages, and a white background keeps dark objects separable.
BACKGROUND = 255

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# EXIF orientation -> the transpose that displays the stored pixels upright (the same
# table as ImageOps.exif_transpose, applied without rewriting the EXIF block).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

RGBArray = npt.NDArray[np.uint8]


class ImageDecodeError(ValueError):
    """Bytes that cannot become an RGB image; also raised as-is for corrupt data."""


class EmptyImageError(ImageDecodeError):
    """Zero bytes, or an image with no pixels."""


class NotAnImageError(ImageDecodeError):
    """Bytes that no allowed image format recognises."""


class TruncatedImageError(ImageDecodeError):
    """The data ends before the (first frame's) pixels do."""


class ImageTooLargeError(ImageDecodeError):
    """The header announces more pixels than allowed (decompression bomb guard)."""


class _EofTrackingReader(io.BytesIO):
    """BytesIO that records a read at the end of the data.

    A decoder that asks for more bytes after the last one has met a truncated file;
    seeing this here does not depend on PIL's LOAD_TRUNCATED_IMAGES, under which PIL
    would otherwise fill the missing pixels with grey and return normally.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.hit_eof = False

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if not chunk and size != 0:
            self.hit_eof = True
        return chunk


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    formats: Sequence[str] | None = IMAGE_FORMATS,
    exif_transpose: bool = True,
) -> RGBArray:
    """Decode image bytes into an HxWx3 uint8 RGB array in displayed orientation.

    The pixel count is checked from the header before any pixel is decoded. Animated
    images give their first frame; alpha and palette transparency are composited on
    white; 16-bit and float samples are scaled to 8 bits (see `_high_depth_to_uint8`).
    `formats=None` lets PIL try every plugin it has. `exif_transpose=False` keeps the
    stored pixel order: benchmark masks and boxes are drawn on the stored pixels (their
    readers, as LOST's and TokenCut's, ignore EXIF), so evaluation decodes that way.
    Raises an `ImageDecodeError` subclass for anything that is not a usable image.
    """
    if len(data) == 0:
        raise EmptyImageError("empty input: 0 bytes")
    allowed = None if formats is None else _known_formats(tuple(formats))
    reader = _EofTrackingReader(data)
    im = _open(reader, data, allowed)
    try:
        width, height = im.size
        if width < 1 or height < 1:
            raise EmptyImageError(f"{im.format} image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"{im.format} image is {width}x{height} = {width * height} pixels, "
                f"over the limit of {max_pixels}"
            )
        _load(im, reader)
        orientation = _exif_orientation(im) if exif_transpose else 1
        rgb = _to_rgb(im)
    finally:
        im.close()
    if orientation in _ORIENTATION_TRANSPOSE:
        rgb = _transpose_array(rgb, orientation)
    return rgb


@functools.lru_cache(maxsize=8)
def _known_formats(formats: tuple[str, ...]) -> tuple[str, ...]:
    """Upper-cased formats, checked once, so a typo is a clear error, not bad images."""
    Image.init()  # registers every plugin, as Image.open does on its own fallback
    upper = tuple(f.upper() for f in formats)
    unknown = [f for f in upper if f not in Image.OPEN]
    if unknown:
        raise ValueError(f"PIL cannot open format(s) {', '.join(unknown)}")
    return upper


def _open(reader: _EofTrackingReader, data: bytes, formats: tuple[str, ...] | None) -> Image.Image:
    """Identify the format and read the header only (PIL's open is lazy)."""
    try:
        return Image.open(reader, formats=formats)
    except Image.DecompressionBombError as exc:
        # PIL's own, global limit (2x MAX_IMAGE_PIXELS) fired before ours could.
        raise ImageTooLargeError(_one_line(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise NotAnImageError(
            f"not a recognised image format ({len(data)} bytes, starting {bytes(data[:8])!r})"
        ) from exc
    except Exception as exc:  # plugins raise many types on malformed headers
        if _says_truncated(exc, data):
            raise TruncatedImageError(f"image data is truncated: {_one_line(exc)}") from exc
        raise ImageDecodeError(f"corrupt image header: {_one_line(exc)}") from exc


def _says_truncated(exc: Exception, data: bytes) -> bool:
    """For failures while opening (WebP decodes whole images there). PIL says
    "truncated" in its messages; its WebP errors do not, but WebP (a RIFF container)
    states its length, so a short WebP is recognisable from the bytes."""
    riff_short = data[:4] == b"RIFF" and len(data) < 8 + int.from_bytes(data[4:8], "little")
    return "truncat" in str(exc).lower() or riff_short


def _load(im: Image.Image, reader: _EofTrackingReader) -> None:
    """Decode the first frame's pixels; a failed or a successful load that read past
    the end of the data is a truncation, any other failure is corruption."""
    reader.hit_eof = False
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(_one_line(exc)) from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, EOFError, ...
        if reader.hit_eof:
            raise TruncatedImageError(f"{im.format} data is truncated: {_one_line(exc)}") from exc
        raise ImageDecodeError(f"corrupt {im.format} data: {_one_line(exc)}") from exc
    if reader.hit_eof:
        raise TruncatedImageError(f"{im.format} data ends before the image does")


def _exif_orientation(im: Image.Image) -> int:
    """EXIF orientation tag (1 = upright); unreadable EXIF counts as upright."""
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception as exc:  # malformed EXIF must not cost the pixels
        logger.debug("ignoring unreadable EXIF: %s", _one_line(exc))
        return 1


def _transpose_array(rgb: RGBArray, orientation: int) -> RGBArray:
    return np.array(Image.fromarray(rgb).transpose(_ORIENTATION_TRANSPOSE[orientation]))


def _has_alpha(im: Image.Image) -> bool:
    palette_alpha = im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA"
    return im.mode in _ALPHA_MODES or "transparency" in im.info or palette_alpha


def _to_rgb(im: Image.Image) -> RGBArray:
    """Any PIL mode -> HxWx3 uint8 RGB, transparency composited on white."""
    if im.mode in {"I", "F"} or im.mode.startswith("I;16"):
        values = np.asarray(im)
        gray = _high_depth_to_uint8(values)
        transparency = im.info.get("transparency")
        if isinstance(transparency, int):
            alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
            gray = _composite_on_background(gray[..., None], alpha[..., None])[..., 0]
        return np.repeat(gray[..., None], 3, axis=2)
    try:
        if _has_alpha(im):
            rgba = np.asarray(im.convert("RGBA"))
            return _composite_on_background(rgba[..., :3], rgba[..., 3:])
        return np.array(im if im.mode == "RGB" else im.convert("RGB"))
    except ValueError as exc:  # e.g. a mode PIL cannot convert
        raise ImageDecodeError(f"cannot convert {im.format} mode {im.mode} to RGB: {_one_line(exc)}") from exc


def _composite_on_background(color: RGBArray, alpha: RGBArray) -> RGBArray:
    """Rounded color*a + BACKGROUND*(1-a) in integers (max 65152, fits uint16)."""
    c = color.astype(np.uint16)
    a = alpha.astype(np.uint16)
    return ((c * a + BACKGROUND * (255 - a) + 127) // 255).astype(np.uint8)


def _high_depth_to_uint8(values: np.ndarray) -> npt.NDArray[np.uint8]:
    """Scale 16/32-bit integer or float samples to 0..255 (PIL's convert clips instead).

    Integers within 0..65535 are 16-bit samples: round(v / 257), so 65535 -> 255
    (PIL may give a 16-bit PNG as mode I or I;16 depending on its version). Floats
    within 0..1 are scaled by 255. Anything else is stretched from its min..max.
    Non-finite floats become 0.
    """
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        v = np.where(finite, values, 0.0).astype(np.float64)
        lo, hi = (float(v[finite].min()), float(v[finite].max())) if finite.any() else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(v * 255.0).astype(np.uint8)
    else:
        v = values.astype(np.int64)
        lo, hi = int(v.min()), int(v.max())
        if lo >= 0 and hi <= 65535:
            return ((v + 128) // 257).astype(np.uint8)
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.rint((v - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


# The longer side is capped at this many times the shorter one (panoramas).
MAX_ASPECT = 4.0


def input_shape(height: int, width: int, image_size: int, patch: int) -> tuple[int, int]:
    """Backbone input size for an image: shorter side ~image_size, both multiples of p.

    Each side is scaled by the same factor, then rounded to the nearest multiple of the
    patch (an aspect change below half a patch) instead of being padded: padding would
    add tokens that are not part of the image to the semantic graph.
    """
    scale = image_size / min(height, width)
    h, w = height * scale, width * scale
    cap = image_size * MAX_ASPECT
    h, w = min(h, cap), min(w, cap)
    return max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)


def prepare_image(rgb: RGBArray, image_size: int, patch: int) -> RGBArray:
    """RGB uint8 [H, W, 3] -> the backbone's input [h_in, w_in, 3] (see `input_shape`).

    A function of the config alone (no torch), so that the CPU workers of the labelling
    pipeline prepare images without loading the model. PIL's bilinear filter widens its
    support when shrinking (antialiasing), so fine texture averages out.
    """
    h, w = input_shape(rgb.shape[0], rgb.shape[1], image_size, patch)
    if (h, w) == rgb.shape[:2]:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
