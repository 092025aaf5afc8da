"""Backbone features and weight loading, on tiny random ViTs (no downloads)."""
from __future__ import annotations

import argparse
import copy
import hashlib
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from torch import Tensor, nn

from sempart_core.backbone import (
    Backbone,
    WeightLoadError,
    build_backbone,
    create_vit,
    load_backbone_weights,
)
from sempart_core.config import BackboneConfig

# name, timm overrides, input (H, W) that is not square and divides by the patch
TINY = {
    8: ("vit_small_patch8_224", {"embed_dim": 48, "depth": 2, "num_heads": 2}, (64, 96)),
    14: ("vit_small_patch14_dinov2", {"embed_dim": 48, "depth": 2, "num_heads": 2}, (56, 84)),
}


def tiny_vit(patch: int = 8, seed: int = 0, **overrides) -> nn.Module:
    name, kwargs, _ = TINY[patch]
    torch.manual_seed(seed)
    return create_vit(name, **{**kwargs, **overrides})


def images(height: int, width: int, batch: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def reference_keys(vit: nn.Module, x: Tensor) -> Tensor:
    """Keys of the last block computed step by step, heads split then merged again."""
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for blk in vit.blocks[:-1]:
            t = blk(t)
        last = vit.blocks[-1]
        qkv = last.attn.qkv(last.norm1(t))
        b, n, _ = qkv.shape
        heads = last.attn.num_heads
        q, k, v = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # [B, heads, T, hd]
        k = k.transpose(1, 2).reshape(b, n, -1)
        return k[:, vit.num_prefix_tokens:]


@pytest.fixture(scope="module")
def vit_p16() -> Backbone:
    return build_backbone(BackboneConfig(name="vit_tiny_patch16_224", weights="random"))


def backbone_for(patch: int, vit_p16: Backbone) -> tuple[Backbone, tuple[int, int]]:
    if patch == 16:
        return vit_p16, (64, 96)
    return Backbone(tiny_vit(patch)), TINY[patch][2]


@pytest.mark.parametrize("patch", [8, 14, 16])
def test_keys_match_step_by_step_computation(patch: int, vit_p16: Backbone) -> None:
    backbone, (h, w) = backbone_for(patch, vit_p16)
    x = images(h, w)
    feats = backbone(x)
    gh, gw = backbone.grid(h, w)
    assert backbone.patch_size == patch
    assert (gh, gw) == (h // patch, w // patch)
    assert feats.shape == (2, gh * gw, backbone.feature_dim)
    assert backbone.feature_dim == backbone.vit.embed_dim
    torch.testing.assert_close(feats, reference_keys(backbone.vit, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("patch", [8, 14, 16])
def test_tokens_are_forward_features_without_prefix(patch: int, vit_p16: Backbone) -> None:
    _, (h, w) = backbone_for(patch, vit_p16)
    vit = vit_p16.vit if patch == 16 else tiny_vit(patch)
    backbone = Backbone(vit, feature="tokens")
    x = images(h, w)
    with torch.no_grad():
        expected = vit.forward_features(x)[:, vit.num_prefix_tokens:]
    feats = backbone(x)
    assert feats.shape == (2, (h // patch) * (w // patch), backbone.feature_dim)
    torch.testing.assert_close(feats, expected)


def test_keys_skip_the_rest_of_the_last_block_and_leave_no_hook() -> None:
    backbone = Backbone(tiny_vit(8))
    calls = {"first_mlp": 0, "last_mlp": 0}
    backbone.vit.blocks[0].mlp.register_forward_hook(lambda *a: calls.__setitem__(
        "first_mlp", calls["first_mlp"] + 1))
    backbone.vit.blocks[-1].mlp.register_forward_hook(lambda *a: calls.__setitem__(
        "last_mlp", calls["last_mlp"] + 1))
    backbone(images(64, 96))
    assert calls == {"first_mlp": 1, "last_mlp": 0}
    assert not backbone.vit.blocks[-1].attn.qkv._forward_hooks


def test_frozen_no_grad_and_stays_in_eval() -> None:
    backbone = Backbone(tiny_vit(8, drop_rate=0.5, proj_drop_rate=0.5))
    parent = nn.Sequential(backbone, nn.Linear(48, 1))
    parent.train()
    assert parent[1].training
    assert not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    x = images(64, 96).requires_grad_(True)
    out = backbone(x)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, backbone(x))  # dropout really off


def test_rejects_sizes_that_do_not_divide_by_the_patch() -> None:
    backbone = Backbone(tiny_vit(8))
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        backbone(images(60, 96))
    with pytest.raises(ValueError, match="multiple"):
        backbone.grid(64, 90)


def test_normalisation_follows_the_pretrained_config(vit_p16: Backbone) -> None:
    for backbone in (vit_p16, Backbone(tiny_vit(8))):
        cfg = timm.data.resolve_data_config({}, model=backbone.vit)
        assert backbone.mean == tuple(cfg["mean"]) and backbone.std == tuple(cfg["std"])
    assert vit_p16.mean == (0.5, 0.5, 0.5)  # augreg weights, not ImageNet statistics
    assert Backbone(tiny_vit(8)).mean == pytest.approx((0.485, 0.456, 0.406))


def test_random_backbone_is_marked_and_reproducible(vit_p16: Backbone) -> None:
    state = torch.get_rng_state()
    again = build_backbone(BackboneConfig(name="vit_tiny_patch16_224", weights="random"))
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert again.random_weights and vit_p16.random_weights
    assert again.weights_sha256 is None
    for a, b in zip(again.state_dict().values(), vit_p16.state_dict().values()):
        assert torch.equal(a, b)


def test_unknown_name_and_feature_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown timm model 'vit_nope'"):
        build_backbone(BackboneConfig(name="vit_nope", weights="random"))
    with pytest.raises(ValueError, match="feature must be one of"):
        Backbone(tiny_vit(8), feature="values")


def test_hub_without_network_suggests_local_weights(monkeypatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightLoadError) as info:
        build_backbone(BackboneConfig(name="vit_tiny_patch16_224", weights="hub"))
    message = str(info.value)
    assert "\n" not in message and "--weights PATH" in message
    assert "vit_tiny_patch16_224" in message


# ---- weight files in the layouts found in the wild --------------------------------


def dino_release_layout(vit: nn.Module) -> dict[str, Tensor]:
    """Keys of DINO's own VisionTransformer (dino_deitsmall8_pretrain.pth), spelt out
    from its source rather than taken from timm's state_dict."""
    sd = {"cls_token": vit.cls_token, "pos_embed": vit.pos_embed,
          "patch_embed.proj.weight": vit.patch_embed.proj.weight,
          "patch_embed.proj.bias": vit.patch_embed.proj.bias,
          "norm.weight": vit.norm.weight, "norm.bias": vit.norm.bias}
    for i, blk in enumerate(vit.blocks):
        for part, module in [("norm1", blk.norm1), ("attn.qkv", blk.attn.qkv),
                             ("attn.proj", blk.attn.proj), ("norm2", blk.norm2),
                             ("mlp.fc1", blk.mlp.fc1), ("mlp.fc2", blk.mlp.fc2)]:
            sd[f"blocks.{i}.{part}.weight"] = module.weight
            sd[f"blocks.{i}.{part}.bias"] = module.bias
    return {k: v.detach().clone() for k, v in sd.items()}


def dino_training_checkpoint(teacher: nn.Module, student: nn.Module) -> dict:
    """DINO's checkpoint.pth: MultiCropWrapper (backbone + DINOHead) for both nets,
    the student under DDP, plus optimiser state and argparse options."""
    head = {"head.mlp.0.weight": torch.randn(64, 48), "head.last_layer.weight_g": torch.ones(1, 1)}
    return {
        "student": {**{f"module.backbone.{k}": v for k, v in dino_release_layout(student).items()},
                    **{f"module.{k}": v for k, v in head.items()}},
        "teacher": {**{f"backbone.{k}": v for k, v in dino_release_layout(teacher).items()},
                    **head},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_small", patch_size=8, lr=0.0005),
        "dino_loss": {"center": torch.zeros(1, 64)},
    }


LAYOUTS = {
    "timm.pth": lambda src, other: src.state_dict(),
    "timm.safetensors": lambda src, other: src.state_dict(),
    "dino_release.pth": lambda src, other: dino_release_layout(src),
    "dino_checkpoint.pth": lambda src, other: dino_training_checkpoint(src, other),
    "trainer.pt": lambda src, other: {"state_dict": {f"module.{k}": v
                                                     for k, v in src.state_dict().items()}},
    "classifier.bin": lambda src, other: {"model": {**src.state_dict(),
                                                    "head.weight": torch.zeros(10, 48),
                                                    "head.bias": torch.zeros(10)}},
}


def save(obj: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_weights_round_trip(layout: str, tmp_path: Path) -> None:
    source, other, target = tiny_vit(seed=1), tiny_vit(seed=2), tiny_vit(seed=3)
    path = save(LAYOUTS[layout](source, other), tmp_path / layout)
    x = images(64, 96)
    expected = Backbone(source)(x)
    assert not torch.allclose(Backbone(target)(x), expected)

    sha256 = load_backbone_weights(target, str(path))

    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(Backbone(target)(x), expected)


def test_build_backbone_from_a_file_records_provenance(vit_p16: Backbone,
                                                      tmp_path: Path) -> None:
    source = copy.deepcopy(vit_p16.vit)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.02 * torch.randn_like(p))  # differ from the seeded random weights
    path = save(source.state_dict(), tmp_path / "tiny.safetensors")
    backbone = build_backbone(BackboneConfig(name="vit_tiny_patch16_224", weights=str(path)))
    x = images(64, 96)
    assert torch.equal(backbone(x), Backbone(source)(x))
    assert not backbone.random_weights
    assert backbone.weights_source == str(path)
    assert backbone.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_image_size_resamples_position_embeddings_once_at_load(tmp_path: Path) -> None:
    source = tiny_vit(seed=1)  # 224 px: a 28 x 28 grid of position embeddings
    path = save(source.state_dict(), tmp_path / "w.pth")
    target = tiny_vit(seed=2, img_size=64)
    load_backbone_weights(target, str(path))
    assert target.pos_embed.shape == (1, 1 + 8 * 8, 48)
    x = images(64, 64)
    # same bicubic resampling as the source does on the fly at this size
    torch.testing.assert_close(Backbone(target)(x), Backbone(source)(x), rtol=1e-5, atol=1e-5)


def test_other_depth_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    path = save(tiny_vit(depth=4).state_dict(), tmp_path / "deep.pth")
    with pytest.raises(WeightLoadError) as info:
        load_backbone_weights(tiny_vit(depth=2), str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "24 unexpected key(s) (blocks.2." in message and "+19 more" in message
    assert "missing key" not in message

    path = save(tiny_vit(depth=1).state_dict(), tmp_path / "shallow.pth")
    with pytest.raises(WeightLoadError, match=r"12 missing key\(s\) \(blocks\.1\."):
        load_backbone_weights(tiny_vit(depth=2), str(path))


def test_other_width_names_wrong_shapes(tmp_path: Path) -> None:
    path = save(tiny_vit(embed_dim=32).state_dict(), tmp_path / "narrow.safetensors")
    with pytest.raises(WeightLoadError, match="wrong-shape key"):
        load_backbone_weights(tiny_vit(), str(path))


def test_other_patch_size_is_refused_not_resampled(tmp_path: Path) -> None:
    torch.manual_seed(0)
    p16 = create_vit("vit_small_patch16_224", embed_dim=48, depth=2, num_heads=2)
    path = save(p16.state_dict(), tmp_path / "p16.pth")
    with pytest.raises(WeightLoadError, match="16x16 patches but the model uses 8x8"):
        load_backbone_weights(tiny_vit(8), str(path))


class Payload:
    """Not allowed by torch.load(weights_only=True)."""


@pytest.mark.parametrize("name, content, match", [
    ("missing.pth", None, "cannot read"),
    ("weights.npz", b"whatever", "must end in .safetensors"),
    ("garbage.safetensors", b"\x00" * 16, "cannot decode"),
    ("pickled.pth", "pickle", "cannot decode"),
    ("tensor.pth", "tensor", "not a state dict"),
])
def test_unreadable_weights_are_one_line_errors(name, content, match, tmp_path: Path) -> None:
    path = tmp_path / name
    if content == "pickle":
        torch.save({"obj": Payload()}, path)
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightLoadError, match=match) as info:
        load_backbone_weights(tiny_vit(), str(path))
    assert "\n" not in str(info.value)
