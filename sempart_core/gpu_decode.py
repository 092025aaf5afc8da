"""Decode and prepare a batch of image bytes on a torch device (nvJPEG on a GPU).

On a GPU node, PIL decode on the CPU is what limits labelling (about 390 JPEGs/s per
core, against thousands per second batched on one GPU). `decode_and_prepare` decodes
plain JPEGs in one `torchvision.io.decode_jpeg` call on the device, applies their EXIF
orientation and resizes them there with PIL's own arithmetic (`pil_resize`); every
other input (PNG, WebP, CMYK or truncated JPEGs, a failed batch decode, ...) goes
through the CPU path (`decode_image` + `prepare_image`), so results and error messages
are the same as today. With device="cpu" the same path runs on torchvision's CPU
decoder, libjpeg-turbo as in PIL: the prepared inputs are then PIL's, bit for bit. On a
GPU, nvJPEG decodes (its IDCT and chroma upsampling are its own).

Which JPEGs take the fast path is decided from the header alone (PIL reads it without
decoding pixels): format JPEG, mode RGB or L, within the pixel limit, data ending with
the EOI marker (a truncated file is left to the CPU path, which detects truncation).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import torch
from PIL import Image

from .images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    _exif_orientation,
    decode_image,
    input_shape,
    prepare_image,
)
from .pil_resize import bilinear_uint8

logger = logging.getLogger(__name__)

_FAST_MODES = frozenset({"RGB", "L"})
_EOI = b"\xff\xd9"


@dataclass
class PreparedImage:
    """One image ready for `Predictor.infer`, and its displayed size for `finish`."""

    pixels: torch.Tensor  # uint8 [h_in, w_in, 3] on the device
    height: int  # of the decoded image in displayed orientation
    width: int


def decode_and_prepare(
    datas: list[bytes],
    image_size: int,
    patch: int,
    device: str | torch.device = "cpu",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[PreparedImage | ImageDecodeError]:
    """Each input's prepared image on `device`, or the `ImageDecodeError` that the CPU
    decoder raised for it (format it as the pipeline does today)."""
    device = torch.device(device)
    out: list[PreparedImage | ImageDecodeError | None] = [None] * len(datas)
    fast: list[tuple[int, int]] = []  # (index, EXIF orientation)
    for i, data in enumerate(datas):
        orientation = _fast_path_orientation(data, max_pixels)
        if orientation is None:
            out[i] = _on_cpu(data, image_size, patch, device, max_pixels)
        else:
            fast.append((i, orientation))
    decoded = _decode_jpegs([torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i, _ in fast], device)
    for (i, orientation), chw in zip(fast, decoded):
        if chw is None:  # the device decoder refused it: the CPU path says why, or decodes it
            out[i] = _on_cpu(datas[i], image_size, patch, device, max_pixels)
            continue
        chw = orient(chw, orientation)
        height, width = chw.shape[-2:]
        out[i] = PreparedImage(resize_chw(chw, image_size, patch).permute(1, 2, 0).contiguous(), height, width)
    return out  # type: ignore[return-value]


def _fast_path_orientation(data: bytes, max_pixels: int) -> int | None:
    """The EXIF orientation of a JPEG the device decoder can take, else None."""
    if not data.rstrip(b"\0").endswith(_EOI):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:  # header only
            width, height = im.size
            if im.format != "JPEG" or im.mode not in _FAST_MODES or not 0 < width * height <= max_pixels:
                return None
            return _exif_orientation(im)
    except Exception:  # noqa: BLE001 - anything unusual is left to the CPU path
        return None


def _decode_jpegs(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 [3, H, W] per input; a batch that fails is retried one by one, and an
    input that still fails gives None."""
    if not tensors:
        return []
    try:
        return list(_decode(tensors, device))
    except RuntimeError as exc:
        logger.debug("batch JPEG decode failed (%s), decoding one by one", exc)
    results: list[torch.Tensor | None] = []
    for t in tensors:
        try:
            results.append(_decode([t], device)[0])
        except RuntimeError:
            results.append(None)
    return results


def _decode(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def _on_cpu(data: bytes, image_size: int, patch: int, device: torch.device,
            max_pixels: int) -> PreparedImage | ImageDecodeError:
    try:
        rgb = decode_image(data, max_pixels)
    except ImageDecodeError as exc:
        return exc
    prepared = torch.from_numpy(prepare_image(rgb, image_size, patch).copy())
    return PreparedImage(prepared.to(device), rgb.shape[0], rgb.shape[1])


def orient(chw: torch.Tensor, orientation: int) -> torch.Tensor:
    """Stored pixels [C, H, W] -> displayed orientation (the EXIF tag's meaning, as
    PIL's ImageOps.exif_transpose applies it)."""
    if orientation == 2:
        return chw.flip(-1)
    if orientation == 3:
        return chw.flip(-2, -1)
    if orientation == 4:
        return chw.flip(-2)
    if orientation == 5:
        return chw.transpose(-2, -1)
    if orientation == 6:
        return chw.rot90(-1, (-2, -1))
    if orientation == 7:
        return chw.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return chw.rot90(1, (-2, -1))
    return chw


def resize_chw(chw: torch.Tensor, image_size: int, patch: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h_in, w_in] as `prepare_image` sizes and resizes it
    (PIL's own arithmetic, `pil_resize`: both decode paths feed the model alike)."""
    h, w = input_shape(chw.shape[-2], chw.shape[-1], image_size, patch)
    if (h, w) == tuple(chw.shape[-2:]):
        return chw
    return bilinear_uint8(chw, h, w)
