"""The bilateral solver snaps a blocky mask to colour edges and keeps what is already right."""
from __future__ import annotations

import numpy as np
import pytest

from sempart_core.bilateral import BilateralConfig, bilateral_solve, refine_mask

H, W, BLOCK = 96, 128, 16


def disc_scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A red disc on a noisy blue-grey background, and its true mask."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:H, :W]
    truth = (rows - 50) ** 2 + (cols - 60) ** 2 < 30**2
    rgb = np.where(truth[..., None], [200, 40, 30], [60, 90, 120]).astype(np.float64)
    rgb += rng.normal(0, 6, size=rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8), truth


def blocky(mask: np.ndarray) -> np.ndarray:
    """The mask as a patch-level method sees it: majority vote per 16 x 16 block, upsampled."""
    votes = mask.reshape(H // BLOCK, BLOCK, W // BLOCK, BLOCK).mean(axis=(1, 3)) > 0.5
    return np.kron(votes, np.ones((BLOCK, BLOCK), dtype=bool))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


def test_refine_snaps_a_blocky_mask_to_the_colour_edge() -> None:
    rgb, truth = disc_scene()
    coarse = blocky(truth)
    refined = refine_mask(rgb, coarse)
    assert refined.dtype == np.float32 and refined.shape == truth.shape
    assert 0.0 <= refined.min() and refined.max() <= 1.0
    before, after = iou(coarse, truth), iou(refined > 0.5, truth)
    assert before < 0.9
    assert after > 0.97 and after > before + 0.07
    # The blocks' corners that stuck out over the background are gone.
    assert np.count_nonzero((refined > 0.5) & ~truth) < np.count_nonzero(coarse & ~truth) / 4


def test_an_edge_aligned_mask_stays() -> None:
    rgb, truth = disc_scene(1)
    assert iou(refine_mask(rgb, truth) > 0.5, truth) > 0.99


def test_constant_target_gives_a_constant_result() -> None:
    """Bistochastic blur: smoothing a constant changes nothing."""
    rgb, _ = disc_scene(2)
    out = bilateral_solve(rgb, np.full((H, W), 0.3))
    np.testing.assert_allclose(out, 0.3, atol=1e-6)


def test_lambda_zero_returns_the_target_averaged_per_grid_cell() -> None:
    """Without smoothness each grid vertex takes its pixels' mean target (brute force)."""
    rgb, truth = disc_scene(3)
    target = np.random.default_rng(0).random((H, W))
    config = BilateralConfig(lam=0.0, sigma_spatial=8, sigma_luma=32, sigma_chroma=32)
    out = bilateral_solve(rgb, target, config)
    yuv = rgb.astype(np.float64) @ np.array(
        [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]).T
    yuv[..., 1:] += 128
    rows, cols = np.mgrid[:H, :W]
    cells = np.stack([cols // 8, rows // 8, *np.floor(np.moveaxis(yuv, -1, 0) / 32).astype(int)], -1)
    expected = np.empty_like(target)
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for r in range(H):
        for c in range(W):
            groups.setdefault(tuple(cells[r, c]), []).append((r, c))
    for pixels in groups.values():
        idx = tuple(np.array(pixels).T)
        expected[idx] = target[idx].mean()
    np.testing.assert_allclose(out, expected, atol=1e-9)


def test_size_mismatch_is_refused() -> None:
    rgb, _ = disc_scene()
    with pytest.raises(ValueError, match="differ in size"):
        bilateral_solve(rgb, np.zeros((H, W + 1)))
