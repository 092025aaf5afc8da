"""Plain-PyTorch training of the SEMPART heads; the Ray trainer reuses these pieces.

Decoding and augmentation (`augment`) work on uint8 numpy arrays (cheap to ship between Ray
workers); `training_step` takes a uint8 batch [B, S, S, 3] and does the rest.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from .augment import augment
from .config import SempartConfig, TrainConfig
from .graph import affinity
from .losses import LossTerms, sempart_loss
from .model import SempartHeads

logger = logging.getLogger(__name__)


def to_model_input(batch: torch.Tensor | np.ndarray, mean, std, device=None) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W] on `device`."""
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(np.require(batch, requirements="W"))  # copies read-only arrays only
    x = batch.to(device=device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def make_optimizer(heads: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay to 10% over cfg.steps."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def training_step(
    backbone: torch.nn.Module,
    heads: torch.nn.Module,
    batch: torch.Tensor | np.ndarray,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    cfg: SempartConfig,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> LossTerms:
    """One optimisation step on a uint8 batch [B, S, S, 3].

    `heads` may be DDP-wrapped; the backbone is frozen and runs under no_grad.
    `autocast_dtype` (bf16 on GPU) covers backbone and heads; losses are in float32.
    """
    device = torch.device(device)
    x = to_model_input(batch, backbone.mean, backbone.std, device)
    enabled = autocast_dtype is not None
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        with torch.no_grad():
            feats = backbone(x)
            w = affinity(feats, cfg.graph.tau, cfg.graph.eps)
        out = heads(feats, x)
    terms = sempart_loss(out.coarse, out.fine, w, x, backbone.patch_size, cfg.loss)
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return terms


def random_batches(
    images: list[np.ndarray], cfg: SempartConfig, patch: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """Endless augmented uint8 batches sampled from in-memory images."""
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.integers(0, len(images), size=cfg.train.batch_size)
        yield np.stack([augment(images[i], cfg.data, patch, rng) for i in idx])


def fit(
    backbone: torch.nn.Module,
    heads: SempartHeads,
    batches: Iterable[np.ndarray],
    cfg: SempartConfig,
    device: str = "cpu",
    log_every: int = 50,
    autocast_dtype: torch.dtype | None = None,
) -> list[dict[str, float]]:
    """Single-process training loop for cfg.train.steps steps; returns per-step metrics.

    `autocast_dtype` (bf16 on GPU) is passed to `training_step`, as the Ray trainer does."""
    torch.manual_seed(cfg.train.seed)
    opt = make_optimizer(heads, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    heads.to(device).train()
    history = []
    start = time.perf_counter()
    for step, batch in zip(range(cfg.train.steps), batches):
        metrics = training_step(backbone, heads, batch, opt, sched, cfg, device, autocast_dtype).as_floats()
        metrics["step"] = step + 1
        history.append(metrics)
        if (step + 1) % log_every == 0 or step + 1 == cfg.train.steps:
            ips = (step + 1) * cfg.train.batch_size / (time.perf_counter() - start)
            logger.info("step %d loss %.4f ncut %.4f (%.1f img/s)", step + 1, metrics["total"], metrics["ncut"], ips)
    heads.eval()
    return history
