"""Frozen ViT backbone: per-patch features of a timm ViT, and loading its weights.

SEMPART builds its graphs from the *keys* of the last attention block (docs/method.md).
They are captured by a forward hook on `blocks[-1].attn.qkv`, which then stops the
forward pass: the last block's attention, its MLP and the final norm are never computed.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import logging
import pickle
from collections.abc import Iterable, Mapping
from typing import Any

import safetensors.torch
from safetensors import SafetensorError
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from sempart_core.config import BackboneConfig
from sempart_core.uri import read_bytes, redact

log = logging.getLogger(__name__)

FEATURES = ("keys", "tokens")
RANDOM_SEED = 0  # "random" weights are reproducible so every process builds the same net
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# Nested checkpoint layouts, searched in this order: DINO's full training checkpoint
# keeps the released (teacher) weights next to the student; trainers wrap in model/state_dict.
CONTAINER_KEYS = ("teacher", "student", "model", "state_dict")
# DDP wraps keys in "module."; DINO's MultiCropWrapper keeps the ViT under "backbone."
# next to its projection "head.", which filtering on the prefix drops.
WRAPPER_PREFIXES = ("module.", "backbone.")


class WeightLoadError(ValueError):
    """Backbone weights that cannot be obtained or do not fit; the message is one line."""


class _StopForward(Exception):
    """Raised by the key hook once the keys are captured: the rest is not needed."""


def create_vit(name: str, *, pretrained: bool = False, image_size: int | None = None,
               **kwargs: Any) -> nn.Module:
    """A timm ViT without classifier that accepts any input size divisible by its patch.

    `image_size` sets the grid of the position embeddings (pretrained ones are resampled
    once, at load); other inputs are resampled on the fly. `kwargs` go to timm (tests
    use them to build tiny models).
    """
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; pass a timm ViT name such as "
                         "vit_small_patch8_224.dino")
    if image_size is not None:
        kwargs["img_size"] = image_size
    return timm.create_model(name, pretrained=pretrained, num_classes=0,
                             dynamic_img_size=True, **kwargs)


def patch_size_of(name: str) -> int:
    """A timm ViT's patch size without building its weights (meta device)."""
    with torch.device("meta"):
        vit = create_vit(name)
    return int(vit.patch_embed.patch_size[0])


class Backbone(nn.Module):
    """Frozen ViT mapping normalised images [B, 3, H, W] to patch features [B, N, C].

    It never trains: parameters do not require grad and `train()` keeps eval mode (no
    dropout or drop-path), so a parent module can switch modes freely.
    """

    def __init__(self, vit: nn.Module, feature: str = "keys") -> None:
        super().__init__()
        if feature not in FEATURES:
            raise ValueError(f"backbone feature must be one of {FEATURES}, got {feature!r}")
        if not (hasattr(vit, "patch_embed") and hasattr(vit, "blocks")):
            raise ValueError(f"{type(vit).__name__} is not a timm ViT (no patch_embed/blocks)")
        if feature == "keys" and not isinstance(getattr(vit.blocks[-1].attn, "qkv", None),
                                                nn.Linear):
            raise ValueError(f"{type(vit).__name__} has no fused qkv projection to take "
                             "keys from; use feature 'tokens'")
        ph, pw = vit.patch_embed.patch_size
        if ph != pw:
            raise ValueError(f"non-square patches {ph}x{pw} are not supported")
        self.vit = vit
        self.feature = feature
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        self.mean: tuple[float, ...] = tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN))
        self.std: tuple[float, ...] = tuple(cfg.get("std", IMAGENET_DEFAULT_STD))
        # Provenance, recorded in the artifact; build_backbone fills these in.
        self.random_weights = False
        self.weights_source = ""
        self.weights_sha256: str | None = None
        vit.requires_grad_(False)
        self.train(False)

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    @property
    def feature_dim(self) -> int:
        if self.feature == "keys":
            return self.vit.blocks[-1].attn.qkv.out_features // 3
        return int(self.vit.embed_dim)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.vit, "num_prefix_tokens", 0))

    def train(self, mode: bool = True) -> "Backbone":
        """Ignore `mode`: the frozen backbone always runs as at inference."""
        return super().train(False)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) of an input of this size; the size must divide by the patch."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input size {height}x{width} is not a multiple of the patch "
                             f"size {p}; pad or crop it first")
        return height // p, width // p

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Features [B, h*w, C] in row-major patch order (see `grid`)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        self.grid(images.shape[2], images.shape[3])
        if self.feature == "keys":
            tokens = self._last_keys(images)
        else:
            tokens = self.vit.forward_features(images)
        return tokens[:, self.num_prefix_tokens:].contiguous()

    def _last_keys(self, images: Tensor) -> Tensor:
        """Keys of the last block, all heads side by side: the middle third of its qkv."""
        captured: list[Tensor] = []

        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            captured.append(output)
            raise _StopForward

        handle = self.vit.blocks[-1].attn.qkv.register_forward_hook(hook)
        try:
            self.vit.forward_features(images)
        except _StopForward:
            pass
        finally:
            handle.remove()
        qkv = captured[0]
        dim = qkv.shape[-1] // 3
        return qkv[..., dim:2 * dim]


def build_backbone(config: BackboneConfig, image_size: int | None = None) -> Backbone:
    """The configured backbone with its weights: "hub", "random" or a path / URI."""
    sha256: str | None = None
    if config.weights == "hub":
        vit = _create_from_hub(config.name, image_size)
        source = f"timm:{config.name}"
    elif config.weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            vit = create_vit(config.name, image_size=image_size)
        source = "random"
        log.warning("backbone %s has RANDOM weights (tests only): masks will be poor",
                    config.name)
    else:
        vit = create_vit(config.name, image_size=image_size)
        sha256 = load_backbone_weights(vit, config.weights)
        source = redact(config.weights)
    backbone = Backbone(vit, config.feature)
    backbone.random_weights = config.weights == "random"
    backbone.weights_source = source
    backbone.weights_sha256 = sha256
    return backbone


def _create_from_hub(name: str, image_size: int | None) -> nn.Module:
    try:
        return create_vit(name, pretrained=True, image_size=image_size)
    except (OSError, RuntimeError) as exc:
        raise WeightLoadError(
            f"could not get pretrained weights for {name!r} from the model hub "
            f"({type(exc).__name__}: {_first_line(exc)}); without network pass "
            "--weights PATH or URI of a .pth or .safetensors file") from exc


def load_backbone_weights(vit: nn.Module, uri: str) -> str:
    """Load a ViT state dict from `uri` into `vit`; return the sha256 of the file's bytes.

    Accepts `.safetensors`, timm state dicts and DINO's `.pth` files (released weights or
    full training checkpoints); anything but an exact fit raises WeightLoadError.
    """
    try:
        data = read_bytes(uri)
    except OSError as exc:
        raise WeightLoadError(f"cannot read backbone weights {redact(uri)}: "
                              f"{_first_line(exc)}") from exc
    state = _clean_state_dict(_unwrap(_deserialise(data, uri), uri), vit, uri)
    _check_fit(state, vit, uri)
    vit.load_state_dict(state, strict=True)
    sha256 = hashlib.sha256(data).hexdigest()
    log.info("loaded backbone weights %s (sha256 %s)", redact(uri), sha256[:12])
    return sha256


def _deserialise(data: bytes, uri: str) -> Any:
    """Decode without running pickled code: safetensors, or torch.load(weights_only)."""
    suffix = "." + uri.split("?")[0].rsplit(".", 1)[-1].lower()
    try:
        if suffix == ".safetensors":
            return safetensors.torch.load(data)
        if suffix in TORCH_SUFFIXES:
            # DINO's training checkpoints store their argparse options next to the weights.
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, ValueError,
            EOFError) as exc:
        raise WeightLoadError(f"cannot decode backbone weights {redact(uri)}: "
                              f"{type(exc).__name__}: {_first_line(exc)}") from exc
    raise WeightLoadError(f"backbone weights {redact(uri)} must end in .safetensors, "
                          f"{', '.join(TORCH_SUFFIXES)}")


def _unwrap(checkpoint: Any, uri: str) -> dict[str, Tensor]:
    """The tensors of the innermost state dict of a (possibly nested) checkpoint."""
    while isinstance(checkpoint, Mapping):
        inner = next((checkpoint[k] for k in CONTAINER_KEYS
                      if isinstance(checkpoint.get(k), Mapping)), None)
        if inner is None:
            break
        checkpoint = inner
    if not isinstance(checkpoint, Mapping):
        raise WeightLoadError(f"backbone weights {redact(uri)} hold a "
                              f"{type(checkpoint).__name__}, not a state dict")
    return {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}


def _clean_state_dict(state: dict[str, Tensor], vit: nn.Module,
                      uri: str) -> dict[str, Tensor]:
    """Strip wrapper prefixes, remap foreign layouts with timm, drop classifier heads."""
    for prefix in WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    _check_patch_size(state, vit, uri)
    if isinstance(vit, VisionTransformer):
        # Original DINO keys equal timm's; this resamples pos_embed to the model's grid
        # and converts DINOv2, CLIP and other layouts.
        try:
            state = checkpoint_filter_fn(state, vit)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise WeightLoadError(f"cannot convert backbone weights {redact(uri)}: "
                                  f"{type(exc).__name__}: {_first_line(exc)}") from exc
    expected = vit.state_dict()
    return {k: v for k, v in state.items() if k in expected or not k.startswith("head.")}


def _check_patch_size(state: dict[str, Tensor], vit: nn.Module, uri: str) -> None:
    """Refuse weights of another patch size, which timm would silently resample."""
    weight = state.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        return
    have = tuple(weight.shape[-2:])
    want = tuple(vit.patch_embed.patch_size)
    if have != want:
        raise WeightLoadError(f"backbone weights {redact(uri)} have {have[0]}x{have[1]} "
                              f"patches but the model uses {want[0]}x{want[1]}; pick the "
                              "matching --backbone name")


def _check_fit(state: dict[str, Tensor], vit: nn.Module, uri: str) -> None:
    expected = vit.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected)
                         if state[k].shape != expected[k].shape)
    problems = [_preview("missing", missing), _preview("unexpected", unexpected),
                _preview("wrong-shape", wrong_shape)]
    problems = [p for p in problems if p]
    if problems:
        name = (getattr(vit, "pretrained_cfg", None) or {}).get("architecture",
                                                                type(vit).__name__)
        raise WeightLoadError(f"backbone weights {redact(uri)} do not fit {name}: "
                              + "; ".join(problems))


def _preview(kind: str, keys: Iterable[str], limit: int = 5) -> str:
    keys = list(keys)
    if not keys:
        return ""
    shown = ", ".join(keys[:limit])
    more = f", ... +{len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {kind} key(s) ({shown}{more})"


def _first_line(exc: BaseException, limit: int = 200) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else ""
