"""From a foreground probability map to what a pseudo-label row holds.

Steps (docs/method.md, "From map to label"): resize the model's map to the original image,
threshold it, find connected components and their boxes, score the partition, and
encode the mask as COCO RLE. (The border rule, which picks the foreground side of the
cut, runs on the model's output tensors: `foreground`.) No torch here, and scipy is
imported by the functions that use it, so that the CPU workers of the labelling pipeline
stay light: the writer and the decode tasks import this module (through pipeline.label)
but never call those, and scipy would cost each of them ~0.35 CPU-s at start.
`CompactPrediction` is what a label row needs of a result, without the full-size maps:
`compact` makes it from a `Prediction`, `device_finish` makes the same record where the
model ran.

Box convention (used by every box in this project): ``[x1, y1, x2, y2]`` in pixels of
the original image, with ``x2``/``y2`` exclusive. Pixel ``(row r, col c)`` covers the
unit square ``[c, c + 1) x [r, r + 1)``, so a component spanning columns ``c0..c1`` and
rows ``r0..r1`` has box ``[c0, r0, c1 + 1, r1 + 1]``; ``x2 - x1`` is the number of
columns it spans. The COCO ``bbox`` is then ``[x1, y1, x2 - x1, y2 - y1]``, exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sempart_core.bilateral import BilateralConfig, refine_mask
from sempart_core.config import InstanceConfig, PostConfig

# 8-connectivity: diagonal neighbours belong to the same component.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

NON_FINITE_MAP = "probability map has non-finite values (NaN or inf)"


@dataclass
class Instance:
    """One object of an image at its original size (`Prediction.instances`).

    ``box`` spans the whole mask (the module's exclusive ``xyxy`` convention); ``score``
    in [0, 1] ranks instances by quality; ``ncut`` is the normalised cut that found the
    mask, on the graph of that cut.
    """

    mask: np.ndarray  # H x W bool
    box: list[float]
    area: int
    score: float
    ncut: float

    def rle(self) -> dict[str, Any]:
        """COCO compressed RLE of the mask."""
        return mask_to_rle(self.mask)


@dataclass
class RawInstances:
    """One image's instances on the patch grid, as `Predictor.infer` gives them.

    ``masks`` [K, h, w] bool in the order found, disjoint (earlier ones already
    subtracted) and none empty; ``ncut`` and ``score`` float32 [K]. With
    ``first_is_model`` the first mask is the model's own foreground, which `finish`
    takes from the full-resolution map instead of refining the patch mask.

    Serialised compactly with ``pack()``: a dict of plain values (``shape`` [K, h, w],
    ``bits``: the masks as ``np.packbits`` bytes, 600 bytes for 3 masks of 40 x 40
    patches; ``ncut`` and ``score`` as lists of floats; ``first_is_model``), fit for an
    Arrow row or a Ray object; ``RawInstances.unpack`` restores it exactly.
    """

    masks: np.ndarray
    ncut: np.ndarray
    score: np.ndarray
    first_is_model: bool = False

    def pack(self) -> dict[str, Any]:
        return {
            "shape": [int(v) for v in self.masks.shape],
            "bits": np.packbits(self.masks, axis=None).tobytes(),
            "ncut": [float(v) for v in self.ncut],
            "score": [float(v) for v in self.score],
            "first_is_model": bool(self.first_is_model),
        }

    @classmethod
    def unpack(cls, packed: dict[str, Any]) -> "RawInstances":
        shape = tuple(int(v) for v in packed["shape"])
        bits = np.frombuffer(packed["bits"], dtype=np.uint8)
        masks = np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)
        return cls(masks, np.asarray(packed["ncut"], dtype=np.float32),
                   np.asarray(packed["score"], dtype=np.float32), bool(packed["first_is_model"]))


@dataclass
class Prediction:
    """One image's result, at the image's original size.

    ``box`` is the largest component's box (present whenever there is foreground, even
    if that component is below the minimum area); ``boxes`` holds every component whose
    area reaches the minimum, largest first. ``ncut`` is carried as computed by the
    graph code for the final partition. ``coarse`` is the patch-level map [h, w] after
    the foreground rule (None when not kept); ``border_flipped`` says whether the border
    rule flipped the model's output, so that evaluation can score the rule off too.
    ``instances`` are the objects found by MaskCut, largest first (empty unless the
    predictor was asked for instances).
    """

    prob: np.ndarray  # H x W float32 in [0, 1], foreground probability
    mask: np.ndarray  # H x W bool
    box: list[float] | None
    boxes: list[list[float]] = field(default_factory=list)
    score: float = 0.0
    ncut: float = float("nan")
    coarse: np.ndarray | None = None
    border_flipped: bool = False
    instances: list[Instance] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``"ok"`` when the mask has foreground, ``"empty"`` otherwise."""
        return "ok" if bool(self.mask.any()) else "empty"

    @property
    def mask_area(self) -> int:
        """Number of foreground pixels."""
        return int(np.count_nonzero(self.mask))

    def rle(self) -> dict[str, Any]:
        """COCO compressed RLE of the mask (``{"size": [h, w], "counts": str}``)."""
        return mask_to_rle(self.mask)


@dataclass
class RawPrediction:
    """What the model gives for one image: foreground map at the input size, and ncut
    (plus the coarse map, whether the border rule flipped, and the instances, as in
    `Prediction`)."""

    prob: np.ndarray  # float32 [h_in, w_in]
    ncut: float
    coarse: np.ndarray | None = None  # float32 [h, w], the patch grid
    border_flipped: bool = False
    instances: RawInstances | None = None


@dataclass
class CompactPrediction:
    """One image's label without its full-size maps: the mask as run lengths, and the
    same fields and row values as a `Prediction` (`compact` makes one from it).

    ``runs`` are COCO's uncompressed counts: run lengths of the column-major mask, the
    first run counting background (0 when the first pixel is foreground); the CPU only
    compresses them (`rle`).
    """

    height: int
    width: int
    runs: np.ndarray  # uint32, summing to height * width
    mask_area: int
    box: list[float] | None
    boxes: list[list[float]]
    score: float
    ncut: float

    @property
    def status(self) -> str:
        """``"ok"`` when the mask has foreground, ``"empty"`` otherwise."""
        return "ok" if self.mask_area > 0 else "empty"

    def rle(self) -> dict[str, Any]:
        """COCO compressed RLE of the mask, as `Prediction.rle` gives it."""
        return _rle_json(mask_utils.frPyObjects({"size": [self.height, self.width], "counts": self.runs},
                                                self.height, self.width))


def compact(pred: Prediction) -> CompactPrediction:
    """A CPU-finished `Prediction` as the record the device path gives."""
    height, width = pred.mask.shape
    return CompactPrediction(height, width, mask_runs(pred.mask), pred.mask_area, pred.box, pred.boxes,
                             pred.score, pred.ncut)


def resize_prob(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a probability map to `size` = (height, width), float32 in [0, 1].

    Upscaling equals torch's ``interpolate(bilinear, align_corners=False)`` to float
    rounding; downscaling also averages (PIL widens the filter), so thin structures are
    not aliased. Used for the labels and, in evaluation, to bring a map to the GT's size.
    """
    h, w = int(size[0]), int(size[1])
    prob = np.asarray(prob, dtype=np.float32)
    if prob.shape == (h, w):
        return prob
    resized = Image.fromarray(prob).resize((w, h), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def finish_raw(
    raw: RawPrediction,
    height: int,
    width: int,
    post: PostConfig,
    instances: InstanceConfig | None = None,
    rgb: np.ndarray | None = None,
    bilateral: BilateralConfig = BilateralConfig(),
) -> Prediction:
    """A model map -> the image's Prediction at its original size (no model needed:
    CPU workers of the labelling pipeline run this after inference).

    Instances, when ``raw`` has them, are finished with ``instances``' refinement
    settings (default `InstanceConfig()`; `finish_instances`; ``rgb`` and ``bilateral``
    for the bilateral solver).
    """
    pred = postprocess(resize_prob(raw.prob, (height, width)), raw.ncut, post)
    pred.coarse, pred.border_flipped = raw.coarse, raw.border_flipped
    if raw.instances is not None:
        config = instances or InstanceConfig()
        pred.instances = finish_instances(raw.instances, (height, width), config, pred.mask, rgb, bilateral)
    return pred


def refine_instance(
    patch_mask: np.ndarray,
    size: tuple[int, int],
    config: InstanceConfig,
    rgb: np.ndarray | None = None,
    bilateral: BilateralConfig = BilateralConfig(),
) -> np.ndarray | None:
    """A patch mask [h, w] -> a bool mask of ``size`` (height, width) by ``config.refine``.

    ``nearest`` repeats each patch; ``bilinear`` thresholds the bilinear resize at 0.5;
    ``bilateral`` snaps that to ``rgb``'s edges with the bilateral solver (as the
    ``tokencut-bs`` method does), at ``rgb``'s own size (the image, or the model's input
    as the labelling pipeline passes it: the solver's cost grows with the pixels), then
    resizes the result to ``size``. Then holes are filled (``config.fill_holes``), and a
    result whose IoU with the nearest resize is below ``config.refine_min_iou`` is
    dropped (None), as MaskCut drops masks its CRF changed too much.
    """
    patch = np.asarray(patch_mask, dtype=bool)
    height, width = size
    nearest = np.asarray(Image.fromarray(patch).resize((width, height), Image.Resampling.NEAREST), dtype=bool)
    if config.refine == "nearest":
        mask = nearest
    elif config.refine == "bilinear":
        mask = resize_prob(patch.astype(np.float32), size) > 0.5
    else:
        if rgb is None:
            raise ValueError("bilateral refinement needs the image: pass rgb")
        work = resize_prob(patch.astype(np.float32), rgb.shape[:2]) > 0.5
        mask = resize_prob(refine_mask(rgb, work, bilateral), size) > 0.5
    if config.fill_holes:
        from scipy import ndimage  # where used: see the module docstring

        mask = ndimage.binary_fill_holes(mask)
    union = np.count_nonzero(mask | nearest)
    iou = np.count_nonzero(mask & nearest) / union if union else 0.0
    return mask if iou >= config.refine_min_iou else None


def finish_instances(
    raw: RawInstances,
    size: tuple[int, int],
    config: InstanceConfig,
    model_mask: np.ndarray | None = None,
    rgb: np.ndarray | None = None,
    bilateral: BilateralConfig = BilateralConfig(),
) -> list[Instance]:
    """Full-resolution instances of ``size`` (height, width), largest first.

    Each patch mask is refined (`refine_instance`), except a first mask that is the
    model's own (``raw.first_is_model``): that one is ``model_mask``, the thresholded
    fine map. As in MaskCut, every mask loses the pixels of the masks found before it;
    masks left empty are dropped.
    """
    taken = np.zeros(size, dtype=bool)
    found = []
    for k, patch in enumerate(raw.masks):
        if k == 0 and raw.first_is_model:
            if model_mask is None:
                raise ValueError("the first instance is the model's mask: pass model_mask")
            mask = np.asarray(model_mask, dtype=bool)
        else:
            mask = refine_instance(patch, size, config, rgb, bilateral)
        if mask is None:
            continue
        mask = mask & ~taken
        taken |= mask
        area = int(np.count_nonzero(mask))
        if area:
            found.append(Instance(mask, mask_box(mask), area, float(raw.score[k]), float(raw.ncut[k])))
    return sorted(found, key=lambda inst: -inst.area)


def mask_box(mask: np.ndarray) -> list[float]:
    """Box of all pixels of a non-empty mask, in the module's exclusive ``xyxy`` convention."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def connected_boxes(
    mask: np.ndarray, min_area: int
) -> tuple[list[float] | None, list[list[float]]]:
    """Boxes of the 8-connected components of ``mask``.

    Returns ``(main_box, boxes)``: ``main_box`` is the largest component's box (None only
    when the mask is empty); ``boxes`` are the components with area ``>= min_area``,
    largest first (ties in scan order). Boxes follow the module's exclusive ``xyxy``
    convention.
    """
    from scipy import ndimage  # where used: see the module docstring

    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT_CONNECTED)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    boxes = [[cols.start, rows.start, cols.stop, rows.stop] for rows, cols in ndimage.find_objects(labels)]
    return rank_components(areas, np.array(boxes, dtype=np.float64).reshape(-1, 4), min_area)


def rank_components(
    areas: np.ndarray, boxes: np.ndarray, min_area: int
) -> tuple[list[float] | None, list[list[float]]]:
    """`connected_boxes`' result from the components' areas [n] and boxes [n, 4], given in
    scan order of their first pixel (scipy's label order): the largest one's box, and the
    boxes of those reaching ``min_area``, largest first, ties kept in scan order."""
    if len(areas) == 0:
        return None, []
    order = np.argsort(-np.asarray(areas), kind="stable")
    return boxes[order[0]].tolist(), boxes[order[areas[order] >= min_area]].tolist()


def confidence_score(prob: np.ndarray, ncut: float) -> float:
    """Confidence in ``[0, 1]`` that the map is a clean foreground/background split.

    ``score = sqrt(decisiveness * cut_quality)`` (geometric mean: both must hold) with

    - ``decisiveness = mean(|2p - 1|)`` over all pixels: 1 when every pixel is 0 or 1,
      0 when the map is uniformly 0.5;
    - ``cut_quality = 1 - clip(ncut, 0, 1)``: a two-way normalised cut lies in
      ``[0, 2]``; a random split scores about 1 and a perfect one 0, so anything no
      better than random gets quality 0. A non-finite ``ncut`` (an undefined cut, e.g.
      one empty side) also gets 0.
    """
    p = np.asarray(prob, dtype=np.float32)
    return score_of(float(np.abs(2.0 * p - 1.0).mean(dtype=np.float64)) if p.size else 0.0, ncut)


def score_of(decisiveness: float, ncut: float) -> float:
    """`confidence_score` from the map's decisiveness, mean(|2p - 1|), however computed
    (`device_finish` sums it on the device)."""
    ncut = float(ncut)
    decisiveness = min(max(decisiveness, 0.0), 1.0)
    cut_quality = 1.0 - min(max(ncut, 0.0), 1.0) if math.isfinite(ncut) else 0.0
    return math.sqrt(decisiveness * cut_quality)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE (column-major), counts as a UTF-8 string for Parquet/JSON."""
    binary = np.asfortranarray(np.asarray(mask, dtype=bool).astype(np.uint8))
    return _rle_json(mask_utils.encode(binary))


def _rle_json(encoded: dict[str, Any]) -> dict[str, Any]:
    """pycocotools' RLE with plain ints and str counts, for Parquet/JSON."""
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("utf-8")}


def mask_runs(mask: np.ndarray) -> np.ndarray:
    """COCO's uncompressed counts of a mask (see `CompactPrediction.runs`)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
    return runs_from_starts(starts, flat.size, bool(flat[0]))


def runs_from_starts(starts: np.ndarray, size: int, foreground_first: bool) -> np.ndarray:
    """COCO's uncompressed counts of a column-major mask of `size` pixels from the index
    where each run starts (the first at 0); a mask whose first pixel is foreground
    starts with an empty background run."""
    runs = np.diff(np.append(starts, size))
    return np.concatenate(([0], runs) if foreground_first else (runs,)).astype(np.uint32)


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode a COCO compressed RLE whose counts are ``str`` or ``bytes`` to a bool mask."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("utf-8")
    size = [int(s) for s in rle["size"]]
    return mask_utils.decode({"size": size, "counts": counts}).astype(bool)


def postprocess(prob: np.ndarray, ncut: float, config: PostConfig) -> Prediction:
    """Threshold a fine probability map (already at the original size) into a Prediction.

    ``mask = prob > config.threshold``; components smaller than
    ``config.min_area_frac * H * W`` pixels (at least 1) get no entry in ``boxes``.
    """
    p = np.asarray(prob, dtype=np.float32)
    if p.ndim != 2:
        raise ValueError(f"postprocess expects an H x W map, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError(NON_FINITE_MAP)
    height, width = p.shape
    mask = p > config.threshold
    box, boxes = connected_boxes(mask, min_component_area(height, width, config))
    return Prediction(
        prob=p,
        mask=mask,
        box=box,
        boxes=boxes,
        score=confidence_score(p, ncut),
        ncut=float(ncut),
    )


def min_component_area(height: int, width: int, config: PostConfig) -> int:
    """The fewest pixels a component needs for an entry in ``boxes`` (at least 1)."""
    # The small tolerance keeps float noise (0.001 * 300 * 300 = 90.00000000000001)
    # from raising the minimum by one pixel.
    return max(1, math.ceil(config.min_area_frac * height * width - 1e-9))
