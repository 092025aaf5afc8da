"""Ground-truth box readers for CorLoc: VOC XML folders and COCO JSON."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.annotations import read_boxes, read_coco_boxes, read_image_list, read_voc_boxes


def voc_box(box: list[float]) -> str:
    """A <bndbox> for a box in our exclusive xyxy convention (VOC stores 1-based inclusive)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return f"<bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>"


def write_voc(folder: Path, stem: str, boxes: list[list[float]], difficult: bool = False,
              size: tuple[int, int] = (375, 500), parts: list[list[float]] = ()) -> None:
    """A VOC annotation of an image of `size` (height, width); every object carries the
    `parts` boxes (head, hand, ...) as VOC's person layouts do."""
    part_xml = "".join(f"<part><name>head</name>{voc_box(b)}</part>" for b in parts)
    objects = "".join(
        f"<object><name>person</name><difficult>{int(difficult)}</difficult>{voc_box(b)}{part_xml}</object>"
        for b in boxes
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.xml").write_text(
        f"<annotation><filename>{stem}.jpg</filename><size><width>{size[1]}</width><height>{size[0]}</height>"
        f"<depth>3</depth></size>{objects}</annotation>"
    )


def write_coco(path: Path, boxes: dict[str, list[list[float]]], crowd: dict[str, list[float]] | None = None,
               prefix: str = "COCO_train2014_", sizes: dict[str, tuple[int, int]] | None = None) -> None:
    """A COCO instances JSON; `sizes` (height, width) per stem, 480 x 640 when not given."""
    images, annotations = [], []
    for image_id, (stem, image_boxes) in enumerate(sorted(boxes.items()), start=1):
        height, width = (sizes or {}).get(stem, (480, 640))
        images.append({"id": image_id, "file_name": f"{prefix}{stem}.jpg", "width": width, "height": height})
        for x1, y1, x2, y2 in image_boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": 1})
        if crowd and stem in crowd:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 1,
                                "bbox": crowd[stem], "category_id": 1})
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))


def test_voc_boxes_are_shifted_to_exclusive_pixel_edges(tmp_path: Path) -> None:
    ann = tmp_path / "VOC2007" / "Annotations"
    write_voc(ann, "000005", [[0, 0, 500, 375], [10, 20, 30, 40]])
    write_voc(ann, "000007", [[5, 6, 7, 8]], difficult=True)  # difficult objects count
    (ann / "000009.xml").write_text("<annotation><filename>000009.jpg</filename></annotation>")
    expected = {"000005": [[0.0, 0.0, 500.0, 375.0], [10.0, 20.0, 30.0, 40.0]], "000007": [[5.0, 6.0, 7.0, 8.0]]}
    voc = read_voc_boxes(ann)
    assert voc.boxes == expected and voc.name == "VOC"
    assert voc.sizes == {"000005": (375, 500), "000007": (375, 500)}
    assert voc.n_dropped == 1  # 000009 has no object: nothing to match
    assert read_voc_boxes(tmp_path / "VOC2007").boxes == expected  # the year folder works too
    assert read_boxes(ann).boxes == expected


def test_voc_part_boxes_are_not_objects(tmp_path: Path) -> None:
    """A person's <part> boxes (head, hand, foot) are not ground-truth objects: counted
    as objects they would give CorLoc a hit for a box on a head (issue 21)."""
    write_voc(tmp_path, "2008_000008", [[100, 50, 300, 370]], parts=[[150, 50, 200, 100], [120, 200, 140, 220]])
    assert read_voc_boxes(tmp_path).boxes == {"2008_000008": [[100.0, 50.0, 300.0, 370.0]]}


def test_coco_boxes_by_file_stem_without_crowds(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    write_coco(path, {"000000000009": [[1, 2, 11, 22]], "000000000025": [[0, 0, 5, 5], [3, 3, 9, 9]]},
               crowd={"000000000009": [0, 0, 100, 100]})
    coco = read_coco_boxes(path)
    assert coco.boxes == {
        "COCO_train2014_000000000009": [[1.0, 2.0, 11.0, 22.0]],
        "COCO_train2014_000000000025": [[0.0, 0.0, 5.0, 5.0], [3.0, 3.0, 9.0, 9.0]],
    }
    assert coco.name == "COCO" and coco.sizes["COCO_train2014_000000000009"] == (480, 640)
    assert read_boxes(path) == coco


def coco20k_files(tmp_path: Path) -> tuple[Path, Path]:
    """A train2014 JSON of four images (one with only a crowd box, one unlisted) and a
    COCO20k list of three of them, in the list file's own layout."""
    path = tmp_path / "instances_train2014.json"
    write_coco(path, {"000000000009": [[1, 2, 11, 22]], "000000000025": [], "000000000030": [[0, 0, 5, 5]],
                      "000000000042": [[3, 3, 9, 9]]},
               crowd={"000000000025": [0, 0, 100, 100]})
    listed = tmp_path / "coco_20k_filenames.txt"
    listed.write_text("train2014/COCO_train2014_000000000009.jpg\ntrain2014/COCO_train2014_000000000025.jpg\n"
                      "train2014/COCO_train2014_000000000042.jpg\n")
    return path, listed


def test_coco20k_is_the_listed_images_and_counts_crowd_only_ones_as_misses(tmp_path: Path) -> None:
    """COCO20k is a fixed list (LOST/TokenCut's coco_20k_filenames.txt), not every image
    of the JSON; an image whose only box is a crowd stays in, as a miss, as in TokenCut's
    loop (issue 21)."""
    path, listed = coco20k_files(tmp_path)
    assert read_image_list(listed) == [
        "COCO_train2014_000000000009", "COCO_train2014_000000000025", "COCO_train2014_000000000042"]
    coco20k = read_boxes(path, coco20k_list=listed)
    assert coco20k.name == "COCO20k" and coco20k.complete
    assert coco20k.boxes == {
        "COCO_train2014_000000000009": [[1.0, 2.0, 11.0, 22.0]],
        "COCO_train2014_000000000025": [],
        "COCO_train2014_000000000042": [[3.0, 3.0, 9.0, 9.0]],
    }
    assert coco20k.describe() == {"annotations": "COCO20k", "n_without_box_counted_as_miss": 1,
                                  "n_dropped_without_box": 0}
    # Without the list: every image with a box, and the crowd-only one dropped and counted.
    coco = read_boxes(path)
    assert coco.name == "COCO" and not coco.complete and len(coco.boxes) == 3
    assert coco.describe()["n_dropped_without_box"] == 1
    # A listed image the JSON does not hold: another split's JSON, refused.
    listed.write_text(listed.read_text() + "train2014/COCO_train2014_000000000077.jpg\n")
    with pytest.raises(ValueError, match="1 of the 4 listed images are not in this JSON"):
        read_boxes(path, coco20k_list=listed)
    with pytest.raises(ValueError, match="not a VOC folder"):
        read_boxes(tmp_path, coco20k_list=listed)


def test_bad_annotations_give_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.xml").write_text("<annotation><object><bndbox><xmin>x</xmin></bndbox></object></annotation>")
    with pytest.raises(ValueError, match="not a VOC annotation"):
        read_voc_boxes(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(ValueError, match="not a COCO instances JSON"):
        read_coco_boxes(bad)
    with pytest.raises(ValueError, match="no VOC annotation"):
        read_voc_boxes(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else tmp_path)
    with pytest.raises(ValueError, match="give a VOC Annotations folder or a COCO .json"):
        read_boxes(tmp_path / "missing.txt")
