"""Images in, masks and boxes out: `load_predictor(uri).predict(list of RGB arrays)`.

Prediction is split in three steps so that the labelling pipeline can run each where
it belongs: `prepare` (CPU: resize to the backbone's input), `infer` (GPU: backbone,
heads, foreground rule, ncut, on a batch of equal-sized inputs) and `finish` (CPU:
resize to the original size, threshold, boxes, score). `predict` chains them.

Methods on the same backbone: ``sempart`` (trained heads), ``tokencut`` (TokenCut as
published: its own seed rule picks the foreground, no border rule) and ``tokencut-bs``
(TokenCut's mask refined with the bilateral solver on the original image in `finish`,
the post-inference refinement SEMPART's fine branch replaces).

With ``instances`` (an `InstanceConfig`), `infer` also runs MaskCut on the same
features, batched (`instances.maskcut_batch`; in mode ``sempart`` the method's own mask
is the first instance), and `finish` turns them into full-resolution
`Prediction.instances`.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch

from .artifact import LoadedArtifact, read_artifact
from .backbone import Backbone, build_backbone, create_vit
from .batching import DEFAULT_MAX_BATCH_TOKENS, ImageOutOfMemory, infer_in_batches
from .config import InstanceConfig, SempartConfig
from .bilateral import BilateralConfig, refine_mask
from .foreground import foreground_rule
from .graph import partition_ncut
from .images import prepare_image
from .instances import maskcut_batch
from .model import SempartHeads
from .postprocess import Prediction, RawInstances, RawPrediction, finish_raw
from .prefetch import DeviceCopier
from .tokencut import tokencut_partition, upsample_patch_mask
from .training import to_model_input

logger = logging.getLogger(__name__)

METHODS = ("sempart", "tokencut", "tokencut-bs")


class DeviceMaps(NamedTuple):
    """A batch's model outputs on the device: fine foreground maps [B, h_in, w_in] and
    coarse ones [B, h, w] (float32, after the foreground rule), ncut [B] (float32), and
    whether the border rule flipped each image [B] (bool); with an `InstanceConfig`, each
    image's patch-level instances (on the host: they are small)."""

    fine: torch.Tensor
    coarse: torch.Tensor
    ncut: torch.Tensor
    flipped: torch.Tensor
    instances: list[RawInstances | None]


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
        instances: InstanceConfig | None = None,
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
        self.instances = instances  # None: no instances, Prediction.instances stays empty
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
    def infer_maps(self, batch: np.ndarray | torch.Tensor) -> DeviceMaps:
        """Equal-sized prepared images [B, h_in, w_in, 3] -> `infer`'s results as tensors
        on the device (to finish there: `device_finish.finish_on_device`), and the
        patch-level instances when the predictor has an `InstanceConfig`."""
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
        instances: list[RawInstances | None] = [None] * len(batch)
        if self.instances is not None:
            first = (coarse > 0.5).flatten(1) if self.instances.mode == "sempart" else None
            instances = maskcut_batch(feats, grid, self.instances, first)
        return DeviceMaps(fine.float(), coarse.float(), ncut.float(), flipped, instances)

    def infer(self, batch: np.ndarray | torch.Tensor) -> list[RawPrediction]:
        """Equal-sized prepared images [B, h_in, w_in, 3] -> foreground maps and ncut
        (and patch-level instances when the predictor has an `InstanceConfig`)."""
        maps = self.infer_maps(batch)
        return [
            RawPrediction(prob=p, ncut=float(n), coarse=c, border_flipped=bool(f), instances=i)
            for p, n, c, f, i in zip(maps.fine.cpu().numpy(), maps.ncut.cpu().numpy(), maps.coarse.cpu().numpy(),
                                     maps.flipped.tolist(), maps.instances)
        ]

    def finish(
        self, raw: RawPrediction, height: int, width: int, rgb: np.ndarray | None = None,
        prepared: np.ndarray | None = None,
    ) -> Prediction:
        """Resize the map to the original image size and post-process it (instances too).

        TokenCut's patch mask goes straight to the original size, nearest, as TokenCut
        upsamples it. ``tokencut-bs`` needs the original image ``rgb`` [height, width,
        3]: the bilateral solver snaps that mask to its colour edges. Instances refined
        with the bilateral solver need the image too: the model's input ``prepared``
        (its size bounds the solver's cost; the labelling pipeline refines on it as
        well), else ``rgb``.
        """
        if self.method != "sempart":
            prob = upsample_patch_mask(torch.from_numpy(raw.coarse)[None], (height, width))[0].numpy()
            raw = replace(raw, prob=prob)
        if self.method == "tokencut-bs":
            if rgb is None or rgb.shape[:2] != (height, width):
                raise ValueError("method 'tokencut-bs' refines each mask on its image: pass rgb at (height, width)")
            raw = replace(raw, prob=refine_mask(rgb, raw.prob > self.config.post.threshold, self.bilateral))
        image = prepared if prepared is not None else rgb
        return finish_raw(raw, height, width, self.config.post, self.instances, image, self.bilateral)

    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """Predictions for RGB uint8 images of any sizes, each at its own size.

        Batched by `infer_in_batches` (images of one input size, at most `batch_size`
        and `max_batch_tokens`, halved when memory runs out; host-to-device copies
        overlap compute); an image out of memory alone raises `ImageOutOfMemory`.
        """
        prepared = [self.prepare(im) for im in images]
        raws = infer_in_batches(self.infer, prepared, self.patch, self.batch_size, self.max_batch_tokens,
                                sizes=[im.shape[1::-1] for im in images], copier=DeviceCopier(self.device))
        results = []
        for image, ready, raw in zip(images, prepared, raws):
            if isinstance(raw, ImageOutOfMemory):
                raise raw
            results.append(self.finish(raw, *image.shape[:2], rgb=image, prepared=ready))
        return results


def predictor_from_artifact(
    art: LoadedArtifact,
    device: str | torch.device = "cpu",
    method: str = "sempart",
    batch_size: int = 8,
    instances: InstanceConfig | None = None,
) -> Predictor:
    """Rebuild backbone and heads from a read artifact (``instances``: see `Predictor`)."""
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
    return Predictor(backbone, heads, cfg, device, method, art.model_id, art.meta, batch_size,
                     instances=instances)


def load_predictor(
    location: str,
    device: str | torch.device = "cpu",
    method: str = "sempart",
    batch_size: int = 8,
    instances: InstanceConfig | None = None,
) -> Predictor:
    """Load a model artifact (local folder, file:// or s3:// URI) for inference;
    ``instances`` (an `InstanceConfig`) adds MaskCut's instances to every prediction."""
    return predictor_from_artifact(read_artifact(location), device, method, batch_size, instances)
