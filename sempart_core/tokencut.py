"""TokenCut (Wang et al., 2022): the training-free baseline SEMPART is compared with.

TokenCut bipartitions the same semantic graph SEMPART trains on (``graph.affinity``)
with the Fiedler vector of its normalised Laplacian: one eigen-decomposition per image,
which is exactly the cost SEMPART's single forward pass avoids.

Steps of ``tokencut_partition``, per image:

1. ``x`` = second smallest generalised eigenvector of ``(D - W) x = lambda D x``.
2. Split at the mean of ``x`` (TokenCut splits at the mean, not at zero).
3. Foreground side = the side holding the seed, the token with the largest ``|x|``
   (TokenCut's rule).
4. Optional (``border_rule=True``): SEMPART's border rule on top, so that the baseline
   picks its foreground the same way as SEMPART: if that side holds the majority of the
   image-border patches (``foreground.border_flip``) and the other side is not empty,
   take the other side instead and re-seed on it (largest ``|x|`` within it).
   ``border_rule=False`` is TokenCut as published, which the Predictor's ``tokencut``
   and ``tokencut-bs`` methods run so that their figures compare with TokenCut's paper.
5. Keep only the connected component of the foreground that contains the seed
   (TokenCut's ``detect_box``: ``scipy.ndimage.label`` with its default 4-connectivity).
6. Report the hard normalised cut of that final partition.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from sempart_core.config import GraphConfig
from sempart_core.fiedler import dense_fiedler
from sempart_core.graph import affinity, degree
from sempart_core.foreground import border_flip

logger = logging.getLogger(__name__)

_DEFAULT_TAU = GraphConfig.tau
_DEFAULT_EPS = GraphConfig.eps


def fiedler_vector(W: torch.Tensor, compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Second smallest generalised eigenvector of ``(D - W) x = lambda D x``.

    Solved as the symmetric problem ``D^-1/2 (D - W) D^-1/2 v = lambda v`` with
    ``torch.linalg.eigh`` (batched, on W's device; ``fiedler.dense_fiedler``), then
    ``x = D^-1/2 v``. Float64 by default: on graphs with nearly separate parts the two
    smallest eigenvalues differ by about ``eps`` and float32 would mix their eigenvectors.

    ``W`` is ``[N, N]`` or ``[B, N, N]``, symmetric with positive degrees. Returns ``x``
    (``[N]`` or ``[B, N]``, in ``compute_dtype``) scaled so that ``x^T D x = 1``, with the
    sign chosen so that its largest-magnitude entry is positive (eigenvectors have no
    sign of their own; fixing it makes results reproducible).
    """
    if W.ndim not in (2, 3) or W.shape[-1] != W.shape[-2]:
        raise ValueError(f"fiedler_vector expects [N, N] or [B, N, N], got {tuple(W.shape)}")
    if W.shape[-1] < 2:
        raise ValueError("fiedler_vector needs at least 2 nodes")
    batched = W if W.ndim == 3 else W.unsqueeze(0)
    x = dense_fiedler(batched, compute_dtype=compute_dtype).vector
    return x if W.ndim == 3 else x[0]


def hard_ncut(mask_flat: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Normalised cut ``cut/assoc(A) + cut/assoc(B)`` of a hard bipartition.

    ``mask_flat`` is ``[B, N]`` in {0, 1} (A = the ones), ``W`` is ``[B, N, N]``;
    ``assoc(S)`` is the total degree of S. Returns ``[B]`` in float64, within ``[0, 2]``.
    A partition with an empty side has no normalised cut: NaN (``postprocess`` scores
    a non-finite cut as the worst quality).
    """
    if mask_flat.ndim != 2 or W.ndim != 3 or W.shape[:2] != mask_flat.shape:
        raise ValueError(
            f"hard_ncut expects mask [B, N] and W [B, N, N], got {tuple(mask_flat.shape)} "
            f"and {tuple(W.shape)}"
        )
    Wd = W.to(torch.float64)
    a = mask_flat.to(torch.float64)
    return ncut_from_products(a, (Wd @ (1.0 - a).unsqueeze(-1)).squeeze(-1), degree(Wd))


def ncut_from_products(a: torch.Tensor, w_rest: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """`hard_ncut` from the product ``w_rest = W (1 - a)`` and the degrees ``d`` (all
    [B, N] float64), for graphs that give products without being built."""
    b = 1.0 - a
    cut = (a * w_rest).sum(-1)
    ncut = cut / (a * d).sum(-1) + cut / (b * d).sum(-1)
    empty = (a.sum(-1) == 0) | (b.sum(-1) == 0)
    return torch.where(empty, torch.full_like(ncut, float("nan")), ncut)


def keep_seed_component(side: np.ndarray, seed: int) -> np.ndarray:
    """The 4-connected component of the ``[h, w]`` bool ``side`` that holds token ``seed``."""
    labels, _ = ndimage.label(side)
    return labels == labels.flat[seed]


def tokencut_partition(
    feats: torch.Tensor,
    grid: tuple[int, int],
    tau: float = _DEFAULT_TAU,
    eps: float = _DEFAULT_EPS,
    *,
    border_rule: bool = True,
    seed_component: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenCut foreground on the patch grid, with the steps in the module docstring.

    ``feats`` is ``[B, N, C]`` patch features with ``N = h * w`` (row-major ``grid``).
    Returns ``(mask, ncut)``: ``mask`` ``[B, h, w]`` float32 in {0, 1} on feats' device
    and ``ncut`` ``[B]`` float64, the hard normalised cut of the returned mask on W.
    """
    h, w = grid
    if feats.ndim != 3 or feats.shape[1] != h * w:
        raise ValueError(f"feats {tuple(feats.shape)} do not match grid {grid} ([B, h*w, C])")
    W = affinity(feats, tau, eps)
    x = fiedler_vector(W)  # [B, N]
    magnitude = x.abs()
    side = x > x.mean(dim=-1, keepdim=True)
    seed = magnitude.argmax(dim=-1)
    seed_side = side.gather(-1, seed.unsqueeze(-1))
    fg = torch.where(seed_side, side, ~side)
    if border_rule:
        flip = border_flip(fg.view(-1, h, w).float()) & (~fg).any(dim=-1)
        if bool(flip.any()):
            logger.debug("border rule overrides TokenCut's seed side for %d image(s)", int(flip.sum()))
        fg = torch.where(flip.unsqueeze(-1), ~fg, fg)
        seed = magnitude.masked_fill(~fg, -1.0).argmax(dim=-1)
    if seed_component:
        fg_np = fg.view(-1, h, w).cpu().numpy()
        seeds = seed.tolist()
        kept = np.stack([keep_seed_component(m, s) for m, s in zip(fg_np, seeds)])
        fg = torch.from_numpy(kept).to(feats.device).view(-1, h * w)
    mask = fg.float()
    return mask.view(-1, h, w), hard_ncut(mask, W)


def upsample_patch_mask(mask: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of a ``[B, h, w]`` patch mask to ``[B, H, W]`` values in {0, 1}.

    TokenCut's own upsampling (``F.interpolate(mode="nearest")``): every pixel takes its
    patch's value. Bilinear would soften the edges, which moves maxF and MAE away from
    the published figures.
    """
    return F.interpolate(mask.unsqueeze(1).float(), size=image_hw, mode="nearest").squeeze(1)


def tokencut_prob(
    feats: torch.Tensor,
    grid: tuple[int, int],
    image_hw: tuple[int, int],
    tau: float = _DEFAULT_TAU,
    eps: float = _DEFAULT_EPS,
) -> torch.Tensor:
    """TokenCut foreground as a ``[B, H, W]`` map (nearest upsampling) at the size given.

    For the ncut as well, call ``tokencut_partition`` then ``upsample_patch_mask``: the
    eigen-decomposition is the expensive part and should run once.
    """
    mask, _ = tokencut_partition(feats, grid, tau, eps)
    return upsample_patch_mask(mask, image_hw)
