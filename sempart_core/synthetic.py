"""Synthetic scenes with known object masks: a coloured shape on a textured background.

Used by tests (does training learn?), benchmarks and the demo, where no labelled data
may be used. Deterministic for a given seed.
"""
from __future__ import annotations

import numpy as np


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-saturation background: a smooth colour gradient, stripes and pixel noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 190, size=3).astype(np.float32)
    grad = rng.uniform(-40, 40, size=(2, 3)).astype(np.float32)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.15, 0.5)
    stripes = 18 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    img = (
        base
        + grad[0] * (yy / h)[..., None]
        + grad[1] * (xx / w)[..., None]
        + stripes[..., None]
        + rng.normal(0, 8, size=(h, w, 3))
    )
    grey = img.mean(-1, keepdims=True)
    return 0.5 * img + 0.5 * grey  # halve the saturation


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An ellipse or a rectangle covering roughly 8-30% of the image, away from the border."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    ry, rx = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w
    if rng.random() < 0.5:
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return (np.abs(yy - cy) <= ry * 0.85) & (np.abs(xx - cx) <= rx * 0.85)


def synthetic_scene(seed: int, size: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 HxWx3, mask bool HxW) pair: a saturated object on a texture."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = _texture(rng, h, w)
    mask = _shape_mask(rng, h, w)
    hue = rng.integers(0, 3)
    colour = np.full(3, 40.0, dtype=np.float32)
    colour[hue] = 230.0
    colour[(hue + 1) % 3] = rng.uniform(40, 160)
    shade = rng.normal(0, 10, size=(h, w, 1))
    img[mask] = (colour + shade)[mask]
    return np.clip(img, 0, 255).astype(np.uint8), mask


def synthetic_dataset(n: int, size: tuple[int, int] = (128, 128), seed: int = 0):
    """Lists of n images and their masks, scene i seeded with seed * 100_003 + i."""
    pairs = [synthetic_scene(seed * 100_003 + i, size) for i in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]
