"""`sempart label --instances N` (schema version 2): every object of synthetic scenes of
2 to 5 objects in the `instances` column, the same as the predictor's for the same image,
through the COCO, mask and gallery exports; `--instances-from sempart`; a run's instances
fixed for its resume; and a version-1 table (no `instances` column) still queried and
exported. A tiny RANDOM backbone at 128 px (8 x 8 patches): this checks the plumbing;
instance quality is tested in tests/unit/test_instances.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_args import ONE_ACTOR
from instance_rows import check_instances
from PIL import Image
from pycocotools.coco import COCO
from typer.testing import CliRunner

from pipeline.cli import app
from sempart_core.artifact import save_untrained_artifact
from sempart_core.config import InstanceConfig, SempartConfig
from sempart_core.images import decode_image
from sempart_core.postprocess import rle_to_mask
from sempart_core.predictor import load_predictor
from sempart_core.synthetic import synthetic_instances

pytestmark = pytest.mark.integration
SCENES = 6


@pytest.fixture(scope="module")
def model128(tmp_path_factory) -> str:
    cfg = SempartConfig()
    cfg.backbone.name, cfg.backbone.weights, cfg.data.image_size = "vit_tiny_patch16_224", "random", 128
    out = tmp_path_factory.mktemp("model128") / "m"
    save_untrained_artifact(str(out), cfg)
    return str(out)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    for seed in range(SCENES):
        rgb, _ = synthetic_instances(seed, (128, 160))
        Image.fromarray(rgb).save(folder / f"scene{seed}.png")
    return folder


def label(model: str, src: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["label", "--model", model, "--input", str(src), "--out", str(out),
                                    "--no-gpu", "--batch-size", "3", *ONE_ACTOR, *extra])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_instances_through_label_and_exports(ray_session, model128: str, scenes: Path, tmp_path: Path) -> None:
    ray_session.data.DataContext.get_current().enable_progress_bars = False
    out = tmp_path / "labels"
    result = label(model128, scenes, out, "--instances", "3", "--rows-per-file", "4")
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    predictor = load_predictor(model128, instances=InstanceConfig(max_instances=3))
    agreement = []
    for row in rows:
        masks = check_instances(row, 3)
        (pred,) = predictor.predict([decode_image((scenes / Path(row["uri"]).name).read_bytes())])
        assert len(masks) == len(pred.instances)
        agreement += [iou(m, inst.mask) for m, inst in zip(masks, pred.instances)]
    assert sum(len(r["instances"]) for r in rows) >= SCENES  # objects were found
    assert np.mean(agreement) > 0.95, agreement  # the same instances as the predictor's (rounding aside)
    run = json.loads(next((out / "_runs").glob("*.json")).read_text())
    assert (run["instances"], run["instances_from"], run["schema_version"]) == (3, "maskcut", 2)

    coco_file = tmp_path / "coco.json"
    exported = CliRunner().invoke(app, ["export", str(out), "--coco", str(coco_file), "--masks", str(tmp_path / "m"),
                                        "--gallery", str(tmp_path / "g")])
    assert exported.exit_code == 0, exported.output
    coco = COCO(str(coco_file))
    assert len(coco.getAnnIds()) == sum(len(r["instances"]) for r in rows)  # one annotation per instance
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["object"]
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert coco.annToMask(ann).sum() == ann["area"] > 0
    for row in rows:  # instance-id PNGs: 0 background, k for the k-th instance
        ids = np.asarray(Image.open(next((tmp_path / "m").glob(f"{row['image_id'][:8]}*.png"))))
        assert sorted(np.unique(ids)) == list(range(len(row["instances"]) + 1))

    resumed = label(model128, scenes, out, "--resume", "--instances", "2")
    assert resumed.exit_code == 2 and "--instances 2 differs from the run's 3" in resumed.output


def test_instances_from_sempart_start_with_the_models_mask(ray_session, model128: str, scenes: Path,
                                                          tmp_path: Path) -> None:
    """The model's own mask is an instance (unless it covers no whole patch, as a random
    model's may), as the predictor in mode sempart gives it."""
    out = tmp_path / "labels"
    result = label(model128, scenes, out, "--instances", "2", "--instances-from", "sempart")
    assert result.exit_code == 0, result.output
    predictor = load_predictor(model128, instances=InstanceConfig(max_instances=2, mode="sempart"))
    agreement, with_model_mask = [], 0
    for row in pq.read_table(out).to_pylist():
        masks = check_instances(row, 2)
        (pred,) = predictor.predict([decode_image((scenes / Path(row["uri"]).name).read_bytes())])
        agreement += [iou(m, inst.mask) for m, inst in zip(masks, pred.instances)]
        if row["status"] == "ok":
            with_model_mask += any(np.array_equal(m, rle_to_mask(row["mask_rle"])) for m in masks)
    assert np.mean(agreement) > 0.95, agreement
    assert with_model_mask >= SCENES // 2


def test_a_version_1_table_still_queries_and_exports(ray_session, model128: str, scenes: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "labels"
    assert label(model128, scenes, out).exit_code == 0
    for part in out.glob("part-*.parquet"):  # as sempart wrote it before schema version 2
        table = pq.read_table(part)
        assert table.column("instances").null_count == table.num_rows  # no --instances: null
        old = table.drop_columns(["instances"]).replace_schema_metadata({b"sempart_schema_version": b"1"})
        pq.write_table(old, part)
    query = CliRunner().invoke(app, ["query", str(out), "SELECT count(*) AS n, count(instances) AS i FROM labels",
                                     "--format", "json"])
    assert query.exit_code == 0 and json.loads(query.output) == {"n": SCENES, "i": 0}, query.output
    coco_file = tmp_path / "coco.json"
    exported = CliRunner().invoke(app, ["export", str(out), "--coco", str(coco_file), "--masks", str(tmp_path / "m")])
    assert exported.exit_code == 0, exported.output
    coco = COCO(str(coco_file))
    assert len(coco.getAnnIds()) == sum(1 for r in pq.read_table(out).to_pylist() if r["status"] == "ok")
    assert len(list((tmp_path / "m").glob("*.png"))) == SCENES
