"""Training crops: decode-side augmentation on uint8 numpy arrays (no torch), so the
Ray Data tasks that run it stay light processes."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .config import DataConfig


def crop_size(cfg: DataConfig, patch: int) -> int:
    """Training crop side: image_size rounded down to a multiple of the patch."""
    return max(patch, cfg.image_size // patch * patch)


def augment(rgb: np.ndarray, cfg: DataConfig, patch: int, rng: np.random.Generator) -> np.ndarray:
    """Resize the shorter side to image_size * crop_scale, random square crop, flip,
    colour jitter and random greyscale; returns uint8 [S, S, 3] with S a multiple of p."""
    size = crop_size(cfg, patch)
    h, w = rgb.shape[:2]
    scale = size * cfg.crop_scale / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    y0, x0 = rng.integers(0, nh - size + 1), rng.integers(0, nw - size + 1)
    img = img[y0 : y0 + size, x0 : x0 + size]
    if cfg.hflip and rng.random() < 0.5:
        img = img[:, ::-1]
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        brightness, contrast, saturation = rng.uniform(1 - j, 1 + j, size=3)
        grey = img.mean(-1, keepdims=True)
        img = grey + (img - grey) * saturation
        img = img.mean() + (img - img.mean()) * contrast
        img = img * brightness
    if rng.random() < cfg.grayscale_p:
        img = np.repeat(img.mean(-1, keepdims=True), 3, axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)
