"""Configuration dataclasses for SEMPART (docs/method.md says what each value means).

Every *tunable* value of the method lives here so that an artifact's `sempart.json`
records exactly how its model was built and trained.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class BackboneConfig:
    """Frozen ViT: a timm model name and where its weights come from."""

    name: str = "vit_small_patch8_224.dino"
    # "hub" (timm pretrained download), "random" (tests only), or a path / URI to a
    # DINO .pth, a timm state dict or a .safetensors file.
    weights: str = "hub"
    # "keys": keys of the last block's attention (SEMPART); "tokens": forward_features.
    feature: str = "keys"


@dataclass
class GraphConfig:
    """Semantic graph W_ij = 1 if cos(F_i, F_j) > tau else eps."""

    tau: float = 0.2
    eps: float = 1e-5


@dataclass
class ModelConfig:
    """Sizes of the trainable heads."""

    dim: int = 64  # coarse token width (1x1 projection of the backbone features)
    depth: int = 2  # coarse transformer layers
    heads: int = 2
    mlp_ratio: float = 2.0
    fine_channels: int = 32  # channels of each guided x2 upsampling stage
    fine_uses_coarse: bool = True  # concatenate the upsampled coarse probability


@dataclass
class LossConfig:
    """Weights of the four loss terms and their shape parameters."""

    ncut: float = 1.0
    ftv: float = 1.0
    itv: float = 1.0
    dist: float = 1.0
    border: float = 0.1  # weak prior that the border lies on one side of the cut (docs/method.md, Defaults)
    itv_q: int = 2  # 1: total variation proper; 2: squared differences
    itv_sigma: float = 0.5  # colour scale of the image-graph weights (normalised colours)
    clamp_eps: float = 1e-4  # y is clamped to [eps, 1 - eps] inside the cut


@dataclass
class DataConfig:
    """Input size and training augmentation."""

    image_size: int = 320  # shorter side fed to the backbone
    crop_scale: float = 1.05  # training: resize shorter side to image_size*crop_scale, crop
    hflip: bool = True
    color_jitter: float = 0.2
    grayscale_p: float = 0.05


@dataclass
class PostConfig:
    """Turning a probability map into a mask, boxes and a score."""

    threshold: float = 0.5
    min_area_frac: float = 0.001  # components below this share of the image get no box


@dataclass
class InstanceConfig:
    """Several objects per image: MaskCut (CutLER, Wang et al. 2023), docs/method.md.

    Defaults are MaskCut's published ones. Not part of `SempartConfig`: instances are
    chosen when labelling, not when training, so a model folder does not fix them.
    """

    max_instances: int = 3  # N: cuts per image (with mode "sempart", the model's mask is the first)
    # "maskcut": the published procedure alone; "sempart": the first instance is the model's
    # own foreground mask and the cuts go on over the remaining patches.
    mode: str = "maskcut"
    tau: float = 0.15  # W_ij = 1 where the cosine similarity of the keys exceeds tau, else eps
    eps: float = 1e-5
    corner_flip: int = 3  # take the other side when the seed's side holds >= this many of the
    # 4 corner patches; 0 turns the rule off
    overlap_iou: float = 0.5  # a mask whose IoU with the previous cut's mask exceeds this is dropped
    min_patch_frac: float = 0.01  # ... and so is one covering at most this share of the patches
    # To full resolution: "nearest", "bilinear" or "bilateral" (the bilateral solver on the
    # original image; best by measurement, docs/method.md; needs the image in `finish`).
    refine: str = "bilateral"
    refine_min_iou: float = 0.5  # refined masks this far from their patch mask are dropped
    fill_holes: bool = True
    solver_block: int = 4  # vectors per graph in the eigen-solver (sempart_core/fiedler.py)
    solver_tol: float = 1e-9  # residual of the Fiedler pair
    solver_max_iter: int = 100  # then a dense eigh for the graphs still above tol
    dense_max_nodes: int = 256  # smaller graphs use a dense eigh (as fast there, exact)

    def __post_init__(self) -> None:
        if self.mode not in INSTANCE_MODES:
            raise ValueError(f"unknown instance mode {self.mode!r}: use one of {', '.join(INSTANCE_MODES)}")
        if self.refine not in INSTANCE_REFINERS:
            raise ValueError(f"unknown refinement {self.refine!r}: use one of {', '.join(INSTANCE_REFINERS)}")
        if self.max_instances < 1:
            raise ValueError("max_instances must be >= 1")


INSTANCE_MODES = ("maskcut", "sempart")
INSTANCE_REFINERS = ("nearest", "bilinear", "bilateral")


@dataclass
class TrainConfig:
    """Optimiser and schedule of the training loop."""

    lr: float = 2e-3  # measured, with loss.border 0.1 (docs/method.md, Defaults)
    weight_decay: float = 0.01
    batch_size: int = 8
    steps: int = 40000
    warmup_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 1000  # steps between checkpoints (Ray Train)
    keep_checkpoints: int = 3  # the newest K checkpoints are kept
    max_failures: int = 3  # worker-group restarts from the last checkpoint before giving up
    report_every: int = 50  # steps between metric reports to Ray Train (checkpoints report too)


@dataclass
class SempartConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    post: PostConfig = field(default_factory=PostConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SempartConfig":
        """Build from a (possibly partial) nested dict; unknown keys are an error."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            section = data.get(f.name) or {}
            sub_cls = f.default_factory  # type: ignore[misc]
            known = {g.name for g in dataclasses.fields(sub_cls)}
            unknown = set(section) - known
            if unknown:
                raise ValueError(f"unknown {f.name} option(s): {', '.join(sorted(unknown))}")
            kwargs[f.name] = sub_cls(**section)
        unknown_sections = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown_sections:
            raise ValueError(f"unknown config section(s): {', '.join(sorted(unknown_sections))}")
        return cls(**kwargs)


def load_config(path: str | Path) -> SempartConfig:
    """Read a YAML or JSON config file (sections may be partial)."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return SempartConfig.from_dict(data or {})
