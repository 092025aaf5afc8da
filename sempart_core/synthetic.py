"""Synthetic scenes with known object masks: a coloured shape on a textured background.

Used by tests (does training learn?), benchmarks and the demo, where no labelled data
may be used. Deterministic for a given seed. As files, for `sempart train` and
`sempart eval` (README, "Check the method on synthetic scenes"):

    python -m sempart_core.synthetic --out scenes/train --n 48 --seed 1
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


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


def write_scenes(out: str | Path, n: int, size: tuple[int, int] = (128, 128), seed: int = 0) -> Path:
    """`synthetic_dataset(n, size, seed)` as PNGs: OUT/images/NNNN.png (RGB) and
    OUT/masks/NNNN.png (0 or 255), the layout `sempart eval --images --gt` reads."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    images, masks = synthetic_dataset(n, size, seed)
    for i, (rgb, mask) in enumerate(zip(images, masks)):
        Image.fromarray(rgb).save(out / "images" / f"{i:04d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / f"{i:04d}.png")
    logger.info("wrote %d scenes of %dx%d (seed %d) to %s", n, size[1], size[0], seed, out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic scenes and their masks as PNGs.")
    parser.add_argument("--out", required=True, help="folder: OUT/images/*.png and OUT/masks/*.png")
    parser.add_argument("--n", type=int, default=48, help="number of scenes (default 48)")
    parser.add_argument("--size", type=int, default=128, help="side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="scene set (default 0); sets never overlap")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_scenes(args.out, args.n, (args.size, args.size), args.seed)


if __name__ == "__main__":
    main()
