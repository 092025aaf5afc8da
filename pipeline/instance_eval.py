"""Class-agnostic COCO AP and AR of instance pseudo-labels (`sempart eval --instances`).

Unsupervised instance masks have no classes, so they are scored the way CutLER scores
MaskCut's and its own: every ground-truth category collapsed into one ("object"), then
pycocotools' COCOeval for boxes and for masks, AP (IoU 0.50:0.95), AP50, AP75 and AR at
1, 10 and 100 detections per image. Crowd regions stay crowd (COCOeval ignores matches
to them), as in COCO's own evaluation.

Predictions are the instances of a label table (`--pred OUT`, a run labelled with
`--instances N`), or of a model run on a folder of images (`--model`, `--images`): each
instance's mask (COCO RLE), box and score, the score ranking the detections. Images are
matched to the ground truth's by file name; the images scored are those the ground
truth and the predictions both have (the others are counted and logged), and an image
without annotations still counts, its detections as false positives (as in COCOeval).
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

from pipeline.evaluate import IMAGE_SUFFIXES, check_annotated_size, predict_images
from pipeline.query import query_batches, where_query

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


def read_coco_gt(path: str | Path) -> dict[str, Any]:
    """A COCO instances JSON, checked for what the evaluation reads (a one-line
    ValueError otherwise): images with id, file_name, height and width; annotations with
    image_id, bbox and segmentation."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}): give a COCO instances .json") from exc
    needs = {"images": ("id", "file_name", "height", "width"), "annotations": ("image_id", "bbox", "segmentation")}
    for key, fields in needs.items():
        entries = data.get(key) if isinstance(data, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and all(f in e for f in fields)
                                                    for e in entries):
            raise ValueError(f"{path} is not a COCO instances file: it needs a list '{key}' whose entries "
                             f"have {', '.join(fields)}")
    return data


def class_agnostic(gt: dict[str, Any]) -> COCO:
    """The ground truth with every annotation in one category (iscrowd 0 and the box's
    area where the file leaves them out: COCOeval reads both)."""
    data = copy.deepcopy(gt)
    for ann in data.get("annotations", []):
        ann["category_id"] = OBJECT["id"]
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    data["categories"] = [OBJECT]
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def image_name(uri: str) -> str:
    """The file name an image is matched to the ground truth by: the last part of its
    URI or path (of a tar member's name for `shard.tar#member`)."""
    return Path(uri.rsplit("#", 1)[-1] if ".tar#" in uri else uri).name


def gt_names(gt: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ground truth's images by file name (folders ignored)."""
    return {Path(img["file_name"]).name: img for img in gt["images"]}


def detection_results(gt: COCO, detections: Iterable[Detection],
                      scored: set[str] | None = None) -> tuple[list[dict[str, Any]], int]:
    """COCO result entries of the detections whose image the ground truth has (by file
    name, folders ignored; only the `scored` names if given), and how many detections
    had no such image. A mask of another size than its image's is an error."""
    images = gt_names(gt.dataset)
    results, unmatched = [], 0
    for det in detections:
        name = image_name(det.file_name)
        image = images.get(name)
        if image is None:
            unmatched += 1
            continue
        if scored is not None and name not in scored:
            continue
        try:
            check_annotated_size(tuple(det.rle["size"]), (image["height"], image["width"]))
        except ValueError as err:
            raise ValueError(f"image '{name}': {err}") from err
        x1, y1, x2, y2 = (float(v) for v in det.box)
        counts = det.rle["counts"]
        results.append({
            "image_id": image["id"], "category_id": OBJECT["id"], "score": float(det.score),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "segmentation": {"size": [int(s) for s in det.rle["size"]],
                             "counts": counts if isinstance(counts, str) else counts.decode()},
        })
    return results, unmatched


def evaluate_instances(gt_json: str | Path | dict[str, Any], detections: Iterable[Detection],
                       file_names: Iterable[str] | None = None) -> dict[str, Any]:
    """`{"box": {AP, AP50, AP75, AR1, AR10, AR100}, "mask": {...}, "images": n,
    "gt_images": n, "detections": n, "unmatched_detections": n}` over the ground
    truth's images named in `file_names` (all of them if None). Figures in [0, 1];
    COCOeval gives -1 where nothing can be scored."""
    data = gt_json if isinstance(gt_json, dict) else read_coco_gt(gt_json)
    gt = class_agnostic(data)
    images = gt_names(data)
    scored = set(images) if file_names is None else set(file_names) & set(images)
    results, unmatched = detection_results(gt, detections, scored)
    if unmatched:
        logger.warning("%d detections are of images the ground truth does not have (matched by file name)",
                       unmatched)
    report: dict[str, Any] = {"images": len(scored), "gt_images": len(images), "detections": len(results),
                              "unmatched_detections": unmatched}
    image_ids = sorted(images[name]["id"] for name in scored)
    for name, iou_type in (("box", "bbox"), ("mask", "segm")):
        report[name] = _cocoeval(gt, results, iou_type, image_ids)
    return report


def _cocoeval(gt: COCO, results: list[dict[str, Any]], iou_type: str, image_ids: list[int]) -> dict[str, float]:
    if not results:
        return {key: 0.0 for key in STATS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iou_type)
        ev.params.useCats = 0  # one category in any case; matches never depend on it
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {key: round(float(ev.stats[i]), 4) for key, i in STATS.items()}


def table_detections(rows: Iterable[dict[str, Any]]) -> Iterator[Detection]:
    """Detections of label-table rows (uri, instances): each row's instances."""
    for row in rows:
        for inst in row.get("instances") or ():
            yield Detection(row["uri"], inst["mask_rle"], inst["box"], inst["score"])


def scored_names(gt: dict[str, Any], names: Iterable[str], limit: int | None, where: str) -> list[str]:
    """The file names (sorted, the first `limit`) that both the ground truth and the
    predictions (`names`, from `where`) have; an error when there is none."""
    images = gt_names(gt)
    both = sorted(set(names) & set(images))
    if not both:
        example = next(iter(images), None)
        raise ValueError(f"no image of {where} is in the ground truth (matched by file name"
                         + (f", e.g. {example})" if example else "; it has no images)"))
    if len(both) < len(images):
        logger.warning("%d of the %d ground-truth images have no prediction; they are not scored",
                       len(images) - len(both), len(images))
    return both[:limit] if limit else both


def evaluate_table(gt_json: str | Path, out: str, limit: int | None = None) -> dict[str, Any]:
    """Score the instances of a `sempart label` table (`sempart eval --instances --pred OUT`)."""
    gt = read_coco_gt(gt_json)
    rows = [row for batch in query_batches(out, where_query(None, ["uri", "instances"])) for row in batch.to_pylist()]
    if not any(row["instances"] is not None for row in rows):
        raise ValueError(f"the table in {out} has no instances (a schema-v1 table, or a run without --instances): "
                         "label with `sempart label --instances N`")
    names = scored_names(gt, (image_name(row["uri"]) for row in rows), limit, f"the table in {out}")
    return {**evaluate_instances(gt, table_detections(rows), names), "pred": str(out)}


def evaluate_model_instances(predictor, images_dir: str | Path, gt_json: str | Path,
                             limit: int | None = None) -> dict[str, Any]:
    """Predict the instances of the images of `images_dir` that the ground truth has and
    score them (`sempart eval --instances --model MODEL --images DIR`); the predictor
    must have an `InstanceConfig`."""
    gt = read_coco_gt(gt_json)
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ValueError(f"image folder {images_dir} does not exist or is not a folder")
    files = {p.name: p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    names = scored_names(gt, files, limit, f"image folder {images_dir}")
    detections = [Detection(path.name, inst.rle(), inst.box, inst.score)
                  for path, pred in predict_images(predictor, [files[n] for n in names]) for inst in pred.instances]
    return {**evaluate_instances(gt, detections, names), "images_dir": str(images_dir),
            "max_instances": predictor.instances.max_instances, "instances_from": predictor.instances.mode,
            "model_id": predictor.model_id, "random_backbone": bool(predictor.meta.get("random_backbone", False))}


def format_instance_report(report: dict[str, Any]) -> str:
    """The figures as a small text table, in percent: one row for boxes, one for masks."""
    lines = [f"class-agnostic COCO (pycocotools COCOeval): {report['images']} of the ground truth's "
             f"{report['gt_images']} images, {report['detections']} detections",
             f"{'':<6}" + "".join(f"{k:>7}" for k in STATS)]
    for name in ("box", "mask"):
        lines.append(f"{name:<6}" + "".join(f"{100 * v:>7.1f}" for v in report[name].values()))
    return "\n".join(lines)
