"""Score predicted masks against ground-truth masks and boxes; write a JSON report and a PR plot.

Predictions and GT are matched by file stem (`0001.png` <-> `0001.png` / `0001.npy`).
Folder-based evaluation (`sempart eval --pred`) scores the given maps: against masks,
and by CorLoc of each map's main box (the largest 8-connected component of map > 0.5,
as the predictor takes it) against boxes. Model-based
evaluation (`sempart eval --model`) scores, side by side, the fine and the coarse map
(the coarse one upsampled to the GT's size) under each foreground rule the method has:
SEMPART's border rule on (what the method outputs) and off (the rule's flip undone), or
TokenCut's own seed rule, named as such; and CorLoc of the main box when GT boxes are
given. The fine map under the method's own rule is its output: its figures are also the
report's top-level keys, as in a folder-based report.

Both follow the datasets' conventions: images are decoded as stored, without their EXIF
orientation (the masks and boxes were drawn on the stored pixels, and LOST/TokenCut read
them so), and the GT mask is binarised by the rule chosen (`GT_BINARIZE`).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from pipeline.annotations import BoxSet
from sempart_core.metrics import SODMetrics, corloc
from sempart_core.postprocess import Prediction, connected_boxes, resize_prob

logger = logging.getLogger(__name__)

MASK_SUFFIXES = frozenset({".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff"})
PRED_SUFFIXES = MASK_SUFFIXES | {".npy"}
_MAX_LISTED = 10  # stems named in logs and reports; the counts are always complete
# How a GT mask becomes bool: each protocol's rule, named in the report.
GT_BINARIZE = {
    "half": "GT above half its full scale (> 127 of 255): classic salient-object evaluation",
    "nonzero": "any non-zero GT pixel is object: TokenCut's evaluation code",
}
MAIN_BOX_THRESHOLD = 0.5  # a given map's main box is taken at the predictor's default threshold


def _read_gray(path: Path) -> tuple[np.ndarray, int]:
    """Decode an image to one channel; return it with its full-scale value (255 or 65535)."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit PNGs open as I;16 or I depending on Pillow; both hold 0..65535.
            return np.asarray(img, dtype=np.int64), 65535
        return np.asarray(img.convert("L")), 255


def read_mask(path: str | Path, binarize: str = "half") -> np.ndarray:
    """Read a GT mask as bool by a `GT_BINARIZE` rule: values above half scale (> 127
    for 8-bit PNGs), or any non-zero value."""
    if binarize not in GT_BINARIZE:
        raise ValueError(f"unknown GT binarisation {binarize!r}: use one of {', '.join(GT_BINARIZE)}")
    arr, full = _read_gray(Path(path))
    return arr > (full // 2 if binarize == "half" else 0)


def read_prediction(path: str | Path) -> np.ndarray:
    """Read a probability map as float32 in [0, 1]: 8/16-bit image (scaled) or .npy."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
        arr = np.squeeze(arr)
        if arr.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D probability map, got shape {arr.shape}")
        if arr.dtype == np.bool_:
            return arr.astype(np.float32)
        arr = arr.astype(np.float32)
        if not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
            raise ValueError(f"{path}: .npy predictions must hold probabilities in [0, 1]")
        return arr
    arr, full = _read_gray(path)
    return arr.astype(np.float32) / np.float32(full)


def _index_by_stem(folder: Path, suffixes: frozenset[str], what: str) -> dict[str, Path]:
    """Map file stem -> path for the files of `folder` with an accepted suffix."""
    if not folder.is_dir():
        raise ValueError(f"{what} folder {folder} does not exist or is not a folder")
    index: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        if path.stem in index:
            raise ValueError(
                f"{what} folder {folder} has two files for '{path.stem}' "
                f"({index[path.stem].name}, {path.name}); keep one per image"
            )
        index[path.stem] = path
    return index


def _match(pred_dir: Path, gt_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[str], int]:
    """Matched triples, GT stems without a prediction, and the number of predictions."""
    preds = _index_by_stem(pred_dir, PRED_SUFFIXES, "prediction")
    gts = _index_by_stem(gt_dir, MASK_SUFFIXES, "ground-truth")
    pairs = [(stem, preds[stem], gts[stem]) for stem in sorted(gts) if stem in preds]
    if not pairs:
        raise ValueError(
            f"no prediction in {pred_dir} ({len(preds)} files) matches a ground-truth mask "
            f"in {gt_dir} ({len(gts)} files) by file stem; name each prediction after its "
            "mask (e.g. 0001.png or 0001.npy for 0001.png)"
        )
    missing = sorted(set(gts) - set(preds))
    if missing:
        logger.warning(
            "%d of %d ground-truth masks have no prediction (e.g. %s); they are not scored",
            len(missing), len(gts), ", ".join(missing[:_MAX_LISTED]),
        )
    extra = len(preds) - len(pairs)
    if extra:
        logger.info("%d predictions have no ground-truth mask and are ignored", extra)
    return pairs, missing, len(preds)


def match_files(pred_dir: str | Path, gt_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """(stem, prediction path, GT path) for every GT mask that has a prediction."""
    return _match(Path(pred_dir), Path(gt_dir))[0]


def evaluate_predictions(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> dict:
    """Score (stem, probability HxW, GT mask) triples; predictions are resized to the GT.

    Streams: nothing per image is kept, so any iterable (e.g. a model's outputs) works.
    """
    metrics = SODMetrics()
    for stem, prob, gt in pairs:
        gt = np.asarray(gt)
        try:
            metrics.update(resize_prob(prob, gt.shape[:2]), gt)
        except ValueError as err:
            raise ValueError(f"image '{stem}': {err}") from err
    return metrics.result()


def evaluate_dirs(
    pred_dir: str | Path, gt_dir: str | Path | None = None, boxes: BoxSet | None = None, gt_binarize: str = "half"
) -> dict:
    """Score a folder of predicted maps against a folder of GT masks (metrics plus
    counts), against GT boxes (CorLoc of each map's main box), or both."""
    if gt_dir is None and boxes is None:
        raise ValueError("give ground-truth masks, boxes, or both")
    pred_dir = Path(pred_dir)
    report: dict = {"pred_dir": str(pred_dir)}
    if gt_dir is not None:
        gt_dir = Path(gt_dir)
        pairs, missing, n_pred = _match(pred_dir, gt_dir)
        report.update(evaluate_predictions(
            (stem, read_prediction(pred), read_mask(gt, gt_binarize)) for stem, pred, gt in pairs
        ))
        report.update(
            gt_dir=str(gt_dir),
            gt_binarize=gt_binarize,
            n_gt=len(pairs) + len(missing),
            n_predictions=n_pred,
            n_missing=len(missing),
            missing_examples=missing[:_MAX_LISTED],
        )
    if boxes is not None:
        report.update(corloc_of_maps(pred_dir, boxes))
    return report


def main_box(prob: np.ndarray, threshold: float = MAIN_BOX_THRESHOLD) -> list[float] | None:
    """The box of the largest 8-connected component of prob > threshold, as `Prediction.box`."""
    return connected_boxes(prob > threshold, 1)[0]


def corloc_of_maps(pred_dir: Path, boxes: BoxSet) -> dict:
    """CorLoc of given maps: each map's main box against its image's GT boxes.

    A map of another size than the one its annotation records is resized to it first
    (boxes are in the annotated pixels), as the predictor resizes its map to the image.
    """
    preds = _index_by_stem(pred_dir, PRED_SUFFIXES, "prediction")
    missing = _require_all(boxes, set(preds), "prediction")
    stems = sorted(s for s in boxes.boxes if s in preds)
    if not stems:
        raise ValueError(f"no prediction in {pred_dir} matches an image with ground-truth boxes by file stem")
    pred_boxes = []
    for stem in stems:
        prob = read_prediction(preds[stem])
        size = boxes.sizes.get(stem, prob.shape)
        pred_boxes.append(main_box(resize_prob(prob, size)))
    value = corloc(pred_boxes, [boxes.boxes[s] for s in stems])
    details = {"n_images": len(stems), "n_missing": len(missing), "main_box": "largest 8-connected component of map > 0.5"}
    return {"CorLoc": value, "corloc": {**details, **boxes.describe()}}


def _require_all(boxes: BoxSet, have: set[str], what: str) -> list[str]:
    """Stems of `boxes` without a `what`: an error for a set that must be scored whole
    (COCO20k), otherwise logged and returned (those images are not scored)."""
    missing = sorted(set(boxes.boxes) - have)
    if missing:
        message = (f"{len(missing)} of the {len(boxes.boxes)} {boxes.name} images with ground-truth boxes "
                   f"have no {what} (e.g. {', '.join(missing[:3])})")
        if boxes.complete:
            raise ValueError(f"{message}; {boxes.name} is scored on all of its images")
        logger.warning("%s; they are not scored", message)
    return missing


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
MAPS = ("fine", "coarse")
# Foreground rules, the method's own first: SEMPART's border rule (and its flip undone),
# TokenCut's seed rule (the side holding the largest |Fiedler| entry).
BORDER_RULES = ("border_rule_on", "border_rule_off")
TOKENCUT_RULES = ("tokencut_seed_rule",)
RULES = BORDER_RULES + TOKENCUT_RULES
_PERCENT = ("Acc", "IoU", "maxF_dataset", "maxF_image")  # printed in %, MAE as a fraction


def metric_scalars(result: dict) -> dict:
    """A `SODMetrics.result()` without its curves."""
    return {k: v for k, v in result.items() if not isinstance(v, list)}


class ModelScores:
    """Streaming scores of a model's predictions, for every map and foreground rule.

    Per image: the fine and coarse maps as predicted (the method's own rule, first in
    ``rules``) and, for ``border_rule_off``, with the flip undone where the border rule
    flipped; the main box of each rule's fine mask for CorLoc.
    """

    def __init__(self, masks: bool, boxes: bool, rules: tuple[str, ...], threshold: float):
        self.rules = rules
        self.threshold = threshold
        self.sod = {(r, m): SODMetrics() for r in self.rules for m in MAPS} if masks else {}
        self.pred_boxes: dict[str, list] = {r: [] for r in self.rules} if boxes else {}
        self.gt_boxes: list[list[list[float]]] = []
        self.n_flipped = 0

    def add(self, pred: Prediction, gt_mask: np.ndarray | None, gt_boxes: list | None) -> None:
        if pred.coarse is None:
            raise ValueError("the prediction has no coarse map")
        self.n_flipped += int(pred.border_flipped)
        for rule in self.rules:
            undo = rule == "border_rule_off" and pred.border_flipped
            fine = 1.0 - pred.prob if undo else pred.prob
            coarse = 1.0 - pred.coarse if undo else pred.coarse
            if self.sod:
                gt = np.asarray(gt_mask)
                self.sod[rule, "fine"].update(resize_prob(fine, gt.shape[:2]), gt)
                self.sod[rule, "coarse"].update(resize_prob(coarse, gt.shape[:2]), gt)
            if self.pred_boxes:
                box = main_box(fine, self.threshold) if undo else pred.box
                self.pred_boxes[rule].append(box)
        if self.pred_boxes:
            self.gt_boxes.append(gt_boxes)

    def result(self) -> dict:
        report: dict = {"rules": list(self.rules), "n_border_flipped": self.n_flipped}
        if self.sod:
            main = self.sod[self.rules[0], "fine"].result()
            report.update(main)  # the method's output, as in a folder-based report
            for rule in self.rules:
                report[rule] = {m: metric_scalars(self.sod[rule, m].result()) for m in MAPS}
        if self.pred_boxes:
            report["corloc"] = {
                "n_images": len(self.gt_boxes),
                **{rule: corloc(self.pred_boxes[rule], self.gt_boxes) for rule in self.rules},
            }
            report["CorLoc"] = report["corloc"][self.rules[0]]
        return report


def select_images(images_dir: Path, *stem_sets: set[str] | None) -> list[Path]:
    """Images of `images_dir` (sorted) whose stem is in every given set of stems."""
    if not images_dir.is_dir():
        raise ValueError(f"image folder {images_dir} does not exist or is not a folder")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for stems in stem_sets:
        if stems is not None:
            images = [p for p in images if p.stem in stems]
    if not images:
        raise ValueError(f"no image in {images_dir} has ground truth (a mask or boxes of the same name)")
    return images


def evaluate_model(
    predictor,
    images_dir: str | Path,
    gt_dir: str | Path | None = None,
    boxes: BoxSet | None = None,
    limit: int | None = None,
    stems: set[str] | None = None,
    gt_binarize: str = "half",
) -> dict:
    """Predict every image that has ground truth (a mask in `gt_dir`, boxes in `boxes`,
    both when both are given; only `stems` if given) and score it (`ModelScores`).
    """
    if gt_dir is None and boxes is None:
        raise ValueError("give ground-truth masks, boxes, or both")
    images_dir = Path(images_dir)
    gts = _index_by_stem(Path(gt_dir), MASK_SUFFIXES, "ground-truth mask") if gt_dir is not None else None
    images = select_images(images_dir, set(gts) if gts is not None else None,
                           set(boxes.boxes) if boxes is not None else None, stems)
    missing = []
    if boxes is not None:
        in_scope = boxes if stems is None else BoxSet(boxes.name, {s: b for s, b in boxes.boxes.items() if s in stems},
                                                     complete=boxes.complete)
        missing = _require_all(in_scope, {p.stem for p in images}, f"image in {images_dir}")
    images = images[:limit] if limit else images
    rules = BORDER_RULES if predictor.method == "sempart" else TOKENCUT_RULES
    scores = ModelScores(gts is not None, boxes is not None, rules, predictor.config.post.threshold)
    for path, pred in predict_images(predictor, images):
        mask = read_mask(gts[path.stem], gt_binarize) if gts is not None else None
        try:
            if boxes is not None:
                check_annotated_size(pred.prob.shape, boxes.sizes.get(path.stem))
            scores.add(pred, mask, boxes.boxes[path.stem] if boxes is not None else None)
        except ValueError as err:
            raise ValueError(f"image '{path.stem}': {err}") from err
    report = scores.result()
    if boxes is not None:
        report["corloc"].update(boxes.describe(), n_missing=len(missing))
    report.update(
        images_dir=str(images_dir),
        gt_dir=str(gt_dir) if gt_dir is not None else None,
        gt_binarize=gt_binarize if gt_dir is not None else None,
        method=predictor.method,
        foreground_rule=rules[0],
        model_id=predictor.model_id,
        random_backbone=bool(predictor.meta.get("random_backbone", False)),
    )
    return report


def predict_images(predictor, images: list[Path]) -> Iterator[tuple[Path, Prediction]]:
    """(path, prediction) of each image file, predicted a few batches at a time.

    Images are decoded as the datasets store them, without EXIF orientation: that is
    the pixel grid their masks and boxes were drawn on.
    """
    from sempart_core.images import decode_image

    step = predictor.batch_size * 4
    for start in range(0, len(images), step):
        chunk = images[start : start + step]
        yield from zip(chunk, predictor.predict([decode_image(p.read_bytes(), exif_transpose=False) for p in chunk]))
        logger.info("evaluated %d/%d images", start + len(chunk), len(images))


def check_annotated_size(shape: tuple[int, ...], annotated: tuple[int, int] | None) -> None:
    """Boxes and masks are in the pixels their annotation records: the image must have that size."""
    if annotated is not None and tuple(shape[:2]) != tuple(annotated):
        raise ValueError(f"the image is {shape[1]}x{shape[0]} but its annotation records "
                         f"{annotated[1]}x{annotated[0]}: not the image the boxes were drawn on")


def format_report(report: dict) -> str:
    """The report's figures as a small text table (percent), one row per map and rule."""
    def cells(row: dict) -> str:
        return "".join(f"{100 * row[c]:>14.1f}" for c in _PERCENT) + f"{row['MAE']:>8.3f}"

    header = "".join(f"{c:>14}" for c in _PERCENT) + f"{'MAE':>8}"
    lines = []
    if report.get("gt_binarize"):
        lines.append(f"ground truth: {GT_BINARIZE[report['gt_binarize']]} ({report['gt_binarize']})")
    rules = [r for r in RULES if r in report]
    if rules:
        lines.append(f"{'map':<8}{'foreground rule':<20}{header}")
        lines += [f"{m:<8}{rule:<20}{cells(report[rule][m])}" for rule in rules for m in MAPS]
    elif "IoU" in report:
        lines += [header, cells(report)]
    if "corloc" in report:
        c = report["corloc"]
        per_rule = [f"{rule} {100 * c[rule]:.1f}" for rule in RULES if rule in c]
        lines.append(
            f"CorLoc on {c['annotations']} ({c['n_images']} images, "
            f"{c['n_without_box_counted_as_miss']} without a box counted as misses): "
            + (", ".join(per_rule) if per_rule else f"{100 * report['CorLoc']:.1f}")
        )
    return "\n".join(lines)


def write_report(report: dict, json_path: str | Path) -> Path:
    """Write the report as indented JSON (parent folders created); returns the path."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return path


def write_pr_plot(report: dict, png_path: str | Path) -> Path:
    """Plot the dataset PR curve, marking the max-F point; returns the path.

    Uses a bare Agg `Figure` (no pyplot) so it works headless and leaves global
    matplotlib state alone.
    """
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    precision = np.asarray(report["precision"])
    recall = np.asarray(report["recall"])
    best = int(np.argmax(report["f_measure"]))

    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    ax.plot(recall, precision, lw=2, label="dataset PR (mean over images)")
    ax.plot(
        recall[best], precision[best], "o",
        label=f"max F at threshold {report['maxF_dataset_threshold']:.3f}",
    )
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(
        f"maxF_dataset {report['maxF_dataset']:.3f} (beta2 {report['maxF_dataset_beta2']:g}), "
        f"maxF_image {report['maxF_image']:.3f} (beta2 {report['maxF_image_beta2']:g})\n"
        f"IoU {report['IoU']:.3f}, Acc {report['Acc']:.3f}, n = {report['n_images']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
