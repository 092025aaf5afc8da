"""Ground-truth boxes for CorLoc: Pascal VOC XML folders and COCO JSON files.

Both readers return ``{image stem: [[x1, y1, x2, y2], ...]}`` in this project's box
convention (pixels, ``x2``/``y2`` exclusive, see `sempart_core.postprocess`), following
LOST/TokenCut's readers so that CorLoc compares with their figures:

- VOC ``<bndbox>`` values are 1-based inclusive pixel indices, so ``xmin - 1`` and
  ``ymin - 1`` give the box; every object counts, difficult and truncated ones too.
- COCO ``bbox`` is ``[x, y, w, h]`` -> ``[x, y, x + w, y + h]`` rounded to integers;
  crowd annotations (``iscrowd = 1``) are left out.

Images without a box are left out (CorLoc has nothing to match there).
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

Boxes = dict[str, list[list[float]]]


def read_voc_boxes(folder: str | Path) -> Boxes:
    """Boxes of a VOC ``Annotations/`` folder (or a VOC year folder holding one)."""
    folder = Path(folder)
    if (folder / "Annotations").is_dir():
        folder = folder / "Annotations"
    files = sorted(folder.glob("*.xml"))
    if not files:
        raise ValueError(f"no VOC annotation (*.xml) in {folder}")
    boxes: Boxes = {}
    for path in files:
        try:
            root = ET.parse(path).getroot()
            found = [
                [float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
                for box in root.iter("bndbox")
            ]
        except (ET.ParseError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a VOC annotation ({err})") from err
        if found:
            boxes[path.stem] = [[x1 - 1, y1 - 1, x2, y2] for x1, y1, x2, y2 in found]
    return boxes


def read_coco_boxes(path: str | Path) -> Boxes:
    """Boxes of a COCO instances JSON, keyed by the stem of each image's file_name."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        names = {im["id"]: Path(im["file_name"]).stem for im in data["images"]}
        per_image: dict[int, list[list[float]]] = defaultdict(list)
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0) == 1:
                continue
            x, y, w, h = ann["bbox"]
            per_image[ann["image_id"]].append([float(round(v)) for v in (x, y, x + w, y + h)])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a COCO instances JSON ({err})") from err
    unknown = set(per_image) - set(names)
    if unknown:
        raise ValueError(f"{path}: annotations refer to {len(unknown)} image ids not in 'images'")
    return {names[i]: b for i, b in per_image.items()}


def read_boxes(location: str | Path) -> Boxes:
    """VOC folder or COCO ``.json`` file, chosen by what `location` is."""
    location = Path(location)
    if location.is_dir():
        return read_voc_boxes(location)
    if location.suffix.lower() == ".json" and location.is_file():
        return read_coco_boxes(location)
    raise ValueError(f"--boxes {location}: give a VOC Annotations folder or a COCO .json file")
