"""Learning works (issue 3, acceptance 9): the plain-PyTorch loop with a tiny random ViT
on CPU learns to segment synthetic scenes it has never seen.

Why tau = 0.8 here: a random ViT's patch features are far more alike than DINO's
(cosine similarity mostly above 0.5 between any two patches), so at DINO's tau = 0.2
nearly every pair is linked and even the true object partition has an ncut near 0.8,
barely better than the trivial split. At tau = 0.8 the true partition's ncut is about
0.04 and the normalised cut points at the object. With pretrained DINO features the
default tau = 0.2 applies (docs/method.md, "Semantic graph").

Why image-TV weight 30, 16 fine channels and lr 1e-3: at the default weight 1 the
image-graph TV term is ~3e-4 against an ncut of ~0.1, so nothing ties the fine map to
the image's edges, and at lr 2e-3 training sometimes fell back from the object cut onto
a plateau (ncut ~0.25). Then the result depended on rounding: with 32 channels, TV
weight 1 and lr 2e-3 this test gave 0.718 on one machine and 0.674 on another, and with
lr 2e-3 seed 0 gave 0.875 with one torch thread and 0.645 with two. With this config
(seed = model init, batch order and torch seed; fine-mask IoU on 32 unseen scenes):

    seed                                                  0      1      2
    two-sided border prior, 1 thread (AMD EPYC, 12-04)  0.814  0.788  0.740
    one-sided prior, 1 thread (AMD EPYC, 11-28)         0.819  0.829  0.877
    one-sided prior, 2 threads (AMD EPYC, 11-28)        0.810  0.827  0.851

The test runs seed 0: 0.064 above the 0.75 bound, more than the largest change between
thread counts seen here (0.026). The border prior became two-sided for `sempart train`'s
sake (docs/method.md, Defaults), at some cost on seeds 1 and 2 of this configuration.

One torch thread: `make test` runs two test processes on two cores, and a second thread
waits on whichever core the other process holds (with two threads beside one busy core
this test took 586 s instead of 79).
"""
import numpy as np
import pytest
import torch

from sempart_core.config import SempartConfig
from sempart_core.model import build_model
from sempart_core.predictor import Predictor
from sempart_core.synthetic import synthetic_dataset
from sempart_core.training import fit, random_batches

LEARNING_CONFIG = {
    "backbone": {"name": "vit_tiny_patch16_224", "weights": "random"},
    "graph": {"tau": 0.8},
    "model": {"fine_channels": 16},
    "loss": {"border": 0.1, "itv": 30.0 / 128},  # 30 before image TV was divided by the side (128 px)
    "data": {"image_size": 128, "crop_scale": 1.0, "color_jitter": 0.1, "grayscale_p": 0.0},
    "train": {"lr": 1e-3, "batch_size": 8, "steps": 400, "warmup_steps": 20},
}


def mean_iou(preds, masks) -> float:
    return float(np.mean([(p.mask & m).sum() / max((p.mask | m).sum(), 1) for p, m in zip(preds, masks)]))


@pytest.mark.slow
def test_training_reaches_iou_on_unseen_synthetic_scenes():
    torch.set_num_threads(1)
    cfg = SempartConfig.from_dict(LEARNING_CONFIG)
    backbone, heads = build_model(cfg, seed=0)
    train_images, _ = synthetic_dataset(64, seed=1)
    test_images, test_masks = synthetic_dataset(32, seed=2)
    untrained = mean_iou(Predictor(backbone, heads, cfg).predict(test_images), test_masks)
    history = fit(backbone, heads, random_batches(train_images, cfg, backbone.patch_size), cfg)
    assert history[-1]["ncut"] < history[0]["ncut"]
    trained = mean_iou(Predictor(backbone, heads, cfg).predict(test_images), test_masks)
    assert trained >= 0.75, f"fine-mask IoU {trained:.3f} (untrained {untrained:.3f})"
