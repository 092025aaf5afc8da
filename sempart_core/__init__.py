"""SEMPART: self-supervised object masks from frozen ViT features (pure PyTorch + timm)."""
from .config import SempartConfig, load_config
from .postprocess import Prediction
from .predictor import Predictor, load_predictor

__all__ = ["SempartConfig", "load_config", "Prediction", "Predictor", "load_predictor"]
