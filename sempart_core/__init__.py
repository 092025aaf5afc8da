"""SEMPART: self-supervised object masks from frozen ViT features (pure PyTorch + timm).

The names below are imported on first use (PEP 562), so that importing a light module
(`sempart_core.config`, `sempart_core.images`) does not pull in torch and timm: the
CPU workers of the labelling pipeline import only what their stage needs.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SempartConfig": "config",
    "InstanceConfig": "config",
    "load_config": "config",
    "Prediction": "postprocess",
    "Instance": "postprocess",
    "Predictor": "predictor",
    "load_predictor": "predictor",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
