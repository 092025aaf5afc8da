"""Class-agnostic COCO AP/AR of instances (`pipeline.instance_eval`) on a hand-built case
whose answers are worked out below, through pycocotools' COCOeval."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.instance_eval import Detection, evaluate_instances, image_name, read_coco_gt, table_detections
from sempart_core.postprocess import mask_to_rle

# Two 100 x 100 images: a.jpg holds objects A and B (different categories), b.jpg holds C.
BOXES = {"A": ("a.jpg", [10, 10, 50, 50]), "B": ("a.jpg", [60, 60, 90, 90]), "C": ("b.jpg", [20, 20, 80, 80])}


def rle(box: list[float]) -> dict:
    mask = np.zeros((100, 100), bool)
    x1, y1, x2, y2 = (int(v) for v in box)
    mask[y1:y2, x1:x2] = True
    return mask_to_rle(mask)


@pytest.fixture
def gt_json(tmp_path: Path) -> Path:
    return write_gt(tmp_path / "gt.json")


def write_gt(path: Path) -> Path:
    """The two images' ground truth as a COCO instances file at `path`."""
    images = [{"id": 1, "file_name": "train/a.jpg", "width": 100, "height": 100},
              {"id": 2, "file_name": "train/b.jpg", "width": 100, "height": 100}]
    anns = []
    for k, (name, (file, (x1, y1, x2, y2))) in enumerate(BOXES.items(), start=1):
        anns.append({"id": k, "image_id": 1 if file == "a.jpg" else 2, "category_id": 3 if name != "B" else 7,
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                     "segmentation": rle([x1, y1, x2, y2])})
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}))
    return path


def detect(name: str, score: float) -> Detection:
    file, box = BOXES[name]
    return Detection(f"s3://bucket/photos/{file}", rle(box), box, score)


def test_perfect_instances_score_one_whatever_their_category(gt_json: Path) -> None:
    report = evaluate_instances(gt_json, [detect("A", 0.9), detect("B", 0.5), detect("C", 0.7)])
    for kind in ("box", "mask"):
        assert report[kind]["AP"] == report[kind]["AP50"] == report[kind]["AP75"] == 1.0
        assert report[kind]["AR10"] == report[kind]["AR100"] == 1.0
        # one detection per image: a.jpg finds 1 of its 2 objects, b.jpg its 1: recall 2/3
        assert report[kind]["AR1"] == pytest.approx(2 / 3, abs=1e-4)


def test_a_confident_false_positive_and_a_miss(gt_json: Path) -> None:
    """Ranked: a false positive (0.95), A (0.9), C (0.8); B missed. Recall 1/3 then 2/3
    at precision 1/2 then 2/3; COCO interpolates precision 2/3 over the recall points
    0, 0.01, ..., 0.66 (67 of 101) and 0 above: AP = 67 * (2/3) / 101 at every IoU."""
    wrong = Detection("a.jpg", rle([70, 5, 95, 30]), [70, 5, 95, 30], 0.95)
    report = evaluate_instances(gt_json, [wrong, detect("A", 0.9), detect("C", 0.8)])
    for kind in ("box", "mask"):
        assert report[kind]["AP"] == report[kind]["AP50"] == pytest.approx(67 * (2 / 3) / 101, abs=1e-4)
        assert report[kind]["AR100"] == pytest.approx(2 / 3, abs=1e-4)
    assert (report["images"], report["detections"], report["unmatched_detections"]) == (2, 3, 0)


def test_detections_of_other_images_are_counted_apart(gt_json: Path) -> None:
    report = evaluate_instances(gt_json, [detect("A", 0.9), Detection("z.jpg", rle([1, 1, 5, 5]), [1, 1, 5, 5], 0.9)])
    assert report["unmatched_detections"] == 1 and report["detections"] == 1
    assert report["box"]["AR100"] == pytest.approx(1 / 3, abs=1e-4)


def test_table_rows_give_their_instances() -> None:
    inst = {"mask_rle": rle([1, 1, 5, 5]), "box": [1, 1, 5, 5], "area": 16, "score": 0.4, "ncut": 0.1}
    rows = [{"uri": "a.jpg", "instances": [inst, inst]}, {"uri": "b.jpg", "instances": []},
            {"uri": "c.jpg", "instances": None}]
    found = list(table_detections(rows))
    assert [(d.file_name, d.score) for d in found] == [("a.jpg", 0.4), ("a.jpg", 0.4)]


def test_only_the_named_images_are_scored_and_an_image_without_objects_counts(gt_json: Path) -> None:
    """Scoring b.jpg alone: A and B (of a.jpg) are neither misses nor matches. An
    annotation-free image still counts: its detections are false positives."""
    report = evaluate_instances(gt_json, [detect("A", 0.9), detect("C", 0.8)], ["b.jpg"])
    assert (report["images"], report["gt_images"], report["detections"]) == (1, 2, 1)
    assert report["box"]["AP"] == report["mask"]["AR100"] == 1.0
    gt = json.loads(gt_json.read_text())
    gt["images"].append({"id": 3, "file_name": "empty.jpg", "width": 100, "height": 100})
    wrong = Detection("empty.jpg", rle([1, 1, 9, 9]), [1, 1, 9, 9], 0.99)
    assert evaluate_instances(gt, [wrong, detect("C", 0.8)], ["b.jpg"])["box"]["AP"] == 1.0
    report = evaluate_instances(gt, [wrong, detect("C", 0.8)], ["b.jpg", "empty.jpg"])
    assert report["box"]["AP"] == report["mask"]["AP"] == 0.5  # precision 1/2 at every recall


def test_tar_members_match_by_their_own_name() -> None:
    assert image_name("s3://b/shards/000.tar#img/a.jpg") == "a.jpg"
    assert image_name("file:///data/photos/a.jpg") == "a.jpg"


@pytest.mark.parametrize("data", ["[1, 2]", '{"images": [{"id": 1}], "annotations": []}', "not json"])
def test_a_file_that_is_not_coco_is_one_line(tmp_path: Path, data: str) -> None:
    path = tmp_path / "gt.json"
    path.write_text(data)
    with pytest.raises(ValueError, match="COCO instances"):
        read_coco_gt(path)


def test_a_mask_of_another_size_than_its_image_is_an_error(gt_json: Path) -> None:
    small = Detection("a.jpg", mask_to_rle(np.ones((50, 50), bool)), [0, 0, 50, 50], 0.9)
    with pytest.raises(ValueError, match="image 'a.jpg': the image is 50x50"):
        evaluate_instances(gt_json, [small])
