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
from tests.unit.test_cli_eval_instances import instance_model, write_scenes

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"
DATA = Path(__file__).resolve().parents[1] / "data" / "duts-te"


quality = load_script(BENCH, "quality_bench")


def mask_box(stem: str) -> list[float]:
    rows, cols = np.nonzero(np.asarray(Image.open(DATA / "masks" / f"{stem}.png").convert("L")) > 127)
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


def mask_size(stem: str) -> tuple[int, int]:
    return np.asarray(Image.open(DATA / "masks" / f"{stem}.png")).shape[:2]


@pytest.fixture(scope="module")
def box_sets(tmp_path_factory) -> tuple[Path, Path, Path]:
    """VOC07 (trainval = 8 of the 12 photos) and COCO layouts, boxes from the masks; a
    COCO20k list of 6 photos, one of them with only a crowd box (a miss)."""
    root = tmp_path_factory.mktemp("sets")
    stems = sorted(p.stem for p in (DATA / "images").iterdir())
    voc = root / "voc07" / "VOCdevkit" / "VOC2007"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for stem in stems:
        (voc / "JPEGImages" / f"{stem}.jpg").symlink_to(DATA / "images" / f"{stem}.jpg")
        write_voc(voc / "Annotations", stem, [mask_box(stem)], size=mask_size(stem))
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(stems[:8]) + "\n")
    coco = root / "coco20k"
    (coco / "images" / "train2014").mkdir(parents=True)
    for stem in stems:
        (coco / "images" / "train2014" / f"{stem}.jpg").symlink_to(DATA / "images" / f"{stem}.jpg")
    boxes = {s: [mask_box(s)] if i != 5 else [] for i, s in enumerate(stems[:7])}
    write_coco(coco / "instances_train2014.json", boxes, prefix="", crowd={stems[5]: [0, 0, 50, 50]},
               sizes={s: mask_size(s) for s in stems[:7]})
    listing = root / "coco_20k_filenames.txt"
    listing.write_text("".join(f"train2014/{s}.jpg\n" for s in stems[:6]))
    return root / "voc07", coco, listing


def test_quick_table_and_json(box_sets, capsys) -> None:
    voc07, coco20k, listing = box_sets
    assert quality.main(["--quick", "--voc07", str(voc07), "--coco20k", str(coco20k),
                         "--coco20k-list", str(listing)]) == 0
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
            assert by_dataset["COCO20k"]["n_images"] == 6  # the listed ones, not every image of the JSON
            assert by_dataset["COCO20k"]["n_without_box"] == 1
            assert 0 <= by_dataset["VOC07"]["CorLoc"] <= 100
    # Published rows, each with its variant and source; unknown figures are n/a, not invented.
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if "(published)" in line]
    by_variant = {(r[0], r[1]): r[2:] for r in rows}
    assert by_variant["TokenCut (published)", "ViT-S/16 (DINO), no bilateral solver"][:3] == [
        "90.3 / 57.6 / 67.2 / -", "68.8", "58.8"]
    assert by_variant["TokenCut (published)", "ViT-S/8 (DINO), no bilateral solver, CorLoc only"][:3] == [
        "n/a", "67.3", "60.7"]  # the default backbone is S/8
    assert by_variant["SelfMask (published)", "not stated by the source read (bilateral solver or not)"][0] == (
        "93.3 / 66.0 / - / 88.2")
    assert all(r[-1] for r in rows) and all(len(r) == 6 for r in rows)  # every row has a source
    assert "not read here" in by_variant["FOUND (published)", "single and multi mode, with and without the "
                                         "bilateral solver"][-1]
    assert "YangtaoWANG95/TokenCut README" in table
    ours = [line for line in table.splitlines() if "| this run |" in line]
    assert len(ours) == len(quality.OUR_ROWS)
    assert "COCO20k: 6 images, 1 without a non-crowd box counted as misses" in table
    assert "GT above half its full scale" in table
    published = {(p["name"], p["variant"]): p for p in figures["published"]}
    assert published["TokenCut", "ViT-S/8 (DINO), no bilateral solver, CorLoc only"]["COCO20k"] == 60.7


def test_coco20k_needs_its_image_list(box_sets) -> None:
    """Any COCO JSON is not COCO20k: without LOST/TokenCut's list the run is refused (issue 21)."""
    with pytest.raises(SystemExit, match="COCO20k: give --coco20k-list coco_20k_filenames.txt"):
        quality.main(["--quick", "--coco20k", str(box_sets[1]), "--methods", "sempart"])


def test_missing_layout_is_one_line(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(SystemExit, match="ECSSD: .*ground_truth_mask is missing"):
        quality.main(["--quick", "--ecssd", str(tmp_path), "--methods", "sempart"])


def test_coco_val_table_has_ours_and_the_published_rows(tmp_path, capsys) -> None:
    """A val2017-layout folder of 3 synthetic scenes: our row's figures are the JSON's;
    the published rows carry their source and print 'not read' for what no source here
    gives."""
    root = tmp_path / "coco"
    write_scenes(root / "val2017", root / "annotations" / "instances_val2017.json", [0, 1, 2], suffix=".jpg")
    model = instance_model(tmp_path / "model")
    assert quality.main(["--model", model, "--coco-val", str(root)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(out[-1])["coco_val"]
    table = [line.strip("| ").split(" | ") for line in out[:-1] if line.startswith("| ")]
    assert table[0][2:-1] == [f"{kind} {k}" for kind in ("box", "mask") for k in ("AP", "AP50", "AP75", "AR1",
                                                                                   "AR10", "AR100")]
    rows = {(r[0], r[1]): r[2:] for r in table[1:]}
    ours = rows[quality.OUR_INSTANCES]
    assert ours[-1] == "this run" and figures["ours"]["images"] == 3 and figures["ours"]["detections"] > 0
    assert ours[:-1] == [f"{100 * figures['ours'][kind][k]:.1f}" for kind in ("box", "mask")
                         for k in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100")]
    cascade = next(v for (name, variant), v in rows.items() if name == "CutLER (published)" and "CutLER*" in variant)
    assert cascade[:6] == ["not read", "21.9", "not read", "not read", "not read", "32.7"]
    assert cascade[6:12] == ["not read"] * 6 and "facebookresearch/CutLER README" in cascade[-1]
    maskcut = next(v for (name, _), v in rows.items() if name == "MaskCut (published)")
    assert maskcut[:12] == ["not read"] * 12 and "not read here" in maskcut[-1]
    assert any("3 of the 3 val2017 images" in line for line in out)
