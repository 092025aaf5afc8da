"""Synthetic scenes with known object masks: coloured shapes on a textured background.

`synthetic_scene` holds one object (tests of learning, benchmarks, the demo);
`synthetic_instances` holds 2 to 5, touching or apart, each with its own mask (tests of
instances). Used where no labelled data may be used. Deterministic for a given seed.
As files, for `sempart train` and `sempart eval` (README, "Check the method on
synthetic scenes"):

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


# Saturated, well-separated colours: neighbouring objects never share one.
_PALETTE = np.array([
    [230, 40, 40], [40, 200, 40], [40, 60, 230], [230, 210, 40], [200, 40, 200], [40, 210, 210],
], dtype=np.float32)


def _split(rng: np.random.Generator, box: tuple[int, int, int, int], parts: int) -> list[tuple[int, int, int, int]]:
    """Guillotine-cut ``box`` (y0, x0, y1, x1) into ``parts`` boxes across its longer side."""
    if parts == 1:
        return [box]
    y0, x0, y1, x1 = box
    first = parts // 2
    frac = first / parts + rng.uniform(-0.08, 0.08)
    if y1 - y0 >= x1 - x0:
        cut = y0 + int(round(frac * (y1 - y0)))
        halves = (y0, x0, cut, x1), (cut, x0, y1, x1)
    else:
        cut = x0 + int(round(frac * (x1 - x0)))
        halves = (y0, x0, y1, cut), (y0, cut, y1, x1)
    return _split(rng, halves[0], first) + _split(rng, halves[1], parts - first)


def _cell_object(rng: np.random.Generator, cell: tuple[int, int, int, int], size: tuple[int, int],
                 touching: bool) -> np.ndarray:
    """An object in ``cell``: filling it up to its edges (touching) or shrunk inside it."""
    y0, x0, y1, x1 = cell
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    inside = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
    if touching:  # a rounded rectangle: an ellipse wider than the cell, cut by its edges
        ry, rx = 0.62 * (y1 - y0), 0.62 * (x1 - x0)
        return inside & (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0)
    scale = rng.uniform(0.55, 0.75)
    ry, rx = scale * (y1 - y0) / 2, scale * (x1 - x0) / 2
    if rng.random() < 0.5:
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)


def synthetic_instances(
    seed: int, size: tuple[int, int] = (256, 256), n_objects: int | None = None, touching: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 HxWx3, masks bool KxHxW) pair: K objects of distinct colours.

    A central region (55-80 % of each side) is cut into K cells, one object per cell:
    with ``touching`` the objects fill their cells up to the shared edges, otherwise
    each is shrunk inside its cell, so that background separates them. ``n_objects``
    (2 to 5) and ``touching`` are drawn from the seed when not given.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    k = int(n_objects) if n_objects is not None else int(rng.integers(2, 6))
    touching = bool(rng.random() < 0.5) if touching is None else touching
    img = _texture(rng, h, w)
    rh, rw = rng.uniform(0.55, 0.8) * h, rng.uniform(0.55, 0.8) * w
    y0, x0 = int(rng.uniform(0.1 * h, h - rh - 0.1 * h)), int(rng.uniform(0.1 * w, w - rw - 0.1 * w))
    cells = _split(rng, (y0, x0, y0 + int(rh), x0 + int(rw)), k)
    colours = _PALETTE[rng.permutation(len(_PALETTE))[:k]]
    masks = np.stack([_cell_object(rng, cell, size, touching) for cell in cells])
    for mask, colour in zip(masks, colours):
        shade = rng.normal(0, 10, size=(h, w, 1))
        img[mask] = (colour + shade)[mask]
    return np.clip(img, 0, 255).astype(np.uint8), masks


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
