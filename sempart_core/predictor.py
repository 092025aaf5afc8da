"""Images in, masks and boxes out: `load_predictor(uri).predict(list of RGB arrays)`.

Prediction is split in three steps so that the labelling pipeline can run each where
it belongs: `prepare` (CPU: resize to the backbone's input), `infer` (GPU: backbone,
heads, foreground rule, ncut, on a batch of equal-sized inputs) and `finish` (CPU:
resize to the original size, threshold, boxes, score). `predict` chains them.

Methods on the same backbone: ``sempart`` (trained heads), ``tokencut`` (TokenCut as
published: its own seed rule picks the foreground, no border rule) and ``tokencut-bs``
(TokenCut's mask refined with the bilateral solver on the original image in `finish`,
the post-inference refinement SEMPART's fine branch replaces).
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from .artifact import LoadedArtifact, read_artifact
from .backbone import Backbone, build_backbone, create_vit
from .batching import DEFAULT_MAX_BATCH_TOKENS, ImageOutOfMemory, infer_splitting, plan_batches
from .config import SempartConfig
from .bilateral import BilateralConfig, refine_mask
from .foreground import foreground_rule
from .graph import partition_ncut
from .images import prepare_image
from .model import SempartHeads
from .postprocess import Prediction, RawPrediction, finish_raw
from .tokencut import tokencut_partition, upsample_patch_mask
from .training import to_model_input

logger = logging.getLogger(__name__)

METHODS = ("sempart", "tokencut", "tokencut-bs")


class Predictor:
    """A backbone and trained heads (or TokenCut on the same backbone) for inference."""

    def __init__(
        self,
        backbone: Backbone,
        heads: SempartHeads | None,
        config: SempartConfig,
        device: str | torch.device = "cpu",
        method: str = "sempart",
        model_id: str = "",
        meta: dict | None = None,
        batch_size: int = 8,
        bilateral: BilateralConfig = BilateralConfig(),
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        if method == "sempart" and heads is None:
            raise ValueError("method 'sempart' needs trained heads")
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.heads = heads.to(self.device).eval() if heads is not None else None
        self.config = config
        self.method = method
        self.model_id = model_id
        self.meta = meta or {}
        self.batch_size = batch_size
        self.bilateral = bilateral
        self.max_batch_tokens = DEFAULT_MAX_BATCH_TOKENS  # see sempart_core/batching.py
        # bf16 on GPU: the backbone dominates the cost; the graph stays float32 (graph.py).
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None

    @property
    def patch(self) -> int:
        return self.backbone.patch_size

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 [H, W, 3] at any size -> uint8 [h_in, w_in, 3] for `infer`."""
        return prepare_image(rgb, self.config.data.image_size, self.patch)

    @torch.inference_mode()
    def infer(self, batch: np.ndarray) -> list[RawPrediction]:
        """Equal-sized prepared images [B, h_in, w_in, 3] -> foreground maps and ncut."""
        x = to_model_input(batch, self.backbone.mean, self.backbone.std, self.device)
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        graph = self.config.graph
        enabled = self.autocast_dtype is not None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled):
            feats = self.backbone(x)
            if self.method == "sempart":
                out = self.heads(feats, x)
                coarse, fine, flipped = foreground_rule(out.coarse, out.fine)
                hard = (coarse > 0.5).float().flatten(1)
                ncut = partition_ncut(feats, hard, graph.tau, graph.eps, clamp_eps=1e-6)
            else:
                coarse, ncut = tokencut_partition(feats, grid, graph.tau, graph.eps, border_rule=False)
                fine = upsample_patch_mask(coarse, tuple(x.shape[-2:]))
                flipped = torch.zeros(len(coarse), dtype=torch.bool)
        fine = fine.float().cpu().numpy()
        coarse = coarse.float().cpu().numpy()
        ncut = ncut.float().cpu().numpy()
        return [
            RawPrediction(prob=p, ncut=float(n), coarse=c, border_flipped=bool(f))
            for p, n, c, f in zip(fine, ncut, coarse, flipped.tolist())
        ]

    def finish(self, raw: RawPrediction, height: int, width: int, rgb: np.ndarray | None = None) -> Prediction:
        """Resize the map to the original image size and post-process it.

        TokenCut's patch mask goes straight to the original size, nearest, as TokenCut
        upsamples it. ``tokencut-bs`` needs the original image ``rgb`` [height, width,
        3]: the bilateral solver snaps that mask to its colour edges.
        """
        if self.method != "sempart":
            prob = upsample_patch_mask(torch.from_numpy(raw.coarse)[None], (height, width))[0].numpy()
            raw = replace(raw, prob=prob)
        if self.method == "tokencut-bs":
            if rgb is None or rgb.shape[:2] != (height, width):
                raise ValueError("method 'tokencut-bs' refines each mask on its image: pass rgb at (height, width)")
            raw = replace(raw, prob=refine_mask(rgb, raw.prob > self.config.post.threshold, self.bilateral))
        return finish_raw(raw, height, width, self.config.post)

    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """Predictions for RGB uint8 images of any sizes, each at its own size.

        Images are grouped by input size into batches of at most `batch_size` images and
        `max_batch_tokens` tokens; a batch out of memory is split (`infer_splitting`), and
        an image out of memory alone raises `ImageOutOfMemory`.
        """
        prepared = [self.prepare(im) for im in images]
        results: list[Prediction | None] = [None] * len(images)
        shapes = [p.shape[:2] for p in prepared]
        for idx in plan_batches(shapes, self.patch, self.batch_size, self.max_batch_tokens):
            batch, sizes = np.stack([prepared[i] for i in idx]), [images[i].shape[1::-1] for i in idx]
            for i, raw in zip(idx, infer_splitting(self.infer, batch, self.patch, sizes)):
                if isinstance(raw, ImageOutOfMemory):
                    raise raw
                results[i] = self.finish(raw, *images[i].shape[:2], rgb=images[i])
        return results  # type: ignore[return-value]


def predictor_from_artifact(
    art: LoadedArtifact, device: str | torch.device = "cpu", method: str = "sempart", batch_size: int = 8
) -> Predictor:
    """Rebuild backbone and heads from a read artifact."""
    cfg = art.config
    if art.backbone_state is not None:
        vit = create_vit(cfg.backbone.name, image_size=cfg.data.image_size)
        vit.load_state_dict(art.backbone_state)
        backbone = Backbone(vit, cfg.backbone.feature)
    else:
        backbone = build_backbone(cfg.backbone, cfg.data.image_size)
    heads = SempartHeads(backbone.feature_dim, backbone.patch_size, cfg.model)
    heads.load_state_dict(art.heads_state)
    if art.meta.get("random_backbone"):
        logger.warning("model %s uses a RANDOM backbone (tests/demo only)", art.model_id[:12])
    return Predictor(backbone, heads, cfg, device, method, art.model_id, art.meta, batch_size)


def load_predictor(
    location: str, device: str | torch.device = "cpu", method: str = "sempart", batch_size: int = 8
) -> Predictor:
    """Load a model artifact (local folder, file:// or s3:// URI) for inference."""
    return predictor_from_artifact(read_artifact(location), device, method, batch_size)
