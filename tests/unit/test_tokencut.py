"""TokenCut baseline: eigen-solver against scipy, ncut against brute force, and
recovery of planted clusters on the patch grid (foreground side, seed component)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from sempart_core.graph import affinity
from sempart_core.tokencut import (
    fiedler_vector,
    hard_ncut,
    tokencut_partition,
    tokencut_prob,
    upsample_patch_mask,
)


def random_graph(n: int, seed: int) -> torch.Tensor:
    """Dense symmetric positive weights: generic, so the eigenvalues are distinct."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, n, generator=g, dtype=torch.float64) + 0.05
    return 0.5 * (a + a.T)


def scipy_fiedler(W: np.ndarray) -> np.ndarray:
    """TokenCut's own call: scipy's generalised solver, D-normalised eigenvectors."""
    d = np.diag(W.sum(1))
    _, vectors = scipy.linalg.eigh(d - W, d, subset_by_index=[1, 1])
    return vectors[:, 0]


def planted_features(
    fg: np.ndarray, seed: int, dim: int = 64, noise: float = 0.1
) -> torch.Tensor:
    """[1, N, dim] features: two orthonormal cluster centres plus Gaussian noise.

    With this noise a few percent of the cross-cluster pairs exceed tau = 0.2, so the
    graph is not simply two disconnected blocks.
    """
    rng = np.random.default_rng(seed)
    centres, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
    labels = fg.reshape(-1).astype(int)
    feats = centres.T[labels] + noise * rng.standard_normal((labels.size, dim))
    return torch.from_numpy(feats).float().unsqueeze(0)


def grid_mask(h: int, w: int, *rects: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    for r0, r1, c0, c1 in rects:
        mask[r0:r1, c0:c1] = True
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fiedler_vector_matches_scipy_generalised_eigh(seed: int) -> None:
    W = random_graph(14, seed)
    x = fiedler_vector(W).numpy()
    ref = scipy_fiedler(W.numpy())
    sign = np.sign(x @ ref)
    np.testing.assert_allclose(x, sign * ref, atol=1e-9)
    d = W.sum(1).numpy()
    assert x @ (d * x) == pytest.approx(1.0)  # D-normalised
    assert abs(d @ x) < 1e-9  # D-orthogonal to the constant (first) eigenvector


def test_fiedler_vector_batched_equals_per_graph_and_accepts_float32() -> None:
    graphs = torch.stack([random_graph(10, s) for s in range(3)])
    batched = fiedler_vector(graphs)
    assert batched.shape == (3, 10) and batched.dtype == torch.float64
    for b in range(3):
        torch.testing.assert_close(batched[b], fiedler_vector(graphs[b]))
    # float32 input is solved in float64: agrees with the float64 solve to float32 rounding
    torch.testing.assert_close(fiedler_vector(graphs.float()), batched, atol=1e-5, rtol=0)
    # sign convention: the largest-magnitude entry is positive
    peaks = batched.gather(1, batched.abs().argmax(1, keepdim=True))
    assert bool((peaks > 0).all())


def brute_force_ncut(mask: np.ndarray, W: np.ndarray) -> float:
    n = len(mask)
    cut = assoc_a = assoc_b = 0.0
    for i in range(n):
        for j in range(n):
            if mask[i] and not mask[j]:
                cut += W[i, j]
            if mask[i]:
                assoc_a += W[i, j]
            else:
                assoc_b += W[i, j]
    return cut / assoc_a + cut / assoc_b


def test_hard_ncut_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    W = torch.stack([random_graph(9, s) for s in range(4)])
    masks = (torch.rand(4, 9, generator=g) > 0.5).float()
    masks[:, 0], masks[:, 1] = 1.0, 0.0  # both sides non-empty
    got = hard_ncut(masks, W)
    for b in range(4):
        assert got[b].item() == pytest.approx(brute_force_ncut(masks[b].numpy(), W[b].numpy()))
    # symmetric in the two sides
    torch.testing.assert_close(hard_ncut(1 - masks, W), got)


def test_hard_ncut_is_nan_when_a_side_is_empty() -> None:
    W = torch.stack([random_graph(5, 0), random_graph(5, 1)])
    masks = torch.stack([torch.ones(5), torch.zeros(5)])
    assert bool(hard_ncut(masks, W).isnan().all())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_recovers_scattered_planted_clusters(seed: int) -> None:
    """Spectral step alone: token positions are random, so no spatial help."""
    h, w = 10, 12
    rng = np.random.default_rng(100 + seed)
    fg = np.zeros(h * w, dtype=bool)
    fg[rng.choice(h * w, size=40, replace=False)] = True
    fg = fg.reshape(h, w)
    mask, ncut = tokencut_partition(
        planted_features(fg, seed), (h, w), border_rule=False, seed_component=False
    )
    got = mask[0].numpy().astype(bool)
    assert np.array_equal(got, fg) or np.array_equal(got, ~fg)
    assert 0.0 < ncut.item() < 0.2  # a near-clean cut: only the noisy cross edges count


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_picks_small_middle_cluster_as_foreground(seed: int) -> None:
    h, w = 12, 14
    rng = np.random.default_rng(seed)
    r0, c0 = rng.integers(2, 5, size=2)
    fg = grid_mask(h, w, (r0, r0 + rng.integers(3, 6), c0, c0 + rng.integers(3, 7)))
    feats = planted_features(fg, seed)
    mask, ncut = tokencut_partition(feats, (h, w))
    assert mask.shape == (1, h, w) and mask.dtype == torch.float32
    assert np.array_equal(mask[0].numpy().astype(bool), fg)
    W = affinity(feats, 0.2, 1e-5)
    expected = brute_force_ncut(fg.reshape(-1), W[0].double().numpy())
    assert ncut.item() == pytest.approx(expected)


def test_border_rule_overrides_seed_when_small_cluster_is_the_border() -> None:
    """A thin frame (small cluster, so it holds the seed) around a large centre."""
    h, w = 12, 12
    centre = grid_mask(h, w, (1, h - 1, 1, w - 1))
    frame = ~centre
    feats = planted_features(frame, seed=5)
    tokencut_only, _ = tokencut_partition(feats, (h, w), border_rule=False)
    assert np.array_equal(tokencut_only[0].numpy().astype(bool), frame)
    project_rule, _ = tokencut_partition(feats, (h, w))
    assert np.array_equal(project_rule[0].numpy().astype(bool), centre)


@pytest.mark.parametrize(
    "left_rect, right_rect",
    [
        ((3, 8, 2, 5), (4, 9, 8, 12)),  # apart
        ((2, 6, 2, 5), (6, 10, 5, 9)),  # touching at one corner only: TokenCut's
        # ndimage.label uses 4-connectivity, so these are two components
    ],
)
def test_keeps_only_the_seed_component(
    left_rect: tuple[int, int, int, int], right_rect: tuple[int, int, int, int]
) -> None:
    h, w = 12, 14
    left = grid_mask(h, w, left_rect)
    right = grid_mask(h, w, right_rect)
    fg = left | right
    feats = planted_features(fg, seed=7)
    x = fiedler_vector(affinity(feats, 0.2, 1e-5))[0].reshape(h, w).numpy()
    seed_blob = left if left.reshape(-1)[np.abs(x).argmax()] else right
    mask, _ = tokencut_partition(feats, (h, w))
    assert np.array_equal(mask[0].numpy().astype(bool), seed_blob)
    both, _ = tokencut_partition(feats, (h, w), seed_component=False)
    assert np.array_equal(both[0].numpy().astype(bool), fg)


def test_batch_is_per_image() -> None:
    h, w = 10, 10
    fgs = [grid_mask(h, w, (2, 6, 3, 7)), grid_mask(h, w, (4, 9, 1, 5))]
    feats = torch.cat([planted_features(m, seed=i) for i, m in enumerate(fgs)])
    mask, ncut = tokencut_partition(feats, (h, w))
    assert ncut.shape == (2,)
    for b, fg in enumerate(fgs):
        assert np.array_equal(mask[b].numpy().astype(bool), fg)
        single, single_ncut = tokencut_partition(feats[b : b + 1], (h, w))
        torch.testing.assert_close(single[0], mask[b])
        torch.testing.assert_close(single_ncut[0], ncut[b])


def test_prob_is_nearest_upsampling_of_the_patch_mask() -> None:
    """As TokenCut upsamples its mask: each patch becomes a p x p block of 0 or 1."""
    h, w, p = 8, 10, 8
    fg = grid_mask(h, w, (2, 6, 3, 7))
    feats = planted_features(fg, seed=11)
    prob = tokencut_prob(feats, (h, w), (h * p, w * p))
    mask, _ = tokencut_partition(feats, (h, w))
    torch.testing.assert_close(prob, upsample_patch_mask(mask, (h * p, w * p)))
    np.testing.assert_array_equal(prob[0].numpy(), np.kron(fg, np.ones((p, p))))


def nearest_by_index(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """PyTorch's (and TokenCut's) nearest rule: output pixel i reads input floor(i * h / H)."""
    rows = np.floor(np.arange(height) * grid.shape[0] / height).astype(int)
    cols = np.floor(np.arange(width) * grid.shape[1] / width).astype(int)
    return grid[np.ix_(rows, cols)]


def test_rejects_features_that_do_not_match_the_grid() -> None:
    with pytest.raises(ValueError, match="grid"):
        tokencut_partition(torch.zeros(1, 10, 4), (3, 4))


# ---- the Predictor's TokenCut methods ----


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from pathlib import Path

    from PIL import Image

    data = Path(__file__).resolve().parents[1] / "data" / "duts-te" / "images"
    return np.asarray(Image.open(sorted(data.iterdir())[0]).convert("RGB"))


def test_predictor_tokencut_is_tokencut_as_published(model, photo) -> None:
    """No border rule: the coarse map is TokenCut's own seed-side partition."""
    from sempart_core.predictor import load_predictor
    from sempart_core.training import to_model_input

    predictor = load_predictor(model, method="tokencut")
    prepared = predictor.prepare(photo)
    (raw,) = predictor.infer(prepared[None])
    backbone = predictor.backbone
    with torch.inference_mode():
        feats = backbone(to_model_input(prepared[None], backbone.mean, backbone.std, predictor.device))
    grid = (prepared.shape[0] // predictor.patch, prepared.shape[1] // predictor.patch)
    expected, ncut = tokencut_partition(feats, grid, border_rule=False)
    np.testing.assert_array_equal(raw.coarse, expected[0].numpy())
    assert raw.ncut == pytest.approx(float(ncut[0])) and raw.border_flipped is False
    # The patch mask goes to the photo's own size with nearest, as TokenCut's does: hard
    # 0/1 edges (bilinear's soft ones would move maxF and MAE), not via the input size.
    (pred,) = predictor.predict([photo])
    np.testing.assert_array_equal(pred.prob, nearest_by_index(raw.coarse, *photo.shape[:2]))


def test_predictor_tokencut_bs_refines_tokencut_on_the_image(model, photo) -> None:
    from sempart_core.bilateral import refine_mask
    from sempart_core.predictor import load_predictor

    (plain,) = load_predictor(model, method="tokencut").predict([photo])
    bs = load_predictor(model, method="tokencut-bs")
    (refined,) = bs.predict([photo])
    np.testing.assert_array_equal(refined.coarse, plain.coarse)
    np.testing.assert_array_equal(refined.prob, refine_mask(photo, plain.mask))
    (raw,) = bs.infer(bs.prepare(photo)[None])
    with pytest.raises(ValueError, match="tokencut-bs' refines each mask on its image"):
        bs.finish(raw, *photo.shape[:2])
