"""The border rule: which side of the symmetric cut is the foreground (docs/method.md).

Runs on the model's output tensors, in training, evaluation and labelling alike.
"""
from __future__ import annotations

import torch


def border_mean(y: torch.Tensor) -> torch.Tensor:
    """Mean of ``y`` ``[B, h, w]`` over each image's border patches (each counted once),
    ``[B]`` float32; autograd flows through it (the border prior, losses.py, trains on it)."""
    if y.ndim != 3:
        raise ValueError(f"expected maps [B, h, w], got shape {tuple(y.shape)}")
    border = torch.ones(y.shape[-2:], dtype=torch.bool, device=y.device)
    border[1:-1, 1:-1] = False
    return y[:, border].float().mean(dim=1)


def border_flip(y: torch.Tensor) -> torch.Tensor:
    """Which images must be flipped so that the foreground is the border's minority.

    The cut is symmetric in ``y`` and ``1 - y``; the side that holds most of the image
    border is taken as background. ``y`` is ``[B, h, w]`` foreground probabilities
    (the coarse map). Returns bool ``[B]``: True where the mean of ``y`` over the border
    patches (each counted once) exceeds 0.5. A tie (exactly 0.5) keeps ``y`` as it is.
    """
    return border_mean(y.detach()) > 0.5


def _flip_where(y: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``1 - y`` for the images where ``flip`` is True; keeps autograd intact."""
    flip = flip.view(-1, *([1] * (y.ndim - 1)))
    return torch.where(flip, 1 - y, y)


def foreground_rule(
    y_coarse: torch.Tensor, y_fine: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flip coarse ``[B, h, w]`` and fine ``[B, H, W]`` maps together, per image.

    The decision comes from the coarse map only, so both branches always agree on which
    side is the foreground, in training, evaluation and labelling alike. Returns the
    maps and the bool ``[B]`` flips (evaluation undoes them to score the rule off).
    """
    if y_fine.shape[0] != y_coarse.shape[0]:
        raise ValueError(
            f"batch sizes differ: coarse {y_coarse.shape[0]} vs fine {y_fine.shape[0]}"
        )
    flip = border_flip(y_coarse)
    return _flip_where(y_coarse, flip), _flip_where(y_fine, flip), flip


def apply_foreground_rule(
    y_coarse: torch.Tensor, y_fine: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`foreground_rule` without the flips."""
    coarse, fine, _ = foreground_rule(y_coarse, y_fine)
    return coarse, fine
