"""The border rule picks the foreground side of the cut, for both maps at once."""
from __future__ import annotations

import pytest
import torch

from sempart_core.foreground import apply_foreground_rule, border_flip



def centre_object(h: int = 8, w: int = 10) -> torch.Tensor:
    y = torch.full((h, w), 0.1)
    y[2:6, 3:7] = 0.9
    return y


def test_border_flip_keeps_a_centred_foreground_and_flips_the_inverse() -> None:
    y = centre_object()
    flips = border_flip(torch.stack([y, 1 - y]))
    assert flips.dtype == torch.bool
    assert flips.tolist() == [False, True]


def test_border_flip_uses_the_mean_over_border_patches() -> None:
    h, w = 6, 6  # 20 border patches
    y = torch.zeros(1, h, w)
    y[0, 1:-1, 1:-1] = 1.0  # interior is foreground: must not count
    y[0, 0, :] = 1.0  # 6 of 20 border patches high: minority
    assert border_flip(y).tolist() == [False]
    y[0, -1, :] = 1.0
    y[0, 1:-1, 0] = 1.0  # 6 + 6 + 4 = 16 of 20: majority
    assert border_flip(y).tolist() == [True]
    assert border_flip(torch.full((1, h, w), 0.5)).tolist() == [False]  # a tie keeps y


def test_border_flip_on_degenerate_grids() -> None:
    assert border_flip(torch.full((1, 1, 1), 0.8)).tolist() == [True]
    assert border_flip(torch.full((1, 1, 7), 0.2)).tolist() == [False]
    with pytest.raises(ValueError):
        border_flip(torch.zeros(4, 4))


def test_apply_foreground_rule_flips_both_maps_per_image() -> None:
    y = centre_object()
    coarse = torch.stack([y, 1 - y])
    fine_single = torch.rand(32, 40)
    fine = torch.stack([fine_single, fine_single])
    new_coarse, new_fine = apply_foreground_rule(coarse, fine)
    torch.testing.assert_close(new_coarse[0], y)
    torch.testing.assert_close(new_coarse[1], y)
    torch.testing.assert_close(new_fine[0], fine_single)
    torch.testing.assert_close(new_fine[1], 1 - fine_single)
    assert not border_flip(new_coarse).any()


def test_apply_foreground_rule_keeps_gradients() -> None:
    base = torch.randn(2, 4, 5)
    base[0] -= 3.0  # mostly background: kept
    base[1] += 3.0  # mostly "foreground" on the border: flipped
    logits = base.clone().requires_grad_(True)
    coarse = torch.sigmoid(logits)
    fine = torch.sigmoid(torch.randn(2, 8, 10))
    new_coarse, _ = apply_foreground_rule(coarse, fine)
    new_coarse.sum().backward()
    sign = torch.tensor([1.0, -1.0]).view(2, 1, 1)
    torch.testing.assert_close(logits.grad, sign * (coarse * (1 - coarse)).detach())


def test_apply_foreground_rule_rejects_mismatched_batches() -> None:
    with pytest.raises(ValueError):
        apply_foreground_rule(torch.zeros(2, 3, 3), torch.zeros(3, 6, 6))
