"""Ground-truth box readers for CorLoc: VOC XML folders and COCO JSON."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.annotations import read_boxes, read_coco_boxes, read_voc_boxes


def write_voc(folder: Path, stem: str, boxes: list[list[float]], difficult: bool = False) -> None:
    """A VOC annotation; `boxes` in our exclusive xyxy convention (VOC stores 1-based inclusive)."""
    objects = "".join(
        f"<object><name>cat</name><difficult>{int(difficult)}</difficult><bndbox>"
        f"<xmin>{int(x1) + 1}</xmin><ymin>{int(y1) + 1}</ymin><xmax>{int(x2)}</xmax><ymax>{int(y2)}</ymax>"
        "</bndbox></object>"
        for x1, y1, x2, y2 in boxes
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.xml").write_text(
        f"<annotation><filename>{stem}.jpg</filename><size><width>500</width><height>375</height>"
        f"<depth>3</depth></size>{objects}</annotation>"
    )


def write_coco(path: Path, boxes: dict[str, list[list[float]]], crowd: dict[str, list[float]] | None = None,
               prefix: str = "COCO_train2014_") -> None:
    images, annotations = [], []
    for image_id, (stem, image_boxes) in enumerate(sorted(boxes.items()), start=1):
        images.append({"id": image_id, "file_name": f"{prefix}{stem}.jpg", "width": 640, "height": 480})
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
    assert read_voc_boxes(ann) == expected
    assert read_voc_boxes(tmp_path / "VOC2007") == expected  # the year folder works too
    assert read_boxes(ann) == expected


def test_coco_boxes_by_file_stem_without_crowds(tmp_path: Path) -> None:
    path = tmp_path / "instances.json"
    write_coco(path, {"000000000009": [[1, 2, 11, 22]], "000000000025": [[0, 0, 5, 5], [3, 3, 9, 9]]},
               crowd={"000000000009": [0, 0, 100, 100]})
    assert read_coco_boxes(path) == {
        "COCO_train2014_000000000009": [[1.0, 2.0, 11.0, 22.0]],
        "COCO_train2014_000000000025": [[0.0, 0.0, 5.0, 5.0], [3.0, 3.0, 9.0, 9.0]],
    }
    assert read_boxes(path) == read_coco_boxes(path)


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
