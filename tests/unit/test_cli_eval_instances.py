"""`sempart eval --instances --gt-coco` end to end: the figures are `evaluate_instances`'
on the same detections, from a label table (`--pred OUT`) or the model (`--model`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.instance_eval import Detection, evaluate_instances
from pipeline.schema import LABELS_SCHEMA
from sempart_core.config import InstanceConfig
from sempart_core.postprocess import mask_box, mask_to_rle
from sempart_core.predictor import load_predictor
from sempart_core.synthetic import synthetic_instances
from tests.unit.test_instance_eval import BOXES, rle, write_gt

runner = CliRunner()


def instance(box: list[float], score: float) -> dict:
    x1, y1, x2, y2 = box
    return {"mask_rle": rle(box), "box": box, "area": (x2 - x1) * (y2 - y1), "score": score, "ncut": 0.1}


def write_table(out: Path, rows: list[dict], schema: pa.Schema = LABELS_SCHEMA) -> Path:
    """A label output folder holding `rows` as its one part file."""
    out.mkdir()
    full = [{"image_id": r["uri"], "status": "ok", **r} for r in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=schema), out / "part-00000.parquet")
    return out


# a.jpg: A found, a confident false positive, B missed; b.jpg: C found off by a few pixels;
# z.jpg is not in the ground truth; the error row of b2.jpg has no instances.
ROWS = [
    {"uri": "s3://bucket/photos/a.jpg", "instances": [instance([70, 5, 95, 30], 0.95), instance(BOXES["A"][1], 0.9)]},
    {"uri": "s3://bucket/photos/b.jpg", "instances": [instance([24, 20, 80, 80], 0.8)]},
    {"uri": "s3://bucket/photos/z.jpg", "instances": [instance([1, 1, 9, 9], 0.5)]},
    {"uri": "s3://bucket/photos/b2.jpg", "status": "error", "instances": None},
]


def detections(rows: list[dict]) -> list[Detection]:
    return [Detection(r["uri"], i["mask_rle"], i["box"], i["score"]) for r in rows for i in r["instances"] or ()]


def test_table_figures_are_those_of_its_detections(tmp_path: Path) -> None:
    gt, out = write_gt(tmp_path / "gt.json"), write_table(tmp_path / "out", ROWS)
    report_path = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", "--instances", "--gt-coco", str(gt), "--pred", str(out),
                                 "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    expected = evaluate_instances(gt, detections(ROWS))
    assert report["box"] == expected["box"] and report["mask"] == expected["mask"]
    assert set(report["box"]) == set(report["mask"]) == {"AP", "AP50", "AP75", "AR1", "AR10", "AR100"}
    assert 0 < report["mask"]["AP"] < report["mask"]["AP50"] < 1  # C is off: matched at 0.5, not at 0.95
    assert (report["images"], report["detections"], report["unmatched_detections"]) == (2, 3, 1)
    table = result.output.splitlines()
    header = next(i for i, line in enumerate(table) if line.split() == ["AP", "AP50", "AP75", "AR1", "AR10", "AR100"])
    assert table[header + 1].split() == ["box", *(f"{100 * v:.1f}" for v in expected["box"].values())]
    assert table[header + 2].split() == ["mask", *(f"{100 * v:.1f}" for v in expected["mask"].values())]


def test_limit_scores_the_first_images(tmp_path: Path) -> None:
    gt, out = write_gt(tmp_path / "gt.json"), write_table(tmp_path / "out", ROWS)
    result = runner.invoke(app, ["eval", "--instances", "--gt-coco", str(gt), "--pred", str(out), "--limit", "1",
                                 "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    expected = evaluate_instances(gt, detections(ROWS), ["a.jpg"])
    assert report["images"] == 1 and report["box"] == expected["box"] and report["mask"] == expected["mask"]


@pytest.mark.parametrize("flags, message", [
    (["--instances"], "give both"),
    (["--gt-coco", "GT"], "give both"),
    (["--instances", "--gt-coco", "GT", "--gt", "masks"], "without --gt, --boxes"),
    (["--instances", "--gt-coco", "GT", "--plot", "pr.png"], "without --gt, --boxes"),
])
def test_wrong_flag_combinations_are_one_line(tmp_path: Path, flags: list[str], message: str) -> None:
    gt, out = write_gt(tmp_path / "gt.json"), write_table(tmp_path / "out", ROWS)
    flags = [str(gt) if f == "GT" else f for f in flags]
    result = runner.invoke(app, ["eval", "--pred", str(out), *flags])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_ground_truth_that_is_not_coco(tmp_path: Path) -> None:
    out = write_table(tmp_path / "out", ROWS)
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": ["a.jpg"]}))
    result = runner.invoke(app, ["eval", "--instances", "--gt-coco", str(gt), "--pred", str(out)])
    assert result.exit_code == 2 and "is not a COCO instances file" in result.output


def test_no_image_of_the_table_in_the_ground_truth(tmp_path: Path) -> None:
    gt, out = write_gt(tmp_path / "gt.json"), write_table(tmp_path / "out", ROWS[2:3])
    result = runner.invoke(app, ["eval", "--instances", "--gt-coco", str(gt), "--pred", str(out)])
    assert result.exit_code == 2 and "no image of the table" in result.output and "e.g. a.jpg" in result.output


@pytest.mark.parametrize("version", ["v1", "no --instances"])
def test_a_table_without_instances_says_how_to_label(tmp_path: Path, version: str) -> None:
    rows = [{"uri": "a.jpg", "instances": None}]
    schema = LABELS_SCHEMA.remove(LABELS_SCHEMA.get_field_index("instances")) if version == "v1" else LABELS_SCHEMA
    if version == "v1":
        rows = [{"uri": "a.jpg"}]
    gt, out = write_gt(tmp_path / "gt.json"), write_table(tmp_path / "out", rows, schema)
    result = runner.invoke(app, ["eval", "--instances", "--gt-coco", str(gt), "--pred", str(out)])
    assert result.exit_code == 2 and "label with `sempart label --instances N`" in result.output


def write_scenes(images_dir: Path, gt: Path, seeds: list[int], suffix: str = ".png",
                 size: tuple[int, int] = (96, 96)) -> None:
    """Synthetic multi-object scenes as image files in `images_dir` and their objects as
    the COCO instances file `gt` (RLE masks, xywh boxes)."""
    images_dir.mkdir(parents=True)
    images, anns = [], []
    for image_id, seed in enumerate(seeds, start=1):
        rgb, masks = synthetic_instances(seed, size)
        name = f"{seed:012d}{suffix}"
        Image.fromarray(rgb).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "height": size[0], "width": size[1]})
        for mask in masks:
            x1, y1, x2, y2 = mask_box(mask)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(mask.sum()), "segmentation": mask_to_rle(mask)})
    gt.parent.mkdir(parents=True, exist_ok=True)
    gt.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}))


def instance_model(folder: Path) -> str:
    """A random tiny backbone at 96 px: enough patches (6 x 6) for MaskCut to find
    objects in the 96 x 96 scenes."""
    result = runner.invoke(app, ["init-model", "--out", str(folder), "--backbone", "vit_tiny_patch16_224",
                                 "--weights", "random", "--image-size", "96"])
    assert result.exit_code == 0, result.output
    return str(folder)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return instance_model(tmp_path_factory.mktemp("model") / "m")


def test_model_instances_figures_are_those_of_its_predictions(tmp_path: Path, model: str) -> None:
    images_dir, gt = tmp_path / "images", tmp_path / "gt.json"
    write_scenes(images_dir, gt, [0, 1])
    report_path = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", "--instances", "--gt-coco", str(gt), "--model", model,
                                 "--images", str(images_dir), "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    predictor = load_predictor(model, instances=InstanceConfig())
    paths = sorted(images_dir.iterdir())
    preds = predictor.predict([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    direct = evaluate_instances(gt, [Detection(p.name, i.rle(), i.box, i.score)
                                     for p, pred in zip(paths, preds) for i in pred.instances])
    assert report["detections"] == direct["detections"] > 0 and report["images"] == 2
    for kind in ("box", "mask"):
        assert report[kind] == direct[kind]
        assert all(0 <= v <= 1 for v in report[kind].values())
    assert report["random_backbone"] is True and report["max_instances"] == InstanceConfig().max_instances
