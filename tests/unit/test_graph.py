"""The graph is built in float32 whatever the autocast, and the score's ncut needs no dense W."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sempart_core.graph import affinity, partition_ncut
from sempart_core.losses import expected_ncut

TAU, EPS = 0.2, 1e-5


def near_threshold_features(n: int = 300, c: int = 64, seed: int = 0) -> torch.Tensor:
    """Random features: thousands of pairs have a cosine similarity close to tau."""
    return torch.randn(2, n, c, generator=torch.Generator().manual_seed(seed))


def test_bf16_autocast_would_move_pairs_across_tau() -> None:
    """The hazard the float32 graph avoids is real for these features."""
    f = F.normalize(near_threshold_features(), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim_bf16 = f @ f.transpose(1, 2)
    assert sim_bf16.dtype == torch.bfloat16
    exact = f @ f.transpose(1, 2)
    assert int(((sim_bf16.float() > TAU) != (exact > TAU)).sum()) > 0


def test_affinity_identical_with_and_without_bf16_autocast() -> None:
    feats = near_threshold_features()
    plain = affinity(feats, TAU, EPS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = affinity(feats, TAU, EPS)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(plain, under_autocast)


@pytest.mark.parametrize("block", [1 << 26, 300 * 2 * 7])  # one block; 7 rows per block
def test_partition_ncut_equals_dense_expected_ncut(block: int) -> None:
    feats = near_threshold_features()
    y = (torch.rand(2, 300, generator=torch.Generator().manual_seed(1)) > 0.6).float()
    dense = expected_ncut(y, affinity(feats, TAU, EPS), clamp_eps=1e-6)
    blocked = partition_ncut(feats, y, TAU, EPS, clamp_eps=1e-6, max_block_elements=block)
    torch.testing.assert_close(blocked, dense, rtol=1e-5, atol=1e-6)
    soft = torch.rand(2, 300, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        partition_ncut(feats, soft, TAU, EPS, clamp_eps=1e-4, max_block_elements=block),
        expected_ncut(soft, affinity(feats, TAU, EPS), clamp_eps=1e-4), rtol=1e-5, atol=1e-6,
    )


def test_partition_ncut_identical_under_bf16_autocast() -> None:
    feats = near_threshold_features()
    y = (feats[..., 0] > 0).float()
    plain = partition_ncut(feats, y, TAU, EPS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = partition_ncut(feats, y, TAU, EPS)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(plain, under_autocast)


def test_partition_ncut_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="partition_ncut expects"):
        partition_ncut(torch.zeros(1, 10, 4), torch.zeros(1, 9))
