"""The semantic graph of SEMPART.md section 2: patches linked when their features agree."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def affinity(feats: torch.Tensor, tau: float = 0.2, eps: float = 1e-5) -> torch.Tensor:
    """W [B, N, N] from patch features [B, N, C]: 1 where cosine similarity > tau, else eps.

    Computed in float32 whatever the input dtype, so that bf16 features on GPU do not
    move pairs across the threshold.
    """
    f = F.normalize(feats.float(), dim=-1)
    sim = f @ f.transpose(1, 2)
    return torch.where(sim > tau, torch.ones_like(sim), torch.full_like(sim, eps))


def degree(w: torch.Tensor) -> torch.Tensor:
    """d = W 1, [B, N]."""
    return w.sum(dim=-1)
