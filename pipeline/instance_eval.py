"""Class-agnostic COCO AP and AR of instance pseudo-labels (`sempart eval --instances`).

Unsupervised instance masks have no classes, so they are scored the way CutLER scores
MaskCut's and its own: every ground-truth category collapsed into one ("object"), then
pycocotools' COCOeval for boxes and for masks, AP (IoU 0.50:0.95), AP50, AP75 and AR at
1, 10 and 100 detections per image. Crowd regions stay crowd (COCOeval ignores matches
to them), as in COCO's own evaluation.

Predictions are the instances of a label table (`--pred OUT`: rows matched to the
ground truth's images by file name; a row of a table without instances counts its one
mask), or of a model run on a folder of images (`--model`, `--images`): each instance's
mask (COCO RLE), box and score, the score ranking the detections.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

logger = logging.getLogger(__name__)

OBJECT = {"id": 1, "name": "object", "supercategory": "object"}
# COCOeval.stats positions of the figures reported (the rest are by object size).
STATS = {"AP": 0, "AP50": 1, "AP75": 2, "AR1": 6, "AR10": 7, "AR100": 8}


@dataclass
class Detection:
    """One predicted instance of an image: COCO RLE, xyxy box (x2/y2 exclusive), score."""

    file_name: str
    rle: dict[str, Any]
    box: list[float]
    score: float


def class_agnostic(gt: dict[str, Any]) -> COCO:
    """The ground truth with every annotation in one category."""
    data = copy.deepcopy(gt)
    for ann in data.get("annotations", []):
        ann["category_id"] = OBJECT["id"]
    data["categories"] = [OBJECT]
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detection_results(gt: COCO, detections: Iterable[Detection]) -> tuple[list[dict[str, Any]], int]:
    """COCO result entries of the detections whose image the ground truth has (by file
    name, folders ignored), and how many detections had no such image."""
    ids = {Path(img["file_name"]).name: img["id"] for img in gt.dataset["images"]}
    results, unmatched = [], 0
    for det in detections:
        image_id = ids.get(Path(det.file_name.split("#")[0]).name)
        if image_id is None:
            unmatched += 1
            continue
        x1, y1, x2, y2 = (float(v) for v in det.box)
        counts = det.rle["counts"]
        results.append({
            "image_id": image_id, "category_id": OBJECT["id"], "score": float(det.score),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "segmentation": {"size": [int(s) for s in det.rle["size"]],
                             "counts": counts if isinstance(counts, str) else counts.decode()},
        })
    return results, unmatched


def evaluate_instances(gt_json: str | Path, detections: Iterable[Detection]) -> dict[str, Any]:
    """`{"box": {AP, AP50, AP75, AR1, AR10, AR100}, "mask": {...}, "images": n,
    "detections": n, "unmatched_detections": n}` (figures in [0, 1]; COCOeval gives -1
    where nothing can be scored)."""
    gt = class_agnostic(json.loads(Path(gt_json).read_text()))
    results, unmatched = detection_results(gt, detections)
    if unmatched:
        logger.warning("%d detections are of images the ground truth does not have (matched by file name)",
                       unmatched)
    report: dict[str, Any] = {"images": len(gt.getImgIds()), "detections": len(results),
                              "unmatched_detections": unmatched}
    for name, iou_type in (("box", "bbox"), ("mask", "segm")):
        report[name] = _cocoeval(gt, results, iou_type)
    return report


def _cocoeval(gt: COCO, results: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
    if not results:
        return {key: 0.0 for key in STATS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iou_type)
        ev.params.useCats = 0  # one category in any case; matches never depend on it
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {key: round(float(ev.stats[i]), 4) for key, i in STATS.items()}


def table_detections(rows: Iterable[dict[str, Any]]) -> Iterator[Detection]:
    """Detections of label-table rows (uri, mask_rle, box, score, instances): each
    instance, or the row's one mask when the table has no instances."""
    for row in rows:
        if row.get("instances") is not None:
            for inst in row["instances"]:
                yield Detection(row["uri"], inst["mask_rle"], inst["box"], inst["score"])
        elif row.get("status") == "ok" and row.get("box") is not None:
            yield Detection(row["uri"], row["mask_rle"], row["box"], row["score"])


def format_instance_report(report: dict[str, Any]) -> str:
    lines = [f"{report['images']} images, {report['detections']} detections "
             f"(class-agnostic COCO, pycocotools COCOeval)"]
    for name in ("box", "mask"):
        lines.append(f"{name:>4}: " + "  ".join(f"{k} {100 * v:5.1f}" for k, v in report[name].items()))
    return "\n".join(lines)
