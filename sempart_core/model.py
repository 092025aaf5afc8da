"""The SEMPART network (docs/method.md, "Coarse branch", "Fine branch"): a coarse patch-level head and a
guided super-resolution head on top of a frozen backbone's patch features."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import Backbone, build_backbone
from .config import ModelConfig, SempartConfig


class CoarseBranch(nn.Module):
    """1x1 projection, a small pre-norm transformer over the patches, one logit per patch."""

    def __init__(self, in_dim: int, cfg: ModelConfig):
        super().__init__()
        # Backbone features vary in scale across models and layers; normalise first.
        self.in_norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, cfg.dim)
        layer = nn.TransformerEncoderLayer(
            d_model=cfg.dim,
            nhead=cfg.heads,
            dim_feedforward=int(cfg.dim * cfg.mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, 1)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, N, C] -> (tokens [B, N, dim], logits [B, N])."""
        tokens = self.norm(self.encoder(self.proj(self.in_norm(feats))))
        return tokens, self.head(tokens).squeeze(-1)


def _conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    groups = math.gcd(out_ch, 8)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.GroupNorm(groups, out_ch), nn.GELU()
    )


def stage_sizes(grid: tuple[int, int], patch: int) -> list[tuple[int, int]]:
    """Output size of each guided upsampling stage: x2 steps, the last one exact.

    ceil(log2(p)) stages; for p = 14 the x2 steps reach 8x and the last stage resizes
    to the full 14x.
    """
    n = max(1, math.ceil(math.log2(patch)))
    h, w = grid
    sizes = [(h * 2**s, w * 2**s) for s in range(1, n)]
    return sizes + [(h * patch, w * patch)]


class FineBranch(nn.Module):
    """Guided super-resolution: each stage upsamples, concatenates the image at that
    scale (and the coarse probability), then conv3x3 + GroupNorm + GELU."""

    def __init__(self, in_dim: int, patch: int, cfg: ModelConfig):
        super().__init__()
        self.patch = patch
        self.uses_coarse = cfg.fine_uses_coarse
        extra = 3 + (1 if cfg.fine_uses_coarse else 0)
        n_stages = max(1, math.ceil(math.log2(patch)))
        chans = [in_dim] + [cfg.fine_channels] * n_stages
        self.stages = nn.ModuleList(
            _conv_block(chans[i] + extra, chans[i + 1]) for i in range(n_stages)
        )
        self.out = nn.Conv2d(cfg.fine_channels + 3, 1, 3, padding=1)

    def forward(
        self, tokens: torch.Tensor, grid: tuple[int, int], image: torch.Tensor, coarse_prob: torch.Tensor
    ) -> torch.Tensor:
        """tokens [B, N, dim], image [B, 3, H, W], coarse_prob [B, h, w] -> logits [B, H, W]."""
        b = tokens.shape[0]
        x = tokens.transpose(1, 2).reshape(b, -1, *grid)
        coarse = coarse_prob.unsqueeze(1)
        for stage, size in zip(self.stages, stage_sizes(grid, self.patch)):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            guide = [F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)]
            if self.uses_coarse:
                guide.append(F.interpolate(coarse, size=size, mode="bilinear", align_corners=False))
            x = stage(torch.cat([x, *guide], dim=1))
        return self.out(torch.cat([x, image], dim=1)).squeeze(1)


@dataclass
class HeadOutput:
    coarse: torch.Tensor  # [B, h, w] foreground probability per patch
    fine: torch.Tensor  # [B, H, W] foreground probability per pixel


class SempartHeads(nn.Module):
    """The trainable part of SEMPART: everything after the frozen backbone."""

    def __init__(self, feature_dim: int, patch: int, cfg: ModelConfig):
        super().__init__()
        self.patch = patch
        self.coarse = CoarseBranch(feature_dim, cfg)
        self.fine = FineBranch(cfg.dim, patch, cfg)

    def forward(self, feats: torch.Tensor, image: torch.Tensor) -> HeadOutput:
        """feats [B, N, C] from the backbone for image [B, 3, H, W] (H, W multiples of p)."""
        grid = (image.shape[-2] // self.patch, image.shape[-1] // self.patch)
        tokens, logits = self.coarse(feats)
        coarse = torch.sigmoid(logits.float()).view(-1, *grid)
        fine_logits = self.fine(tokens, grid, image, coarse.to(tokens.dtype))
        return HeadOutput(coarse=coarse, fine=torch.sigmoid(fine_logits.float()))


def build_model(config: SempartConfig, seed: int | None = None) -> tuple[Backbone, SempartHeads]:
    """A frozen backbone with its configured weights and freshly initialised heads."""
    backbone = build_backbone(config.backbone, config.data.image_size)
    if seed is not None:
        torch.manual_seed(seed)
    heads = SempartHeads(backbone.feature_dim, backbone.patch_size, config.model)
    return backbone, heads
