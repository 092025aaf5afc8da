"""The model artifact: a folder (local or object store) with `model.safetensors` and
`sempart.json` (docs/design.md, "Model artifact"). No pickle anywhere.

`read_artifact_info` reads `sempart.json` alone (no torch): what a labelling driver
needs to plan a run; `read_artifact` also loads and checks the weights."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

from . import uri
from .config import SempartConfig

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "sempart.json"
FORMAT = "sempart-model"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact folder that is missing, incomplete or of another format."""


def package_version() -> str:
    try:
        return metadata.version("sempart")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class ArtifactMeta:
    """What `sempart.json` records besides the config."""

    random_backbone: bool
    weights_source: str  # "hub", "random" or the path/URI the backbone came from
    weights_sha256: str | None  # sha256 of the backbone weight file, when one was read
    backbone_in_artifact: bool  # backbone weights stored in model.safetensors
    run_id: str | None = None
    steps: int = 0
    resumed_from: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def meta_for_backbone(backbone: torch.nn.Module, **fields: Any) -> ArtifactMeta:
    """Artifact metadata from a built backbone's provenance (see backbone.build_backbone).

    Hub weights are a named public checkpoint and stay out of the artifact; random and
    file weights go in, so that the artifact alone reproduces the predictions.
    """
    return ArtifactMeta(
        random_backbone=backbone.random_weights,
        weights_source=backbone.weights_source,
        weights_sha256=backbone.weights_sha256,
        backbone_in_artifact=not backbone.weights_source.startswith("timm:"),
        **fields,
    )


def save_artifact(
    out: str,
    config: SempartConfig,
    heads: torch.nn.Module,
    backbone: torch.nn.Module,
    meta: ArtifactMeta,
) -> str:
    """Write the artifact to `out`; returns the model id (sha256 of model.safetensors).

    The backbone's weights go in only when they are not a named public checkpoint
    (random, or read from a file), so that the artifact alone reproduces predictions.
    """
    from safetensors.torch import save as save_safetensors

    tensors = {f"heads.{k}": v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    if meta.backbone_in_artifact:
        tensors.update(
            {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in backbone.vit.state_dict().items()}
        )
    blob = save_safetensors(tensors, metadata={"format": FORMAT})
    model_id = hashlib.sha256(blob).hexdigest()
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model_id": model_id,
        "backbone": config.backbone.name,
        "patch_size": backbone.patch_size,
        "image_size": config.data.image_size,
        "threshold": config.post.threshold,
        "random_backbone": meta.random_backbone,
        "weights_source": uri.redact(meta.weights_source),
        "weights_sha256": meta.weights_sha256,
        "backbone_in_artifact": meta.backbone_in_artifact,
        "run_id": meta.run_id,
        "steps": meta.steps,
        "resumed_from": list(meta.resumed_from),
        **meta.extra,
        "config": config.to_dict(),
    }
    # Weights first, metadata last: a folder with sempart.json is complete.
    uri.write_bytes(uri.join(out, WEIGHTS_FILE), blob)
    uri.write_bytes(uri.join(out, META_FILE), json.dumps(doc, indent=2).encode())
    logger.info("wrote model %s to %s", model_id[:12], uri.redact(out))
    return model_id


def save_untrained_artifact(out: str, config: SempartConfig, seed: int = 0) -> str:
    """An artifact of `config` with untrained heads (init-model, TokenCut eval, tests,
    benchmarks); returns its model id."""
    from .model import build_model

    backbone, heads = build_model(config, seed=seed)
    return save_artifact(out, config, heads, backbone, meta_for_backbone(backbone))


@dataclass
class ArtifactInfo:
    """`sempart.json` of an artifact: its config and recorded model id."""

    config: SempartConfig
    meta: dict[str, Any]
    model_id: str  # sha256 of model.safetensors, as recorded when it was written


def read_artifact_info(location: str) -> ArtifactInfo:
    """Read and check `sempart.json`; errors are one line naming the folder."""
    meta_uri = uri.join(location, META_FILE)
    if not uri.exists(meta_uri):
        raise ArtifactError(f"no {META_FILE} in {uri.redact(location)}: not a sempart model folder")
    meta = json.loads(uri.read_bytes(meta_uri))
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{uri.redact(meta_uri)} is not a {FORMAT} file")
    return ArtifactInfo(config=SempartConfig.from_dict(meta["config"]), meta=meta, model_id=meta["model_id"])


@dataclass
class LoadedArtifact:
    config: SempartConfig
    meta: dict[str, Any]
    heads_state: dict[str, torch.Tensor]
    backbone_state: dict[str, torch.Tensor] | None
    model_id: str


def read_artifact(location: str) -> LoadedArtifact:
    """Read an artifact folder; the weights must be those `sempart.json` records."""
    from safetensors.torch import load as load_safetensors

    info = read_artifact_info(location)
    blob = uri.read_bytes(uri.join(location, WEIGHTS_FILE))
    model_id = hashlib.sha256(blob).hexdigest()
    if model_id != info.model_id:
        raise ArtifactError(
            f"{WEIGHTS_FILE} in {uri.redact(location)} is not the one its {META_FILE} records "
            f"(sha256 {model_id[:12]}, recorded {info.model_id[:12]}): the folder was changed after it was written"
        )
    tensors = load_safetensors(blob)
    heads = {k[len("heads.") :]: v for k, v in tensors.items() if k.startswith("heads.")}
    backbone = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    return LoadedArtifact(
        config=info.config,
        meta=info.meta,
        heads_state=heads,
        backbone_state=backbone or None,
        model_id=model_id,
    )
