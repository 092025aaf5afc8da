"""Several objects per image: MaskCut (CutLER, Wang et al. 2023), batched on the device.

MaskCut repeats TokenCut's normalised cut. Per image, for each of up to N cuts
(``InstanceConfig``; docs/method.md, "Instances"):

1. Graph of the keys: ``W_ij = 1`` where the cosine similarity exceeds tau, else eps
   (``graph.affinity``'s rule); the patches found by earlier cuts have their features
   zeroed, so they link to everything with eps only but stay in the graph.
2. ``x`` = second smallest eigenvector of ``(D - W) x = lambda D x``
   (``fiedler.fiedler``), with its largest-magnitude entry (the seed) positive.
3. The seed's side is ``x > mean(x)``; it is the foreground unless it holds
   ``corner_flip`` or more of the 4 corner patches, then the other side is, with the
   seed re-picked as the smallest entry of x.
4. Only the 4-connected component of the foreground holding the seed is kept.
5. From the second cut on, the mask is dropped (empty) when its IoU with the previous
   cut's mask exceeds ``overlap_iou`` or it covers at most ``min_patch_frac`` of the
   patches; the previous mask is then the empty one.
6. Its patches are zeroed for the next cut, and earlier masks are subtracted from it.

On step 3: CutLER's code decides on ``x > mean`` with whatever sign the solver returns,
so there the corner rule only acts when the returned seed entry is positive; fixing
the sign first gives the rule as the paper states it, the same for every solver.

All images of a model call run each cut together: one similarity product per image
(step 1 only masks it afterwards), one batched eigen-solve per cut. Only the seed
components (step 4, a few hundred patches per image) go to the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sempart_core.config import InstanceConfig
from sempart_core.fiedler import FiedlerResult, fiedler
from sempart_core.graph import no_autocast
from sempart_core.postprocess import RawInstances
from sempart_core.tokencut import hard_ncut, keep_seed_component

# Images whose graphs are built at once: images * N^2 stays below this many float64
# entries (2 GiB), so memory is bounded whatever the batch and image size.
_MAX_GRAPH_ELEMENTS = 1 << 28


@dataclass
class Cut:
    """One cut of every image in a batch: the kept patches (after the drop rule) and
    what the score is made of. All [B] except ``mask`` [B, N]."""

    mask: torch.Tensor
    ncut: torch.Tensor  # hard normalised cut of the kept patches on this cut's graph (NaN if empty)
    eigenvalue: torch.Tensor  # lambda_2 of the cut's graph (NaN for a mask not found by a cut)
    area: torch.Tensor  # share of the patches kept


def linked_pairs(feats: torch.Tensor, tau: float) -> torch.Tensor:
    """Bool [B, N, N]: cosine similarity of the features above tau (float32, no autocast)."""
    with no_autocast(feats.device):
        f = F.normalize(feats.float(), dim=-1)
        return (f @ f.mT) > tau


def painted_graph(linked: torch.Tensor, painted: torch.Tensor, eps: float) -> torch.Tensor:
    """W [B, N, N] float64 with the ``painted`` [B, N] patches' features zeroed.

    A zero feature has cosine 0 with everything (itself included), so its row and
    column hold eps only, as when the similarities are recomputed from zeroed features.
    """
    keep = ~painted
    pairs = linked & keep.unsqueeze(-1) & keep.unsqueeze(-2)
    return torch.where(pairs, 1.0, eps).to(torch.float64)


def foreground_side(x: torch.Tensor, grid: tuple[int, int], corner_flip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3 of the module docstring: (foreground [B, N] bool, seed [B]) from x [B, N]
    whose largest-magnitude entry is positive."""
    h, w = grid
    side = x > x.mean(dim=-1, keepdim=True)
    corners = side.view(-1, h, w)[:, [0, 0, -1, -1], [0, -1, 0, -1]].sum(dim=-1)
    reverse = (corners >= corner_flip) if corner_flip > 0 else torch.zeros_like(corners, dtype=torch.bool)
    foreground = torch.where(reverse.unsqueeze(-1), ~side, side)
    seed = torch.where(reverse, x.argmin(dim=-1), x.argmax(dim=-1))
    return foreground, seed


def seed_components(foreground: torch.Tensor, seed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Step 4: the 4-connected component of each foreground holding its seed, [B, N]."""
    sides = foreground.view(-1, *grid).cpu().numpy()
    kept = np.stack([keep_seed_component(s, i) for s, i in zip(sides, seed.tolist())])
    return torch.from_numpy(kept).to(foreground.device).view(foreground.shape)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks [B, N]; 0 where both are empty."""
    union = (a | b).sum(-1)
    return (a & b).sum(-1) / union.clamp(min=1)


def dropped(mask: torch.Tensor, previous: torch.Tensor, config: InstanceConfig) -> torch.Tensor:
    """Step 5: bool [B], the masks too like the previous one or too small."""
    area = mask.float().mean(-1)
    return (mask_iou(mask, previous) > config.overlap_iou) | (area <= config.min_patch_frac)


def solve(W: torch.Tensor, grid: tuple[int, int], config: InstanceConfig) -> FiedlerResult:
    return fiedler(W, block=config.solver_block, dense_max_nodes=config.dense_max_nodes,
                   tol=config.solver_tol, max_iter=config.solver_max_iter, grid=grid)


def cut(linked: torch.Tensor, painted: torch.Tensor, grid: tuple[int, int], config: InstanceConfig) -> tuple[Cut, FiedlerResult]:
    """Steps 1 to 4 for every image: the seed component of the next cut (no drop rule)."""
    W = painted_graph(linked, painted, config.eps)
    result = solve(W, grid, config)
    foreground, seed = foreground_side(result.vector, grid, config.corner_flip)
    mask = seed_components(foreground, seed, grid)
    found = Cut(mask, hard_ncut(mask.double(), W), result.values[:, 0], mask.double().mean(-1))
    return found, result


def model_cut(linked: torch.Tensor, mask: torch.Tensor, config: InstanceConfig) -> Cut:
    """The model's own mask [B, N] as the first instance (mode ``sempart``)."""
    W = painted_graph(linked, torch.zeros_like(mask), config.eps)
    nan = torch.full(mask.shape[:1], float("nan"), dtype=torch.float64, device=mask.device)
    return Cut(mask, hard_ncut(mask.double(), W), nan, mask.double().mean(-1))


def instance_score(found: Cut) -> torch.Tensor:
    """Score in [0, 1] per instance, [B] (docs/method.md, "Instances")."""
    quality = 1.0 - found.ncut.clamp(0.0, 1.0)
    return torch.nan_to_num(quality, nan=0.0)


def maskcut_batch(
    feats: torch.Tensor,
    grid: tuple[int, int],
    config: InstanceConfig,
    first: torch.Tensor | None = None,
) -> list[RawInstances]:
    """MaskCut's instances for features [B, N, C] on the patch ``grid``, one
    `RawInstances` per image.

    With ``first`` [B, N] (the model's foreground, mode ``sempart``) that mask is the
    first instance and ``max_instances - 1`` cuts follow over the other patches.
    Images are processed in groups whose graphs fit ``_MAX_GRAPH_ELEMENTS``.
    """
    n = feats.shape[1]
    if n != grid[0] * grid[1]:
        raise ValueError(f"feats {tuple(feats.shape)} do not match grid {grid}")
    step = max(1, _MAX_GRAPH_ELEMENTS // (n * n))
    out: list[RawInstances] = []
    for start in range(0, feats.shape[0], step):
        part = None if first is None else first[start : start + step]
        out += _maskcut_group(feats[start : start + step], grid, config, part)
    return out


def _maskcut_group(
    feats: torch.Tensor, grid: tuple[int, int], config: InstanceConfig, first: torch.Tensor | None
) -> list[RawInstances]:
    linked = linked_pairs(feats, config.tau)
    cuts: list[Cut] = []
    if first is not None:
        cuts.append(model_cut(linked, first.bool(), config))
    painted = torch.zeros(feats.shape[:2], dtype=torch.bool, device=feats.device)
    if cuts:
        painted = painted | cuts[0].mask
    while len(cuts) < config.max_instances:
        found, _ = cut(linked, painted, grid, config)
        if cuts:
            drop = dropped(found.mask, cuts[-1].mask, config)
            found.mask = found.mask & ~drop.unsqueeze(-1)
        cuts.append(found)
        painted = painted | found.mask
    return _raw_instances(cuts, grid, first is not None)


def _raw_instances(cuts: list[Cut], grid: tuple[int, int], first_is_model: bool) -> list[RawInstances]:
    """Earlier masks subtracted from later ones; empty masks left out; per image."""
    masks = torch.stack([c.mask for c in cuts], dim=1)  # [B, K, N]
    earlier = torch.cumsum(masks.int(), dim=1) - masks.int()
    masks = masks & (earlier == 0)
    ncut = torch.stack([c.ncut for c in cuts], dim=1).cpu().numpy()
    score = torch.stack([instance_score(c) for c in cuts], dim=1).cpu().numpy()
    masks_np = masks.view(*masks.shape[:2], *grid).cpu().numpy()
    out = []
    for b in range(masks_np.shape[0]):
        keep = masks_np[b].reshape(len(cuts), -1).any(-1)
        out.append(RawInstances(
            masks=masks_np[b][keep],
            ncut=ncut[b][keep].astype(np.float32),
            score=score[b][keep].astype(np.float32),
            first_is_model=first_is_model and bool(keep[0]),
        ))
    return out
