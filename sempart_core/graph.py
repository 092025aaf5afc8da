"""The semantic graph (docs/method.md): patches linked when their features agree.

Everything here runs in float32 with autocast switched off, whatever the caller's
autocast: under bf16 autocast a matmul would round the cosine similarities to bf16
(about 3 significant digits), moving pairs within ~1e-3 of tau across the threshold,
so a GPU and a CPU would build different graphs from the same features.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

# Rows of W built at once by `partition_ncut`: B * rows * N stays below this many
# elements (16 Mi floats = 64 MiB per block), whatever the batch and image size.
_MAX_BLOCK_ELEMENTS = 1 << 24


@contextmanager
def no_autocast(device: torch.device) -> Iterator[None]:
    """Switch autocast off on `device`'s type, so that matmuls stay in float32."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _threshold(sim: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    return torch.where(sim > tau, 1.0, eps)  # scalars: no full-size tensors of ones and eps


def affinity(feats: torch.Tensor, tau: float = 0.2, eps: float = 1e-5) -> torch.Tensor:
    """W [B, N, N] from patch features [B, N, C]: 1 where cosine similarity > tau, else eps.

    Float32 whatever the input dtype and autocast (module docstring). Dense: at 480 px
    with ViT-S/8 (60 x 60 = 3600 patches) one W is 3600^2 * 4 B = 52 MB, 3.3 GB for a
    batch of 64, and the similarities before the threshold as much again; only training
    and TokenCut's eigen-solve need it whole (inference's score uses `partition_ncut`).
    """
    with no_autocast(feats.device):
        f = F.normalize(feats.float(), dim=-1)
        return _threshold(f @ f.transpose(1, 2), tau, eps)


def degree(w: torch.Tensor) -> torch.Tensor:
    """d = W 1, [B, N]."""
    return w.sum(dim=-1)


def partition_ncut(
    feats: torch.Tensor,
    y: torch.Tensor,
    tau: float = 0.2,
    eps: float = 1e-5,
    clamp_eps: float = 1e-6,
    max_block_elements: int = _MAX_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Expected normalised cut of y [B, N] on the graph of feats [B, N, C], [B] float32.

    The same value as ``losses.expected_ncut(y, affinity(feats, tau, eps), clamp_eps)``
    (cut = y^T W (1 - y), L = cut / y^T d + cut / (1 - y)^T d), but W is built a block
    of rows at a time and never whole: the score needs only the cut and the degrees,
    so inference memory stays bounded (``max_block_elements``) at any image size.
    """
    if feats.ndim != 3 or y.shape != feats.shape[:2]:
        raise ValueError(f"partition_ncut expects feats [B, N, C] and y [B, N], got "
                         f"{tuple(feats.shape)} and {tuple(y.shape)}")
    with no_autocast(feats.device):
        f = F.normalize(feats.float(), dim=-1)
        y = y.float().clamp(clamp_eps, 1.0 - clamp_eps)
        b, n, _ = f.shape
        rows = max(1, max_block_elements // max(1, b * n))
        d = torch.empty(b, n, dtype=torch.float32, device=f.device)
        cut = torch.zeros(b, dtype=torch.float32, device=f.device)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            w = _threshold(f[:, start:stop] @ f.transpose(1, 2), tau, eps)  # [B, rows, N]
            d[:, start:stop] = w.sum(dim=-1)
            cut += (y[:, start:stop] * (w @ (1.0 - y).unsqueeze(-1)).squeeze(-1)).sum(dim=-1)
        return cut / (y * d).sum(-1) + cut / ((1.0 - y) * d).sum(-1)
