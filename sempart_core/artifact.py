"""The model artifact: a folder (local or object store) with `model.safetensors` and
`sempart.json` (DESIGN.md, "Model artifact"). No pickle anywhere."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from . import uri
from .config import SempartConfig

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


@dataclass
class LoadedArtifact:
    config: SempartConfig
    meta: dict[str, Any]
    heads_state: dict[str, torch.Tensor]
    backbone_state: dict[str, torch.Tensor] | None
    model_id: str


def read_artifact(location: str) -> LoadedArtifact:
    """Read and check an artifact folder; errors are one line naming the folder."""
    meta_uri = uri.join(location, META_FILE)
    if not uri.exists(meta_uri):
        raise ArtifactError(f"no {META_FILE} in {uri.redact(location)}: not a sempart model folder")
    meta = json.loads(uri.read_bytes(meta_uri))
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{uri.redact(meta_uri)} is not a {FORMAT} file")
    blob = uri.read_bytes(uri.join(location, WEIGHTS_FILE))
    model_id = hashlib.sha256(blob).hexdigest()
    tensors = load_safetensors(blob)
    heads = {k[len("heads.") :]: v for k, v in tensors.items() if k.startswith("heads.")}
    backbone = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    return LoadedArtifact(
        config=SempartConfig.from_dict(meta["config"]),
        meta=meta,
        heads_state=heads,
        backbone_state=backbone or None,
        model_id=model_id,
    )
