"""The four SEMPART losses (docs/method.md, "Losses") and their weighted sum."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import LossConfig
from .foreground import border_mean
from .graph import degree

# Offsets of the 8-neighbourhood, each undirected pair counted once.
_HALF_NEIGHBOURS = ((0, 1), (1, -1), (1, 0), (1, 1))


def expected_ncut(y: torch.Tensor, w: torch.Tensor, clamp_eps: float = 1e-4) -> torch.Tensor:
    """Per-image expected two-way normalised cut, [B].

    y [B, N] soft foreground in [0, 1], W [B, N, N] symmetric affinities.
    cut = y^T W (1 - y); L = cut / (y^T d) + cut / ((1 - y)^T d).
    With a hard y it is the normalised cut of that partition (up to the clamp; a
    partition with one empty side scores about 1).
    """
    y = y.float().clamp(clamp_eps, 1.0 - clamp_eps)
    w = w.float()
    d = degree(w)
    cut = torch.einsum("bi,bij,bj->b", y, w, 1.0 - y)
    return cut / (y * d).sum(-1) + cut / ((1.0 - y) * d).sum(-1)


def ncut_loss(y: torch.Tensor, w: torch.Tensor, clamp_eps: float = 1e-4) -> torch.Tensor:
    """Batch mean of `expected_ncut`: SEMPART's L_ncut."""
    return expected_ncut(y, w, clamp_eps).mean()


def _neighbour_pairs(x: torch.Tensor):
    """Yield (x_i, x_j) views for every 8-neighbour pair on the last two (spatial) dims."""
    h, w = x.shape[-2:]
    for dy, dx in _HALF_NEIGHBOURS:
        ys, ye = 0, h - dy
        xs, xe = max(0, -dx), w - max(0, dx)
        a = x[..., ys:ye, xs:xe]
        b = x[..., ys + dy : ye + dy, xs + dx : xe + dx]
        yield a, b


def feature_tv_loss(y: torch.Tensor, w: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean over 8-neighbour patch pairs (i, j) of W_ij (y_i - y_j)^2.

    y [B, N] (N = h*w, row-major), W [B, N, N].
    """
    h, gw = grid
    b = y.shape[0]
    idx = torch.arange(h * gw, device=y.device).view(h, gw)
    ym = y.float().view(b, h, gw)
    terms, count = [], 0
    for (ya, yb), (ia, ib) in zip(_neighbour_pairs(ym), _neighbour_pairs(idx)):
        wij = w[:, ia.reshape(-1), ib.reshape(-1)].float()
        terms.append((wij * (ya.reshape(b, -1) - yb.reshape(b, -1)) ** 2).sum(-1))
        count += ia.numel()
    return (torch.stack(terms).sum(0) / max(count, 1)).mean()


def image_tv_loss(
    y: torch.Tensor, image: torch.Tensor, sigma: float = 0.5, q: int = 2
) -> torch.Tensor:
    """Colour-weighted graph total variation of the fine mask, 8-neighbourhood.

    y [B, H, W], image [B, 3, H, W] (normalised colours). The border is replicate-padded:
    a pair that would leave the image has a zero difference, so only in-image pairs are
    summed. The sum is divided by 4 sqrt(H W) (four pair slots per pixel, times the
    image side), not by the 4 H W slots: a sharp edge's cost grows with its length in
    pixels, so this keeps the value of one scene, and the meaning of the loss weight,
    the same at any resolution (the mean over slots shrank as 1 / side).
    """
    y = y.float()
    img = image.float()
    total = y.new_zeros(y.shape[0])
    for (ya, yb), (ia, ib) in zip(_neighbour_pairs(y), _neighbour_pairs(img)):
        wij = torch.exp(-((ia - ib) ** 2).sum(1) / sigma**2)
        total = total + (wij * (ya - yb).abs() ** q).flatten(1).sum(-1)
    return (total / (4 * math.sqrt(y.shape[-2] * y.shape[-1]))).mean()


def distillation_loss(y_fine: torch.Tensor, y_coarse: torch.Tensor, patch: int) -> torch.Tensor:
    """mean (avgpool_p(y_f) - y_c)^2: keeps the fine mask faithful to the coarse one.

    y_fine [B, H, W], y_coarse [B, h, w] with H = h*p, W = w*p. Gradients reach both.
    """
    pooled = F.adaptive_avg_pool2d(y_fine.float().unsqueeze(1), y_coarse.shape[-2:]).squeeze(1)
    return ((pooled - y_coarse.float()) ** 2).mean()


def border_prior_loss(y_coarse: torch.Tensor) -> torch.Tensor:
    """How far each image's border patches are from lying on one side of the cut:
    s (1 - s) for s the mean of y over the border, averaged over the images.

    The cut is symmetric and the foreground side is chosen at inference (the border
    rule, foreground.py), so the prior asks only that the border be one side, whichever.
    A prior towards y = 0 fought the cut whenever training had put the background at
    y = 1, and such runs ended with half the border on each side (docs/method.md,
    Defaults). s (1 - s) rather than min(s, 1 - s): its gradient is smooth at s = 1/2,
    where a random start puts the border, so rounding cannot flip the push's sign (the
    min made 2 DDP workers differ from 1, tests/integration/test_train.py)."""
    side = border_mean(y_coarse)
    return (side * (1 - side)).mean()


@dataclass
class LossTerms:
    total: torch.Tensor
    ncut: torch.Tensor
    ftv: torch.Tensor
    itv: torch.Tensor
    dist: torch.Tensor
    border: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in self.__dict__.items()}


def sempart_loss(
    y_coarse: torch.Tensor,
    y_fine: torch.Tensor,
    w: torch.Tensor,
    image: torch.Tensor,
    patch: int,
    cfg: LossConfig,
) -> LossTerms:
    """Weighted sum a*L_ncut + b*L_ftv + c*L_itv + e*L_dist (+ border prior)."""
    b, h, gw = y_coarse.shape
    flat = y_coarse.reshape(b, h * gw)
    ncut = ncut_loss(flat, w, cfg.clamp_eps)
    ftv = feature_tv_loss(flat, w, (h, gw))
    itv = image_tv_loss(y_fine, image, cfg.itv_sigma, cfg.itv_q)
    dist = distillation_loss(y_fine, y_coarse, patch)
    border = border_prior_loss(y_coarse)
    total = cfg.ncut * ncut + cfg.ftv * ftv + cfg.itv * itv + cfg.dist * dist + cfg.border * border
    return LossTerms(total, ncut, ftv, itv, dist, border)
