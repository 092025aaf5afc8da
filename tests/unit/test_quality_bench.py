"""benchmarks/quality.py runs end to end at tiny size: the shipped DUTS-TE photos, a random
backbone, and small VOC and COCO sets in their release layouts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scripts import load_script
from PIL import Image

from tests.unit.test_annotations import write_coco, write_voc

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"
DATA = Path(__file__).resolve().parents[1] / "data" / "duts-te"


quality = load_script(BENCH, "quality_bench")


def mask_box(stem: str) -> list[float]:
    rows, cols = np.nonzero(np.asarray(Image.open(DATA / "masks" / f"{stem}.png").convert("L")) > 127)
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


@pytest.fixture(scope="module")
def box_sets(tmp_path_factory) -> tuple[Path, Path]:
    """VOC07 (trainval = 8 of the 12 photos) and COCO20k (5 photos) layouts, boxes from the masks."""
    root = tmp_path_factory.mktemp("sets")
    stems = sorted(p.stem for p in (DATA / "images").iterdir())
    voc = root / "voc07" / "VOCdevkit" / "VOC2007"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for stem in stems:
        (voc / "JPEGImages" / f"{stem}.jpg").symlink_to(DATA / "images" / f"{stem}.jpg")
        write_voc(voc / "Annotations", stem, [mask_box(stem)])
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(stems[:8]) + "\n")
    coco = root / "coco20k"
    (coco / "images" / "train2014").mkdir(parents=True)
    for stem in stems:
        (coco / "images" / "train2014" / f"{stem}.jpg").symlink_to(DATA / "images" / f"{stem}.jpg")
    write_coco(coco / "instances_train2014_sel20k.json", {s: [mask_box(s)] for s in stems[:5]}, prefix="")
    return root / "voc07", coco


def test_quick_table_and_json(box_sets, capsys) -> None:
    voc07, coco20k = box_sets
    assert quality.main(["--quick", "--voc07", str(voc07), "--coco20k", str(coco20k)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(out[-1])
    table = "\n".join(out[:-1])
    assert figures["random_backbone"] is True and "RANDOM backbone" in table
    assert figures["methods"] == ["sempart", "tokencut", "tokencut-bs"]
    ours = figures["ours"]
    assert set(ours) == set(quality.OUR_ROWS)
    for label, by_dataset in ours.items():
        duts = by_dataset["DUTS-TE"]
        assert duts["n_images"] == 12
        assert all(0 <= duts[k] <= 100 for k in ("Acc", "IoU", "maxF_dataset", "maxF_image"))
        if label != "SEMPART coarse (ours)":  # CorLoc scores the fine mask's box
            assert by_dataset["VOC07"]["n_images"] == 8  # trainval only
            assert by_dataset["COCO20k"]["n_images"] == 5
            assert 0 <= by_dataset["VOC07"]["CorLoc"] <= 100
    # Published rows, with their sources; unknown figures are n/a, not invented.
    assert "| TokenCut (published) | 90.3 / 57.6 / 67.2 / - |" in table
    assert "| SelfMask (published) | 93.3 / 66.0 / - / 88.2 |" in table
    assert "| FOUND (published) | n/a |" in table
    assert "arXiv:2202.11539" in table and figures["published"]["TokenCut"]["VOC07"] == 68.8


def test_missing_layout_is_one_line(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(SystemExit, match="ECSSD: .*ground_truth_mask is missing"):
        quality.main(["--quick", "--ecssd", str(tmp_path), "--methods", "sempart"])
