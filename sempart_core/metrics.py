"""Evaluation metrics: salient-object masks (Acc, IoU, MAE, two max-F conventions) and
single-object localisation (CorLoc). Pure numpy (PIL only for resizing).

Conventions (docs/method.md, "Evaluation conventions"), chosen so that numbers compare with the papers:
- Everything is computed at the ground truth's resolution; resize predictions first
  with `postprocess.resize_prob`.
- Acc, IoU and MAE are computed per image and then averaged over images (as TokenCut
  and SelfMask average IoU per image), not pooled over all pixels.
- Binary masks for Acc/IoU: prediction > 0.5; ground truth > 127 (uint8) or True.
- Max-F thresholds are the 255 values k/255, k = 0..254, a pixel being positive when
  prob > k/255 (SelfMask's thresholds). For 8-bit predictions (v/255) this is v >= k+1,
  exactly pysodmetrics' thresholds 1..255 (its 256th, v >= 0, marks every pixel positive).
- Predictions are used as given: unlike pysodmetrics we do not min-max normalise each
  map, because our predictions are probabilities with a meaning (TokenCut, SelfMask).
- An undefined precision or recall (no predicted / no true positive pixel) counts as 0,
  as in pysodmetrics; an image where both masks are empty has IoU 1.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

N_THRESHOLDS = 255
# float32, computed the way 8-bit predictions are decoded (v / 255 in float32), so that
# prob > THRESHOLDS[k] is exactly v > k for them.
THRESHOLDS = np.arange(N_THRESHOLDS, dtype=np.float32) / np.float32(255)
BETA2_DATASET = 0.3
# SelfMask and FOUND pass beta^2 = 0.3 and square it again in their F formula.
BETA2_IMAGE = 0.3**2


def binarize_gt(gt: np.ndarray) -> np.ndarray:
    """GT as bool: True pixels of a bool mask, or values > 127 of a uint8 mask."""
    gt = np.asarray(gt)
    if gt.dtype == np.bool_:
        return gt
    if gt.dtype == np.uint8:
        return gt > 127
    raise ValueError(f"ground truth must be bool or uint8, got {gt.dtype}")


def f_measure(precision: np.ndarray, recall: np.ndarray, beta2: float) -> np.ndarray:
    """F-beta from precision and recall (arrays), 0 where precision * recall is 0."""
    num = (1.0 + beta2) * precision * recall
    den = beta2 * precision + recall
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=num > 0)


def threshold_counts(prob: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and predicted positives at each threshold k/255 (k = 0..254), via histograms.

    One pass over the pixels (bin index = number of thresholds below the pixel's
    probability), so the cost does not grow with the number of thresholds.
    """
    bins = np.searchsorted(THRESHOLDS, prob.astype(np.float32, copy=False), side="left")
    fg_hist = np.bincount(bins[gt], minlength=N_THRESHOLDS + 1)
    all_hist = np.bincount(bins.ravel(), minlength=N_THRESHOLDS + 1)
    # A pixel in bin b is above thresholds 0..b-1: positives at k = pixels in bins > k.
    tp = np.cumsum(fg_hist[::-1])[::-1][1:]
    pp = np.cumsum(all_hist[::-1])[::-1][1:]
    return tp, pp


def precision_recall(tp: np.ndarray, pp: np.ndarray, n_gt: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall per threshold; 0 where undefined (pysodmetrics' rule)."""
    tp = tp.astype(np.float64)
    precision = np.divide(tp, pp, out=np.zeros_like(tp), where=pp > 0)
    recall = tp / n_gt if n_gt > 0 else np.zeros_like(tp)
    return precision, recall


class SODMetrics:
    """Streaming accumulator of salient-object-detection metrics over a dataset.

    Acc, IoU, MAE and maxF_image are per-image values averaged over images; maxF_dataset
    is the max over thresholds of the per-image F averaged over images (module docstring).

    State is a few sums and five curves of 255 floats, whatever the number or size of
    the images, so a million-image evaluation streams in constant memory.
    """

    def __init__(self) -> None:
        self.n_images = 0
        self._acc_sum = 0.0
        self._iou_sum = 0.0
        self._mae_sum = 0.0
        self._maxf_image_sum = 0.0
        self._precision_sum = np.zeros(N_THRESHOLDS)
        self._recall_sum = np.zeros(N_THRESHOLDS)
        self._f_sum = np.zeros(N_THRESHOLDS)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: `pred` float HxW in [0, 1] at the GT's size, `gt` bool or uint8."""
        pred = np.asarray(pred)
        gt = binarize_gt(gt)
        if pred.ndim != 2 or pred.shape != gt.shape:
            raise ValueError(
                f"prediction shape {pred.shape} != ground-truth shape {gt.shape}; "
                "resize the prediction with postprocess.resize_prob first"
            )
        if not np.issubdtype(pred.dtype, np.floating):
            raise ValueError(f"prediction must be float probabilities, got {pred.dtype}")
        if pred.size == 0 or not (np.isfinite(pred).all() and pred.min() >= 0 and pred.max() <= 1):
            raise ValueError("prediction must be a non-empty map of finite values in [0, 1]")

        binary = pred > 0.5
        inter = np.count_nonzero(binary & gt)
        union = np.count_nonzero(binary | gt)
        self._acc_sum += float(np.mean(binary == gt))
        self._iou_sum += float(inter / union) if union else 1.0
        self._mae_sum += float(np.mean(np.abs(pred.astype(np.float64) - gt)))

        tp, pp = threshold_counts(pred, gt)
        precision, recall = precision_recall(tp, pp, int(np.count_nonzero(gt)))
        self._precision_sum += precision
        self._recall_sum += recall
        self._f_sum += f_measure(precision, recall, BETA2_DATASET)
        self._maxf_image_sum += float(f_measure(precision, recall, BETA2_IMAGE).max())
        self.n_images += 1

    def result(self) -> dict:
        """Averages over the images seen, plus the dataset PR curve for plotting."""
        if self.n_images == 0:
            raise ValueError("no image was added to the metrics")
        n = self.n_images
        f_curve = self._f_sum / n
        best = int(np.argmax(f_curve))
        return {
            "n_images": n,
            "Acc": self._acc_sum / n,
            "IoU": self._iou_sum / n,
            "MAE": self._mae_sum / n,
            "maxF_dataset": float(f_curve[best]),
            "maxF_dataset_beta2": BETA2_DATASET,
            "maxF_dataset_threshold": best / 255,
            "maxF_image": self._maxf_image_sum / n,
            "maxF_image_beta2": BETA2_IMAGE,
            "thresholds": (np.arange(N_THRESHOLDS) / 255).tolist(),
            "precision": (self._precision_sum / n).tolist(),
            "recall": (self._recall_sum / n).tolist(),
            "f_measure": f_curve.tolist(),
        }


def box_iou(a: Sequence | np.ndarray, b: Sequence | np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M); a single box may be 1-D.

    Continuous coordinates (area = (x2 - x1) * (y2 - y1)), as LOST/TokenCut's CorLoc.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def corloc(
    pred_boxes: Sequence[Sequence[float] | None],
    gt_boxes: Sequence[Sequence[Sequence[float]]],
    iou_threshold: float = 0.5,
) -> float:
    """Share of images whose one predicted box has IoU >= 0.5 with any GT box.

    A missing prediction (None, e.g. an image with no foreground) counts as a miss, so
    the score is over all images, as in the published CorLoc figures.
    """
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"{len(pred_boxes)} predicted boxes for {len(gt_boxes)} images")
    if not gt_boxes:
        raise ValueError("corloc needs at least one image")
    hits = sum(
        1
        for pred, gts in zip(pred_boxes, gt_boxes)
        if pred is not None and len(gts) > 0 and box_iou(pred, gts).max() >= iou_threshold
    )
    return hits / len(gt_boxes)
