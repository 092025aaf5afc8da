"""The SEMPART network: shapes for several patch sizes and non-square inputs, and the
frozen backbone (issue 3, acceptance 3)."""
import pytest
import timm
import torch

from sempart_core.backbone import Backbone
from sempart_core.config import LossConfig, ModelConfig
from sempart_core.graph import affinity
from sempart_core.losses import sempart_loss
from sempart_core.model import SempartHeads, stage_sizes


def tiny_vit(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        name, pretrained=False, num_classes=0, dynamic_img_size=True, embed_dim=48, depth=2, num_heads=2
    )


@pytest.mark.parametrize(
    "name,patch,size",
    [
        ("vit_small_patch8_224", 8, (48, 64)),
        ("vit_small_patch14_dinov2", 14, (42, 70)),
        ("vit_small_patch16_224", 16, (64, 48)),
    ],
)
def test_forward_backward_shapes_and_frozen_backbone(name, patch, size):
    backbone = Backbone(tiny_vit(name))
    assert backbone.patch_size == patch
    heads = SempartHeads(backbone.feature_dim, patch, ModelConfig(dim=16, heads=2, fine_channels=8))
    x = torch.randn(2, 3, *size)
    feats = backbone(x)
    out = heads(feats, x)
    h, w = size[0] // patch, size[1] // patch
    assert out.coarse.shape == (2, h, w)
    assert out.fine.shape == (2, *size)
    assert 0 <= out.coarse.min() and out.coarse.max() <= 1
    assert 0 <= out.fine.min() and out.fine.max() <= 1
    terms = sempart_loss(out.coarse, out.fine, affinity(feats, 0.2, 1e-5), x, patch, LossConfig())
    terms.total.backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert not any(p.requires_grad for p in backbone.parameters())
    grads = [p.grad for p in heads.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # Both branches learn: the coarse projection and the fine output conv get gradients.
    assert heads.coarse.proj.weight.grad.abs().sum() > 0
    assert heads.fine.out.weight.grad.abs().sum() > 0


def test_stage_sizes_reach_full_resolution():
    assert stage_sizes((4, 5), 8) == [(8, 10), (16, 20), (32, 40)]
    assert stage_sizes((3, 5), 16) == [(6, 10), (12, 20), (24, 40), (48, 80)]
    sizes = stage_sizes((3, 5), 14)
    assert len(sizes) == 4 and sizes[-1] == (42, 70)


def test_backbone_stays_in_eval_mode():
    backbone = Backbone(tiny_vit("vit_small_patch16_224"))
    backbone.train()
    assert not backbone.training and not backbone.vit.training
