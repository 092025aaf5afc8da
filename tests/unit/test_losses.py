"""Graph and losses against brute-force computations (issue 3, acceptance 2)."""
import itertools

import numpy as np
import pytest
import torch

from sempart_core.config import LossConfig
from sempart_core.graph import affinity, degree
from sempart_core.losses import (
    border_prior_loss,
    distillation_loss,
    expected_ncut,
    feature_tv_loss,
    image_tv_loss,
    ncut_loss,
    sempart_loss,
)


def brute_affinity(f: np.ndarray, tau: float, eps: float) -> np.ndarray:
    n = f.shape[0]
    w = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            cos = f[i] @ f[j] / (np.linalg.norm(f[i]) * np.linalg.norm(f[j]))
            w[i, j] = 1.0 if cos > tau else eps
    return w


def brute_ncut(y: np.ndarray, w: np.ndarray) -> float:
    n = len(y)
    cut = sum(y[i] * w[i, j] * (1 - y[j]) for i in range(n) for j in range(n))
    d = w.sum(1)
    return cut / (y @ d) + cut / ((1 - y) @ d)


def test_affinity_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 12, 5, generator=g)
    w = affinity(feats, tau=0.2, eps=1e-5)
    assert w.shape == (3, 12, 12)
    for b in range(3):
        np.testing.assert_allclose(w[b].numpy(), brute_affinity(feats[b].double().numpy(), 0.2, 1e-5), rtol=1e-6)
    np.testing.assert_allclose(degree(w).numpy(), w.sum(-1).numpy())


def test_ncut_loss_matches_brute_force_batch_mean():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(4, 10, 6, generator=g)
    w = affinity(feats, 0.1, 1e-5)
    y = torch.rand(4, 10, generator=g)
    expected = np.mean([brute_ncut(y[b].double().numpy(), w[b].double().numpy()) for b in range(4)])
    assert ncut_loss(y, w).item() == pytest.approx(expected, rel=1e-5)


def test_ncut_is_symmetric_in_y_and_one_minus_y():
    g = torch.Generator().manual_seed(2)
    w = affinity(torch.randn(2, 16, 8, generator=g), 0.2, 1e-5)
    y = torch.rand(2, 16, generator=g)
    assert ncut_loss(y, w).item() == pytest.approx(ncut_loss(1 - y, w).item(), rel=1e-6)


def test_best_partition_by_enumeration_is_the_loss_minimum():
    """On a small graph, the hard partition with the lowest ncut (found by enumerating
    all of them) also minimises the loss over every hard y, and soft y do no better."""
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(2, 8, generator=g) * 3
    labels = torch.tensor([0, 0, 1, 0, 1, 1, 0, 1, 1, 0])
    feats = centres[labels] + 0.3 * torch.randn(10, 8, generator=g)
    w = affinity(feats[None], 0.6, 1e-5)[0].double()
    parts = [torch.tensor(bits, dtype=torch.float64) for bits in itertools.product([0, 1], repeat=10)]
    parts = [p for p in parts if 0 < p.sum() < 10]
    brute = [brute_ncut(p.numpy(), w.numpy()) for p in parts]
    best = parts[int(np.argmin(brute))]
    ys = torch.stack(parts)
    losses = expected_ncut(ys, w.expand(len(parts), -1, -1), clamp_eps=0.0)
    assert torch.equal(ys[losses.argmin()], best)
    # The planted clusters are the optimum here.
    assert torch.equal(best, labels.double()) or torch.equal(best, 1 - labels.double())
    # Random soft assignments never beat the best hard cut on this graph.
    soft = torch.rand(500, 10, generator=g, dtype=torch.float64)
    assert expected_ncut(soft, w.expand(500, -1, -1), 0.0).min() >= losses.min() - 1e-9


def test_feature_tv_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    h, wd = 3, 4
    feats = torch.randn(2, h * wd, 5, generator=g)
    w = affinity(feats, 0.0, 1e-5)
    y = torch.rand(2, h * wd, generator=g)
    pairs = []
    for r in range(h):
        for c in range(wd):
            for dr, dc in itertools.product([-1, 0, 1], repeat=2):
                rr, cc = r + dr, c + dc
                if (dr, dc) != (0, 0) and 0 <= rr < h and 0 <= cc < wd and (r * wd + c) < (rr * wd + cc):
                    pairs.append((r * wd + c, rr * wd + cc))
    expected = np.mean(
        [np.mean([w[b, i, j].item() * (y[b, i] - y[b, j]).item() ** 2 for i, j in pairs]) for b in range(2)]
    )
    assert feature_tv_loss(y, w, (h, wd)).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("q", [1, 2])
def test_image_tv_matches_brute_force(q):
    g = torch.Generator().manual_seed(5)
    y = torch.rand(1, 4, 5, generator=g)
    img = torch.randn(1, 3, 4, 5, generator=g)
    total = 0.0
    for r in range(4):
        for c in range(5):
            for dr, dc in [(0, 1), (1, -1), (1, 0), (1, 1)]:
                rr, cc = r + dr, c + dc
                if 0 <= rr < 4 and 0 <= cc < 5:
                    wij = np.exp(-((img[0, :, r, c] - img[0, :, rr, cc]) ** 2).sum().item() / 0.5**2)
                    total += wij * abs((y[0, r, c] - y[0, rr, cc]).item()) ** q
    expected = total / (4 * np.sqrt(4 * 5))
    assert image_tv_loss(y, img, sigma=0.5, q=q).item() == pytest.approx(expected, rel=1e-5)


def disk_scene(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sharp disk of radius side/4 as the mask, on a uniform image (every colour weight 1)."""
    yy, xx = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    disk = (((yy - side / 2) ** 2 + (xx - side / 2) ** 2) <= (side / 4) ** 2).float()
    return disk[None], torch.zeros(1, 3, side, side)


@pytest.mark.parametrize("q", [1, 2])
def test_image_tv_of_one_scene_does_not_depend_on_its_resolution(q):
    """The same disk at 64 and 256 px: its edge is 4x longer in pixels, the loss the same,
    so a TV weight chosen at one image size means the same at another (issue 21)."""
    small, large = (image_tv_loss(*disk_scene(side), q=q).item() for side in (64, 256))
    assert large == pytest.approx(small, rel=0.05)


def test_distillation_pools_by_patch_and_reaches_both_branches():
    y_f = torch.rand(2, 8, 12, requires_grad=True)
    y_c = torch.rand(2, 2, 3, requires_grad=True)
    loss = distillation_loss(y_f, y_c, patch=4)
    pooled = y_f.detach().view(2, 2, 4, 3, 4).mean(dim=(2, 4))
    assert loss.item() == pytest.approx(((pooled - y_c.detach()) ** 2).mean().item(), rel=1e-6)
    loss.backward()
    assert y_f.grad.abs().sum() > 0 and y_c.grad.abs().sum() > 0


def test_sempart_loss_is_weighted_sum_of_terms():
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(2, 6, 4, generator=g)
    w = affinity(feats, 0.2, 1e-5)
    y_c = torch.rand(2, 2, 3, generator=g)
    y_f = torch.rand(2, 16, 24, generator=g)
    img = torch.randn(2, 3, 16, 24, generator=g)
    cfg = LossConfig(ncut=1.0, ftv=2.0, itv=3.0, dist=4.0, border=0.5)
    t = sempart_loss(y_c, y_f, w, img, 8, cfg)
    expected = t.ncut + 2 * t.ftv + 3 * t.itv + 4 * t.dist + 0.5 * t.border
    assert t.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(t.as_floats()) == {"total", "ncut", "ftv", "itv", "dist", "border"}


def test_border_prior_asks_the_border_to_be_one_side_whichever() -> None:
    y = torch.full((3, 5, 6), 0.2)
    y[1] = 0.8  # the same partition as y[0], sides swapped
    y[2, :, :3], y[2, :, 3:] = 0.0, 1.0  # the border split half and half
    per_image = [float(border_prior_loss(y[i : i + 1])) for i in range(3)]
    assert per_image[0] == pytest.approx(0.16) and per_image[1] == pytest.approx(0.16)
    assert per_image[2] == pytest.approx(0.25)  # the most a border can cost
    assert float(border_prior_loss(y)) == pytest.approx(0.19)
    assert float(border_prior_loss(torch.zeros(1, 5, 6))) == 0.0 == float(border_prior_loss(torch.ones(1, 5, 6)))
    inner = y[:1].clone()
    inner[0, 1:-1, 1:-1] = 1.0  # the inside does not count
    assert float(border_prior_loss(inner)) == pytest.approx(0.16)


def test_border_prior_gradient_is_smooth_where_training_starts() -> None:
    """At s = 1/2 the push is zero and changes sign continuously, so two computations
    that differ by rounding (1 DDP worker or 2) get gradients that differ by rounding."""
    grads = []
    for s in (0.5 - 1e-6, 0.5, 0.5 + 1e-6):
        y = torch.full((1, 4, 4), s, requires_grad=True)
        border_prior_loss(y).backward()
        grads.append(y.grad[0, 0, 0].item())
    assert max(abs(g) for g in grads) < 1e-6
