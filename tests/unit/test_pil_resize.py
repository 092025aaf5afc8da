"""sempart_core.pil_resize gives PIL's resize bit for bit: 8-bit images (the model's
input on the device decode path) and float maps (the map at the image's size when
finishing on the device), shrinking, enlarging, one axis, both, in either pass order."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sempart_core.images import decode_image
from sempart_core.pil_resize import bilinear_float32, bilinear_uint8

PHOTO = sorted((Path(__file__).resolve().parents[1] / "data" / "duts-te" / "images").glob("*.jpg"))[0]

SIZES = [
    ((300, 400), (96, 128)),  # shrink both ways, horizontal pass first
    ((400, 300), (128, 96)),  # the height shrinks by more than twice the width: Pillow 13 starts vertically
    ((48, 80), (96, 160)),  # enlarge
    ((30, 41), (301, 397)),  # enlarge ~10x, as a model map to its image
    ((120, 41), (37, 88)),  # shrink one axis, enlarge the other
    ((97, 203), (97, 64)),  # one axis only
    ((5, 7), (1, 1)),
    ((1, 1), (3, 2)),
]


def pil_resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize(size[::-1], Image.Resampling.BILINEAR))


@pytest.mark.parametrize("size, new_size", SIZES)
def test_uint8_images_are_pils_bit_for_bit(size, new_size):
    rng = np.random.default_rng(sum(size) + sum(new_size))
    noise = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    photo = decode_image(PHOTO.read_bytes())[: size[0], : size[1]]
    for rgb in (noise, pil_resize(noise[::4, ::4], size), photo):
        got = bilinear_uint8(torch.from_numpy(rgb.copy()).permute(2, 0, 1), *new_size).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, pil_resize(rgb, new_size))


@pytest.mark.parametrize("size, new_size", SIZES)
def test_float_maps_are_pils_bit_for_bit(size, new_size):
    rng = np.random.default_rng(sum(size) * sum(new_size))
    smooth = pil_resize(rng.random((max(1, size[0] // 8), max(1, size[1] // 8)), dtype=np.float32), size)
    blocky = np.kron(rng.random((size[0] // 4 + 1, size[1] // 4 + 1)) > 0.5, np.ones((4, 4)))[: size[0], : size[1]]
    for prob in (rng.random(size, dtype=np.float32), smooth, blocky.astype(np.float32)):
        got = bilinear_float32(torch.from_numpy(prob)[None], *new_size)[0].numpy()
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, pil_resize(prob, new_size))
