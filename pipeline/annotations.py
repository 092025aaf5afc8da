"""Ground-truth boxes for CorLoc: Pascal VOC XML folders and COCO JSON files.

Both readers return a `BoxSet`: ``{image stem: [[x1, y1, x2, y2], ...]}`` in this
project's box convention (pixels, ``x2``/``y2`` exclusive, see `sempart_core.postprocess`)
plus each image's recorded size, following LOST/TokenCut's readers so that CorLoc
compares with their figures:

- VOC: each ``<object>``'s own ``<bndbox>`` (never the boxes of its ``<part>`` children:
  head, hand, foot); values are 1-based inclusive pixel indices, so ``xmin - 1`` and
  ``ymin - 1`` give the box; difficult and truncated objects count.
- COCO ``bbox`` is ``[x, y, w, h]`` -> ``[x, y, x + w, y + h]`` rounded to integers;
  crowd annotations (``iscrowd = 1``) are left out.
- COCO20k is the fixed list of 19,817 COCO train2014 images that LOST and TokenCut
  evaluate (their ``datasets/coco_20k_filenames.txt``). With the list, every listed
  image is scored, and one without a non-crowd box counts as a miss, as in TokenCut's
  loop. Without a list, an image without a box has nothing to match and is left out;
  the set counts those (``n_dropped``) so that the report can say so.
"""
from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

Boxes = dict[str, list[list[float]]]
COCO20K_IMAGES = 19_817  # lines of coco_20k_filenames.txt


@dataclass
class BoxSet:
    """The ground truth CorLoc is scored against.

    ``boxes`` maps every image to score to its boxes; an empty list is an image that
    counts as a miss. ``sizes`` holds the (height, width) an annotation records, so that
    a map of another size can be brought to the annotated pixels. ``complete``: every
    image of the set must be scored (a fixed list such as COCO20k), none may be missing.
    """

    name: str  # "VOC", "COCO" or "COCO20k"
    boxes: Boxes
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    n_dropped: int = 0  # images of the annotations left out for having no (non-crowd) box
    complete: bool = False

    def describe(self) -> dict:
        """What the report says about the ground truth."""
        return {
            "annotations": self.name,
            "n_without_box_counted_as_miss": sum(1 for b in self.boxes.values() if not b),
            "n_dropped_without_box": self.n_dropped,
        }


def _voc_file(path: Path) -> tuple[list[list[float]], tuple[int, int] | None]:
    """One VOC XML: each object's own box (exclusive xyxy) and the recorded (height, width)."""
    try:
        root = ET.parse(path).getroot()
        found = [
            [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            for obj in root.findall("object")
        ]
        size = root.find("size")
        hw = None if size is None else (int(size.findtext("height")), int(size.findtext("width")))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a VOC annotation ({err})") from err
    return [[x1 - 1, y1 - 1, x2, y2] for x1, y1, x2, y2 in found], hw


def read_voc_boxes(folder: str | Path) -> BoxSet:
    """Boxes of a VOC ``Annotations/`` folder (or a VOC year folder holding one)."""
    folder = Path(folder)
    if (folder / "Annotations").is_dir():
        folder = folder / "Annotations"
    files = sorted(folder.glob("*.xml"))
    if not files:
        raise ValueError(f"no VOC annotation (*.xml) in {folder}")
    result = BoxSet("VOC", {})
    for path in files:
        boxes, hw = _voc_file(path)
        if not boxes:
            result.n_dropped += 1
            continue
        result.boxes[path.stem] = boxes
        if hw is not None:
            result.sizes[path.stem] = hw
    return result


def read_image_list(path: str | Path) -> list[str]:
    """Image stems of a list file, one image path per line (``coco_20k_filenames.txt``:
    ``train2014/COCO_train2014_000000560992.jpg``)."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the image list ({err})") from err
    stems = [Path(line).stem for line in lines if line]
    if not stems:
        raise ValueError(f"{path}: the image list is empty")
    if len(set(stems)) != len(stems):
        raise ValueError(f"{path}: the image list names some images twice")
    return stems


def read_coco_boxes(path: str | Path, only: list[str] | None = None) -> BoxSet:
    """Boxes of a COCO instances JSON, keyed by the stem of each image's file_name.

    With ``only`` (the stems of the COCO20k list), the set is exactly those images, each
    of which the JSON must hold; without, every image that has a non-crowd box.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        images = {im["id"]: im for im in data["images"]}
        per_image: dict[int, list[list[float]]] = defaultdict(list)
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0) == 1:
                continue
            x, y, w, h = ann["bbox"]
            per_image[ann["image_id"]].append([float(round(v)) for v in (x, y, x + w, y + h)])
        stems = {i: Path(im["file_name"]).stem for i, im in images.items()}
        sizes = {stems[i]: (int(im["height"]), int(im["width"])) for i, im in images.items() if "height" in im}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a COCO instances JSON ({err})") from err
    unknown = set(per_image) - set(images)
    if unknown:
        raise ValueError(f"{path}: annotations refer to {len(unknown)} image ids not in 'images'")
    if only is None:
        boxes = {stems[i]: per_image[i] for i in images if per_image.get(i)}
        return BoxSet("COCO", boxes, sizes, n_dropped=len(images) - len(boxes))
    return _coco_subset(path, only, stems, per_image, sizes)


def _coco_subset(path: Path, only: list[str], stems: dict[int, str], per_image: dict[int, list],
                 sizes: dict[str, tuple[int, int]]) -> BoxSet:
    """The listed images of a COCO JSON, an image without a non-crowd box kept as a miss."""
    by_stem = {stem: per_image.get(i, []) for i, stem in stems.items()}
    absent = [s for s in only if s not in by_stem]
    if absent:
        raise ValueError(
            f"{path}: {len(absent)} of the {len(only)} listed images are not in this JSON (e.g. "
            f"{', '.join(absent[:3])}); COCO20k needs instances_train2014.json"
        )
    if len(only) != COCO20K_IMAGES:
        logger.warning("the COCO20k list has %d images, the published one %d", len(only), COCO20K_IMAGES)
    return BoxSet("COCO20k", {s: by_stem[s] for s in only}, {s: sizes[s] for s in only if s in sizes},
                  complete=True)


def read_boxes(location: str | Path, coco20k_list: str | Path | None = None) -> BoxSet:
    """VOC folder or COCO ``.json`` file, chosen by what `location` is; with
    `coco20k_list`, the COCO20k subset of a COCO train2014 JSON."""
    location = Path(location)
    if location.is_dir():
        if coco20k_list is not None:
            raise ValueError("--coco20k-list goes with a COCO .json (instances_train2014.json), not a VOC folder")
        return read_voc_boxes(location)
    if location.suffix.lower() == ".json" and location.is_file():
        only = read_image_list(coco20k_list) if coco20k_list is not None else None
        return read_coco_boxes(location, only)
    raise ValueError(f"--boxes {location}: give a VOC Annotations folder or a COCO .json file")
