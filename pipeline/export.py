"""Export the labels table to what supervised training and human review use.

- COCO instances JSON: one image per `ok`/`empty` row, one annotation per `ok` row
  (the stored RLE as segmentation, bbox from the xyxy box, area = mask_area).
- PNG masks: one 0/255 PNG per row that has a mask, named after its image_id.
- HTML gallery: thumbnails with the mask and boxes drawn over the source image,
  sortable by score (ascending by default, so the worst labels come first).

Rows come from `pipeline.query` (the same DuckDB path as `sempart query`, with an
optional `--where` predicate) in record batches, and every output is written as rows
arrive, so memory does not grow with the table (except one short name per row, kept
to give every file a distinct name).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import html
import io
import json
import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from pipeline.outdir import OutDir
from pipeline.query import query_batches, where_query
from pipeline.schema import STATUS_EMPTY, STATUS_ERROR, STATUS_OK
from pipeline.sources import ImageReader
from pipeline.storage import redact
from sempart_core.images import decode_image
from sempart_core.postprocess import rle_to_mask
from sempart_core.uri import atomic_local_file

logger = logging.getLogger(__name__)

BATCH_ROWS = 256
COCO_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}
THUMB_SIZE = 256  # longest side of a gallery thumbnail, in pixels
MASK_RGB = (255, 0, 170)
MASK_ALPHA = 0.45
BOX_RGB = (255, 215, 0)
OTHER_BOX_RGB = (0, 230, 255)
PLACEHOLDER_RGB = (185, 185, 185)
INSTANCE_RGB = [(255, 0, 170), (0, 200, 255), (255, 150, 0), (110, 220, 0), (170, 90, 255), (255, 60, 60),
                (0, 220, 160), (255, 230, 0)]  # one colour per instance, in turn
MAX_NAME = 120
GALLERY_THREADS = 4  # each may hold one decoded full-size image

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_DOT_RUNS = re.compile(r"\.{2,}")


@dataclass
class ExportSummary:
    """What an export wrote, for the command's summary line."""

    target: str
    rows: int = 0  # rows the query returned
    written: int = 0  # COCO images, PNG files or gallery cards
    annotations: int = 0  # COCO only
    skipped: int = 0  # rows without what the format needs (e.g. error rows)
    unreadable: int = 0  # gallery only: source images that could not be read
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        parts = [f"{self.rows} rows", f"{self.written} written"]
        if self.annotations:
            parts.append(f"{self.annotations} annotations")
        if self.skipped:
            parts.append(f"{self.skipped} skipped")
        if self.unreadable:
            parts.append(f"{self.unreadable} images unreadable")
        return f"{self.target}: {', '.join(parts)} in {self.seconds:.1f}s"


# --- file names ----------------------------------------------------------------------


def safe_name(image_id: str) -> str:
    """A file stem made of [A-Za-z0-9._-] only, never `..`, never hidden, never empty."""
    name = _UNSAFE_CHARS.sub("_", image_id)
    name = _DOT_RUNS.sub("_", name).strip(".")
    return name[:MAX_NAME] or "_"


class UniqueNames:
    """Distinct safe stems for image ids; the same input order always gives the same names.

    A clash (two ids that sanitise alike, or a repeated id) gets a suffix from the sha1
    of the id, then a counter. Compared case-insensitively, so names stay distinct on
    macOS and Windows file systems too.
    """

    def __init__(self) -> None:
        self._used: set[str] = set()

    def __call__(self, image_id: str) -> str:
        base = safe_name(image_id)
        name = base
        if name.lower() in self._used:
            name = f"{base}-{hashlib.sha1(image_id.encode('utf-8')).hexdigest()[:10]}"
            suffix_base, counter = name, 2
            while name.lower() in self._used:
                name = f"{suffix_base}-{counter}"
                counter += 1
        self._used.add(name.lower())
        return name


# --- shared plumbing -----------------------------------------------------------------


def iter_rows(
    out: OutDir, columns: list[str], where: str | None, batch_rows: int = BATCH_ROWS
) -> Iterator[list[dict[str, Any]]]:
    """The selected columns of the rows matching `where`, one record batch at a time."""
    for batch in query_batches(out, where_query(where, columns), batch_rows):
        yield batch.to_pylist()


@contextmanager
def _atomic_text(path: Path) -> Iterator[IO[str]]:
    """A text file that appears at `path` only when complete (temp file + rename)."""
    with atomic_local_file(str(path)) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8")
        yield text
        text.flush()
        text.detach()  # the raw file stays open for atomic_local_file to sync and rename


def _save_image(image: Image.Image, path: Path, fmt: str, **params: Any) -> None:
    """Write with a rename, so no half-written image is left."""
    with atomic_local_file(str(path)) as f:
        image.save(f, format=fmt, **params)


def _count(summary: ExportSummary, status: str) -> None:
    summary.statuses[status] = summary.statuses.get(status, 0) + 1


# --- COCO ----------------------------------------------------------------------------

COCO_COLUMNS = ["image_id", "uri", "width", "height", "status", "mask_rle", "mask_area", "box", "score", "instances"]


def coco_bbox(box: list[float]) -> list[float]:
    """xyxy with exclusive x2/y2 -> COCO xywh (w = x2 - x1 exactly)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def coco_annotation(rle: dict[str, Any], area: int, box: list[float], score: float | None,
                    annotation_id: int, image_num: int) -> dict[str, Any]:
    """One COCO annotation (category "object"), its RLE as stored."""
    return {
        "id": annotation_id,
        "image_id": image_num,
        "category_id": COCO_CATEGORY["id"],
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"]},
        "area": int(area),
        "bbox": coco_bbox(box),
        "score": _finite_or_none(score),
        "iscrowd": 0,
    }


def row_objects(row: dict[str, Any]) -> list[tuple[dict, int, list[float], float | None]]:
    """(RLE, area, box, score) of each object of a row: its instances when the run
    labelled them (`--instances`), else its one mask when it is `ok`."""
    if row.get("instances") is not None:
        return [(i["mask_rle"], i["area"], i["box"], i["score"]) for i in row["instances"]]
    if row["status"] == STATUS_OK:
        return [(row["mask_rle"], row["mask_area"], row["box"], row["score"])]
    return []


def export_coco(out_uri: str | OutDir, path: str | Path, where: str | None = None) -> ExportSummary:
    """Write a COCO instances file for the rows matching `where`.

    Images: every `ok` and `empty` row (`empty` ones are images without objects);
    `error` rows have no size or mask and are skipped. Annotations: one per instance
    when the run labelled instances, else one per `ok` row (`row_objects`).
    Images go to the file as they come and annotations to a temporary file that is
    appended at the end, so one pass over the table suffices.
    """
    start = time.perf_counter()
    labels = OutDir.at(out_uri)
    path = Path(path)
    summary = ExportSummary(target=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_text(path) as out, tempfile.TemporaryFile("w+", encoding="utf-8", dir=path.parent) as anns:
        info = {"description": "sempart pseudo-labels", "source": labels.name, "where": where}
        out.write(f'{{"info": {json.dumps(info)}, "licenses": [], "categories": [{json.dumps(COCO_CATEGORY)}],\n"images": [')
        for rows in iter_rows(labels, COCO_COLUMNS, where):
            for row in rows:
                _add_coco_row(row, summary, out, anns)
        out.write('\n],\n"annotations": [')
        anns.seek(0)
        shutil.copyfileobj(anns, out)
        out.write("\n]}\n")
    summary.seconds = time.perf_counter() - start
    logger.debug("COCO: %s", summary.line())
    return summary


def _add_coco_row(row: dict[str, Any], summary: ExportSummary, out: IO[str], anns: IO[str]) -> None:
    summary.rows += 1
    status = row["status"]
    _count(summary, status)
    has_mask = row["mask_rle"] is not None and row["width"] is not None and row["height"] is not None
    if status not in (STATUS_OK, STATUS_EMPTY) or not has_mask or (status == STATUS_OK and row["box"] is None):
        summary.skipped += 1
        if status != STATUS_ERROR:
            logger.warning("skipping %s row %r: no mask, size or box", status, row["image_id"])
        return
    summary.written += 1
    image = {
        "id": summary.written,
        "file_name": row["uri"],
        "width": int(row["width"]),
        "height": int(row["height"]),
        "sempart_image_id": row["image_id"],
    }
    out.write(("," if summary.written > 1 else "") + "\n" + json.dumps(image, ensure_ascii=False))
    for obj in row_objects(row):
        summary.annotations += 1
        annotation = coco_annotation(*obj, summary.annotations, summary.written)
        anns.write(("," if summary.annotations > 1 else "") + "\n" + json.dumps(annotation))


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# --- PNG masks -----------------------------------------------------------------------

MASK_COLUMNS = ["image_id", "status", "mask_rle", "instances"]


def export_masks(out_uri: str | OutDir, folder: str | Path, where: str | None = None) -> ExportSummary:
    """One `<safe image_id>.png` per row that has a mask: 8-bit, object = 255; or, when
    the run labelled instances, the instance ids (0 background, k for the k-th instance,
    largest first; 16-bit past 255 instances).

    `empty` rows give an all-zero PNG (a valid "no object" label); `error` rows none.
    """
    start = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary(target=str(folder))
    names = UniqueNames()
    for rows in iter_rows(OutDir.at(out_uri), MASK_COLUMNS, where):
        for row in rows:
            summary.rows += 1
            _count(summary, row["status"])
            if row["status"] == STATUS_ERROR or row["mask_rle"] is None:
                summary.skipped += 1
                continue
            if row["instances"] is not None:
                image = Image.fromarray(instance_ids(rle_to_mask(row["mask_rle"]).shape, row["instances"]))
            else:
                image = Image.fromarray(rle_to_mask(row["mask_rle"]).astype(np.uint8) * 255)
            _save_image(image, folder / f"{names(row['image_id'])}.png", "PNG")
            summary.written += 1
    summary.seconds = time.perf_counter() - start
    logger.debug("masks: %s", summary.line())
    return summary


def instance_ids(shape: tuple[int, int], instances: list[dict[str, Any]]) -> np.ndarray:
    """An image of instance ids: 0 background, k where the k-th instance is."""
    ids = np.zeros(shape, np.uint8 if len(instances) < 256 else np.uint16)
    for k, inst in enumerate(instances, start=1):
        ids[rle_to_mask(inst["mask_rle"])] = k
    return ids


# --- HTML gallery --------------------------------------------------------------------

GALLERY_COLUMNS = ["image_id", "uri", "width", "height", "status", "error", "mask_rle", "box", "boxes", "score",
                   "instances"]


def load_rgb(uri: str, reader: ImageReader | None = None) -> np.ndarray | None:
    """The image a row's `uri` names as RGB (a file, a tar member, a Parquet row: see
    `ImageReader`, given the labels' OUT), or None if it cannot be read or decoded."""
    try:
        return decode_image((reader or ImageReader()).read(uri))
    except Exception as exc:  # missing, unreadable, not an image: all get a placeholder
        logger.debug("gallery: cannot read %s: %s", redact(uri), exc)
        return None


def render_thumbnail(
    rgb: np.ndarray | None,
    mask: np.ndarray | None,
    box: list[float] | None,
    boxes: list[list[float]] | None,
    size: int = THUMB_SIZE,
    fallback_hw: tuple[int, int] = (192, 256),
    instances: list[tuple[np.ndarray, list[float]]] | None = None,
) -> Image.Image:
    """The image (or a grey placeholder) scaled so its longest side is `size`, with the
    mask blended in colour and outlined, and the boxes drawn (main box thick, other
    components thin); with `instances` (mask, box) each instance instead, filled,
    outlined and boxed in its own colour.

    Boxes are in the mask's pixels (xyxy, exclusive end), so they are scaled by the
    thumbnail/mask ratio; a mask of another size than the image is stretched to it.
    """
    height, width = rgb.shape[:2] if rgb is not None else (mask.shape if mask is not None else fallback_hw)
    scale = size / max(height, width)
    tw, th = max(1, round(width * scale)), max(1, round(height * scale))
    if rgb is not None:
        thumb = Image.fromarray(rgb).resize((tw, th), Image.Resampling.BILINEAR)
    else:
        thumb = Image.new("RGB", (tw, th), PLACEHOLDER_RGB)
    if instances is not None:
        shapes = [(m, [b], INSTANCE_RGB[k % len(INSTANCE_RGB)], 2) for k, (m, b) in enumerate(instances)]
    elif mask is not None and mask.size > 0:
        shapes = [(mask, [], MASK_RGB, 1)]
    else:
        shapes = []
    for shape_mask, _, colour, _ in shapes:
        thumb = _paint(thumb, shape_mask, colour)
    draw = ImageDraw.Draw(thumb)
    for shape_mask, shape_boxes, colour, width_px in shapes:
        sx, sy = tw / shape_mask.shape[1], th / shape_mask.shape[0]
        for b in shape_boxes:
            _draw_box(draw, b, sx, sy, colour, width_px)
    if instances is None and shapes:
        sx, sy = tw / mask.shape[1], th / mask.shape[0]
        for other in boxes or []:
            _draw_box(draw, other, sx, sy, OTHER_BOX_RGB, 1)
        if box is not None:
            _draw_box(draw, box, sx, sy, BOX_RGB, 2)
    if rgb is None:
        draw.text((6, 6), "image unavailable", fill=(60, 60, 60))
    return thumb


def _paint(thumb: Image.Image, mask: np.ndarray, colour: tuple) -> Image.Image:
    """`mask` blended over `thumb` in `colour`, with a solid outline (which keeps it
    visible over objects of a similar colour)."""
    fg = Image.fromarray(mask.astype(np.uint8) * 255).resize(thumb.size, Image.Resampling.NEAREST)
    fill = Image.new("RGB", thumb.size, colour)
    thumb = Image.composite(fill, thumb, fg.point(lambda v: round(v * MASK_ALPHA)))
    thumb.paste(fill, mask=ImageChops.subtract(fg, fg.filter(ImageFilter.MinFilter(3))))
    return thumb


def _draw_box(draw: ImageDraw.ImageDraw, box: list[float], sx: float, sy: float, colour: tuple, width: int) -> None:
    x1, y1, x2, y2 = box
    # Exclusive ends: the last covered pixel column is x2 - 1.
    draw.rectangle([x1 * sx, y1 * sy, max(x1 * sx, x2 * sx - 1), max(y1 * sy, y2 * sy - 1)], outline=colour, width=width)


def _gallery_card(
    row: dict[str, Any], name: str, order: int, thumbs: Path, size: int, reader: ImageReader
) -> tuple[str, bool]:
    """Render and save one thumbnail; return its HTML card and whether the image was unreadable."""
    rgb = load_rgb(row["uri"], reader)
    mask = rle_to_mask(row["mask_rle"]) if row["mask_rle"] is not None and row["status"] != STATUS_ERROR else None
    fallback = (row["height"], row["width"]) if row["height"] and row["width"] else (192, 256)
    instances = None if row["instances"] is None else [(rle_to_mask(i["mask_rle"]), i["box"]) for i in row["instances"]]
    thumb = render_thumbnail(rgb, mask, row["box"], row["boxes"], size, fallback, instances)
    _save_image(thumb, thumbs / f"{name}.jpg", "JPEG", quality=85)
    return _card_html(row, f"thumbs/{quote(name)}.jpg", thumb.size, order), rgb is None


def _card_html(row: dict[str, Any], src: str, thumb_wh: tuple[int, int], order: int) -> str:
    score = _finite_or_none(row["score"])
    status = str(row["status"])
    image_id = html.escape(str(row["image_id"]))
    error = ""
    if row["error"]:
        error = f'<p class="error" title="{html.escape(row["error"])}">{html.escape(row["error"][:160])}</p>'
    return (
        f'<figure class="card {html.escape(status)}" data-score="{score if score is not None else "-Infinity"}"'
        f' data-order="{order}"><img src="{src}" width="{thumb_wh[0]}" height="{thumb_wh[1]}"'
        f' alt="{image_id}" loading="lazy"><figcaption><span class="id" title="{html.escape(str(row["uri"]))}">'
        f'{image_id}</span><span class="score">score {f"{score:.3f}" if score is not None else "n/a"}</span>'
        f'<span class="status">{html.escape(status)}</span>{error}</figcaption></figure>\n'
    )


_GALLERY_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sempart labels</title>
<style>
body{font-family:system-ui,sans-serif;margin:16px;background:#f4f4f4;color:#222}
header{display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
h1{font-size:20px;margin:0 0 8px}
#grid{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.card{margin:0;background:#fff;border:1px solid #ccc;border-radius:4px;padding:6px;width:%(size)dpx}
.card img{display:block;max-width:100%%;height:auto;margin:auto}
figcaption{font-size:12px;display:flex;flex-wrap:wrap;gap:8px;margin-top:4px}
.id{font-family:monospace;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;max-width:100%%}
.status{font-weight:bold}.ok .status{color:#1a7f37}.empty .status{color:#9a6700}.error .status{color:#cf222e}
.error p.error{color:#cf222e;margin:0;word-break:break-word}
</style></head><body>
<header><h1>sempart labels</h1><p>%(source)s</p>
<label>Sort by score <select id="order"><option value="1" selected>ascending (worst first)</option>
<option value="-1">descending</option></select></label></header>
<main id="grid">
"""

_GALLERY_TAIL = """</main>
<p id="summary">%(summary)s</p>
<script>
function sortCards(dir){const g=document.getElementById("grid");
const cards=Array.from(g.children);
cards.sort((a,b)=>(dir*(parseFloat(a.dataset.score)-parseFloat(b.dataset.score))||0)
  ||(a.dataset.order-b.dataset.order));
cards.forEach(c=>g.appendChild(c));}
const order=document.getElementById("order");
order.addEventListener("change",()=>sortCards(Number(order.value)));
sortCards(1);
</script></body></html>
"""


def export_gallery(
    out_uri: str | OutDir, folder: str | Path, where: str | None = None, size: int = THUMB_SIZE
) -> ExportSummary:
    """A static `index.html` with one thumbnail per row (all statuses) in `thumbs/`.

    Source images are read by the row's `uri`; one that cannot be read gets a grey
    placeholder (with the mask and boxes still drawn) instead of stopping the export.
    Thumbnails of a batch are rendered by a few threads (reading is I/O bound).
    """
    start = time.perf_counter()
    folder = Path(folder)
    thumbs = folder / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary(target=str(folder / "index.html"))
    names = UniqueNames()
    labels = OutDir.at(out_uri)
    reader = ImageReader(labels)
    source = f"labels at {labels.name}" + (f", where {where}" if where else "")
    with _atomic_text(folder / "index.html") as out, concurrent.futures.ThreadPoolExecutor(GALLERY_THREADS) as pool:
        out.write(_GALLERY_HEAD % {"size": size, "source": html.escape(source)})
        for rows in iter_rows(labels, GALLERY_COLUMNS, where):
            jobs = []
            for row in rows:
                jobs.append((row, names(row["image_id"]), summary.rows))
                summary.rows += 1
                _count(summary, row["status"])
            for card, unreadable in pool.map(lambda job: _gallery_card(*job, thumbs, size, reader), jobs):
                out.write(card)
                summary.written += 1
                summary.unreadable += unreadable
        counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.statuses.items()))
        out.write(_GALLERY_TAIL % {"summary": html.escape(f"{summary.rows} images: {counts or 'none'}")})
    summary.seconds = time.perf_counter() - start
    logger.debug("gallery: %s", summary.line())
    return summary
