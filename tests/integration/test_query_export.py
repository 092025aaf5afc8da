"""`sempart query` / `sempart export` over a labels table written here, on disk and on S3.

The table is built from synthetic scenes whose true masks are known, so every check
compares with an independent source: pyarrow reading the same files (query), the
original masks and pycocotools (COCO, PNG), the thumbnails' pixels and a headless
Chromium rendering (gallery).
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline import export, query
from pipeline.cli import app
from pipeline.schema import LABELS_SCHEMA, STATUS_EMPTY, STATUS_ERROR, STATUS_OK
from pipeline.storage import pyarrow_filesystem
from sempart_core import uri as uri_mod
from sempart_core.postprocess import connected_boxes, mask_to_rle, rle_to_mask
from sempart_core.synthetic import synthetic_scene

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Ids that a file name must not take as they are: traversal, separators, hidden, clashes.
ODD_IDS = ["../../evil", "a/b", "a_b", ".hidden", "Case", "case"]


@dataclass
class Table:
    out: str  # OUT URI
    files: list[str]  # part files, in the pyarrow file system of `out`
    rows: list[dict]
    masks: dict[str, np.ndarray]  # image_id -> true mask (rows with a mask)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _label_row(image_id: str, uri: str, status: str, mask: np.ndarray | None, score: float | None, i: int) -> dict:
    now = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=i)
    row = {
        "image_id": image_id, "uri": uri, "status": status, "error": None,
        "width": None, "height": None, "mask_rle": None, "mask_area": None, "box": None, "boxes": [],
        "score": score, "ncut": None if score is None else 1.0 - score,
        "model_id": "m" * 64, "run_id": "test", "labeled_at": now,
    }
    if mask is not None:
        box, boxes = connected_boxes(mask, min_area=4)
        row.update(
            width=mask.shape[1], height=mask.shape[0], mask_rle=mask_to_rle(mask),
            mask_area=int(mask.sum()), box=box, boxes=boxes,
        )
    return row


def build_table(root: str) -> Table:
    """Images under root/images, labels under root/out: ok rows (one with a second
    component, one whose image is gone), empty rows, error rows and odd ids, in two
    part files, plus decoys that must never be read as data."""
    rows, masks = [], {}
    sizes = [(48, 64), (64, 48), (40, 40), (56, 72)]
    ids = [f"img-{i:03d}" for i in range(10)] + ODD_IDS
    for i, image_id in enumerate(ids):
        rgb, mask = synthetic_scene(1000 + i, sizes[i % len(sizes)])
        image_uri = uri_mod.join(root, "images", f"{i:03d}.png")
        if i % 7 == 3:  # empty: nothing found
            mask = np.zeros_like(mask)
            status, score = STATUS_EMPTY, 0.01 * i
        elif i == 8:  # second, small component: `boxes` holds two
            mask = mask.copy()
            mask[1:4, 1:5] = True
            status, score = STATUS_OK, 0.9
        else:
            status, score = STATUS_OK, float(np.random.default_rng(i).uniform(0.1, 1.0))
        if i != 5:  # the image of row 5 was deleted after labelling: a placeholder
            uri_mod.write_bytes(image_uri, _png(rgb))
        rows.append(_label_row(image_id, image_uri, status, mask, score, i))
        masks[image_id] = mask
    for j in range(3):
        row = _label_row(f"bad-{j}", uri_mod.join(root, "images", f"bad-{j}.jpg"), STATUS_ERROR, None, None, 100 + j)
        row["error"] = "NotAnImageError: not a recognised image format <script>alert(1)</script>"
        rows.append(row)
    uri_mod.write_bytes(uri_mod.join(root, "images", "bad-0.jpg"), b"not an image")

    out = uri_mod.join(root, "out")
    fs, base = pyarrow_filesystem(out)
    fs.create_dir(base, recursive=True)
    half = len(rows) // 2
    files = []
    for n, chunk in enumerate([rows[:half], rows[half:]]):
        path = f"{base}/part-test-{n:06d}.parquet"
        pq.write_table(pa.Table.from_pylist(chunk, schema=LABELS_SCHEMA), path, filesystem=fs, compression="zstd")
        files.append(path)
    decoy = pa.Table.from_pylist(rows[:4], schema=LABELS_SCHEMA)
    for name in ["_tmp/x.parquet", "_tmp/part-9.parquet", "_runs/part-0.parquet", "_part-x.parquet", ".part-y.parquet"]:
        fs.create_dir(f"{base}/{name}".rsplit("/", 1)[0], recursive=True)
        pq.write_table(decoy, f"{base}/{name}", filesystem=fs)
    with fs.open_output_stream(f"{base}/_runs/test.json") as f:
        f.write(b"{}")
    return Table(out=out, files=files, rows=rows, masks=masks)


@pytest.fixture(params=["local", "s3"])
def table(request, tmp_path: Path) -> Table:
    root = str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_bucket") + "/labels"
    return build_table(root)


@pytest.fixture
def local_table(tmp_path: Path) -> Table:
    return build_table(str(tmp_path / "data"))


def reference(table: Table) -> pa.Table:
    """The table as pyarrow reads the part files, independently of pipeline.query."""
    fs, _ = pyarrow_filesystem(table.out)
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in table.files])


def rows_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float) and isinstance(y[k], float):
                assert x[k] == pytest.approx(y[k], rel=1e-6), k
            else:
                assert x[k] == y[k], k


# --- query ---------------------------------------------------------------------------


def test_open_labels_reads_only_part_files(table: Table):
    dataset = query.open_labels(table.out)
    assert sorted(dataset.files) == sorted(table.files)
    assert dataset.count_rows() == len(table.rows)


def test_query_equals_pyarrow(table: Table):
    ref = reference(table)
    got = query.run_query(table.out, "SELECT * FROM labels ORDER BY image_id")
    assert got.column_names == ref.column_names
    rows_equal(got.to_pylist(), ref.sort_by("image_id").to_pylist())

    got = query.run_query(table.out, "SELECT image_id, score FROM labels WHERE score > 0.5 ORDER BY score DESC, image_id")
    want = ref.filter(pc.greater(ref["score"], 0.5)).select(["image_id", "score"])
    want = want.sort_by([("score", "descending"), ("image_id", "ascending")])
    rows_equal(got.to_pylist(), want.to_pylist())

    got = query.run_query(
        table.out,
        "WITH s AS (SELECT status, mask_area FROM labels) "
        "SELECT status, count(*) AS n, sum(mask_area) AS area FROM s GROUP BY status ORDER BY status",
    )
    want = ref.group_by("status").aggregate([("status", "count"), ("mask_area", "sum")]).sort_by("status")
    assert got["status"].to_pylist() == want["status"].to_pylist()
    assert got["n"].to_pylist() == want["status_count"].to_pylist()
    assert [None if v is None else int(v) for v in got["area"].to_pylist()] == want["mask_area_sum"].to_pylist()

    limited = query.run_query(table.out, "SELECT image_id FROM labels ORDER BY image_id", limit=3)
    assert limited["image_id"].to_pylist() == sorted(ref["image_id"].to_pylist())[:3]
    empty = query.run_query(table.out, "SELECT image_id FROM labels WHERE false")
    assert empty.num_rows == 0 and empty.column_names == ["image_id"]


def test_cli_query_formats_equal_pyarrow(table: Table):
    ref = reference(table).sort_by("image_id")
    sql = "SELECT image_id, status, score, box, labeled_at FROM labels ORDER BY image_id"
    runner = CliRunner()

    res = runner.invoke(app, ["query", table.out, sql, "--format", "json"])
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in res.stdout.splitlines()]
    assert [g["image_id"] for g in got] == ref["image_id"].to_pylist()
    for g, score, box, when in zip(got, ref["score"].to_pylist(), ref["box"].to_pylist(), ref["labeled_at"].to_pylist()):
        assert (g["score"] is None) == (score is None) and (score is None or math.isclose(g["score"], score, rel_tol=1e-6))
        assert g["box"] == box
        assert dt.datetime.fromisoformat(g["labeled_at"]) == when

    res = runner.invoke(app, ["query", table.out, sql, "--format", "csv"])
    assert res.exit_code == 0, res.output
    records = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["status"] for r in records] == ref["status"].to_pylist()
    assert [json.loads(r["box"]) if r["box"] else None for r in records] == ref["box"].to_pylist()

    res = runner.invoke(app, ["query", table.out, "SELECT status, count(*) AS n FROM labels GROUP BY 1 ORDER BY 1"])
    assert res.exit_code == 0, res.output
    counts = {s: ref["status"].to_pylist().count(s) for s in set(ref["status"].to_pylist())}
    for status, n in counts.items():
        assert any(line.split() == [status, str(n)] for line in res.stdout.splitlines()), res.stdout


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM labels",
        "SELECT 1; DROP TABLE labels",
        "COPY labels TO '/tmp/x.csv'",
        "ATTACH '/tmp/x.db'",
        "SET enable_external_access = true",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_parquet('s3://somewhere/else.parquet')",
        "SELECT nope FROM labels",
        "SELEC 1",
    ],
)
def test_bad_queries_get_one_line(local_table: Table, sql: str):
    with pytest.raises(query.QueryError):
        query.run_query(local_table.out, sql)
    res = CliRunner().invoke(app, ["query", local_table.out, sql])
    assert res.exit_code == 2
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error:"), res.stderr


def test_missing_table_is_a_clear_error(tmp_path: Path):
    res = CliRunner().invoke(app, ["query", str(tmp_path / "nothing"), "SELECT 1"])
    assert res.exit_code == 2 and "part-*.parquet" in res.stderr


# --- export --------------------------------------------------------------------------


def _coco(path: Path):
    from pycocotools.coco import COCO

    return COCO(str(path))


def test_coco_export_matches_table_and_truth(table: Table, tmp_path: Path):
    path = tmp_path / "coco" / "labels.json"
    summary = export.export_coco(table.out, path)
    coco = _coco(path)
    by_id = {r["image_id"]: r for r in table.rows}
    ok = [r for r in table.rows if r["status"] == STATUS_OK]
    with_image = [r for r in table.rows if r["status"] in (STATUS_OK, STATUS_EMPTY)]
    assert len(coco.getAnnIds()) == len(ok) == summary.annotations
    assert len(coco.getImgIds()) == len(with_image) == summary.written
    assert summary.skipped == len(table.rows) - len(with_image)
    assert coco.loadCats(coco.getCatIds()) == [export.COCO_CATEGORY]
    for image in coco.loadImgs(coco.getImgIds()):
        row = by_id[image["sempart_image_id"]]
        assert (image["file_name"], image["width"], image["height"]) == (row["uri"], row["width"], row["height"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert len(anns) == (1 if row["status"] == STATUS_OK else 0)
        for ann in anns:
            truth = table.masks[row["image_id"]]
            decoded = coco.annToMask(ann).astype(bool)
            np.testing.assert_array_equal(decoded, truth)
            np.testing.assert_array_equal(decoded, rle_to_mask(row["mask_rle"]))
            ys, xs = np.nonzero(truth)
            if row["image_id"] != "img-008":  # one component: box = mask bounds
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            x1, y1, x2, y2 = row["box"]
            assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]
            assert ann["area"] == int(truth.sum())
            assert ann["score"] == pytest.approx(row["score"], rel=1e-6)
            assert (ann["category_id"], ann["iscrowd"]) == (1, 0)


def test_coco_export_where(local_table: Table, tmp_path: Path):
    path = tmp_path / "high.json"
    res = CliRunner().invoke(app, ["export", local_table.out, "--coco", str(path), "--where", "score > 0.5"])
    assert res.exit_code == 0, res.output
    coco = _coco(path)
    want = sorted(r["image_id"] for r in local_table.rows if r["status"] == STATUS_OK and r["score"] > 0.5)
    got = sorted(coco.loadImgs(a["image_id"])[0]["sempart_image_id"] for a in coco.loadAnns(coco.getAnnIds()))
    assert got == want and len(want) >= 2

    res = CliRunner().invoke(app, ["export", local_table.out, "--coco", str(path), "--where", "1); DROP TABLE labels; (1"])
    assert res.exit_code == 2 and "error:" in res.stderr
    res = CliRunner().invoke(app, ["export", local_table.out])
    assert res.exit_code == 2 and "--coco" in res.stderr


def test_cli_export_masks_and_gallery_together(local_table: Table, tmp_path: Path):
    res = CliRunner().invoke(
        app, ["export", local_table.out, "--masks", str(tmp_path / "m"), "--gallery", str(tmp_path / "g"),
              "--where", "status <> 'error'"]
    )
    assert res.exit_code == 0, res.output
    kept = [r for r in local_table.rows if r["status"] != STATUS_ERROR]
    assert len(list((tmp_path / "m").iterdir())) == len(kept)
    assert (tmp_path / "g" / "index.html").read_text().count('<figure class="card') == len(kept)


def test_masks_export_equals_rle_with_safe_names(table: Table, tmp_path: Path):
    folder = tmp_path / "masks"
    summary = export.export_masks(table.out, folder)
    with_mask = [r for r in table.rows if r["mask_rle"] is not None]
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == len(with_mask) == summary.written
    assert all(p.resolve().parent == folder.resolve() for p in folder.iterdir())
    assert not any(n.startswith(".") or ".." in n for n in files)
    assert len({n.lower() for n in files}) == len(files)  # distinct even case-insensitively
    names = export.UniqueNames()
    for row in reference(table).to_pylist():  # the table's row order decides the names
        if row["mask_rle"] is None:
            continue
        png = np.array(Image.open(folder / f"{names(row['image_id'])}.png"))
        assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
        np.testing.assert_array_equal(png > 127, rle_to_mask(row["mask_rle"]))
        np.testing.assert_array_equal(png > 127, table.masks[row["image_id"]])


def test_gallery_thumbnails_show_overlays(table: Table, tmp_path: Path):
    folder = tmp_path / "gallery"
    summary = export.export_gallery(table.out, folder)
    page = (folder / "index.html").read_text()
    assert summary.written == len(table.rows) == page.count('<figure class="card')
    # Unreadable: the deleted image of row 5 and the three error rows' URIs.
    assert summary.unreadable == 4
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    thumbs = sorted((folder / "thumbs").iterdir())
    assert len(thumbs) == len(table.rows)

    names = export.UniqueNames()
    name_of = {r["image_id"]: names(r["image_id"]) for r in reference(table).to_pylist()}
    row = next(r for r in table.rows if r["image_id"] == "img-000")
    thumb = np.asarray(Image.open(folder / "thumbs" / f"{name_of['img-000']}.jpg").convert("RGB")).astype(float)
    mask = np.asarray(Image.fromarray(table.masks["img-000"]).resize(thumb.shape[1::-1], Image.Resampling.NEAREST))
    inner = mask & np.roll(mask, 3, 0) & np.roll(mask, -3, 0) & np.roll(mask, 3, 1) & np.roll(mask, -3, 1)
    rgb, _ = synthetic_scene(1000, (row["height"], row["width"]))
    plain = np.asarray(Image.fromarray(rgb).resize(thumb.shape[1::-1], Image.Resampling.BILINEAR)).astype(float)
    expected = plain * (1 - export.MASK_ALPHA) + np.array(export.MASK_RGB) * export.MASK_ALPHA
    assert np.abs(thumb[inner] - expected[inner]).mean() < 12  # tinted inside the mask
    outside = ~mask & np.roll(~mask, 4, 0) & np.roll(~mask, -4, 0) & np.roll(~mask, 4, 1) & np.roll(~mask, -4, 1)
    outside[:6], outside[-6:], outside[:, :6], outside[:, -6:] = False, False, False, False
    assert np.abs(thumb[outside] - plain[outside]).mean() < 12  # untouched elsewhere
    x1, y1, x2, y2 = (v * thumb.shape[1] / row["width"] for v in row["box"])
    edge = thumb[int(y1) + 1, int(x1) + 2 : int(x2) - 2]  # the top edge of the main box
    assert np.abs(edge - np.array(export.BOX_RGB)).mean() < 40

    placeholder = np.asarray(Image.open(folder / "thumbs" / f"{name_of['img-005']}.jpg").convert("RGB")).astype(float)
    background = ~np.asarray(
        Image.fromarray(table.masks["img-005"]).resize(placeholder.shape[1::-1], Image.Resampling.NEAREST)
    )
    assert np.abs(placeholder[background].mean(axis=0) - np.array(export.PLACEHOLDER_RGB)).max() < 15


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_gallery_in_headless_chromium(local_table: Table, tmp_path: Path):
    folder = tmp_path / "gallery"
    export.export_gallery(local_table.out, folder)
    url = (folder / "index.html").resolve().as_uri()

    dom = _chromium(["--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    scores = [float(s) for s in re.findall(r'data-score="([^"]+)"', dom.stdout)]
    assert len(scores) == len(local_table.rows)
    assert scores == sorted(scores)  # the inline script sorted ascending: worst first
    assert scores[0] == float("-inf")  # error rows (no score) first

    shot = tmp_path / "gallery.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1200,900", url], tmp_path)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (900, 1200)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    tinted = (r > 150) & (g < 130) & (b > 70) & (r - g > 90)  # mask overlay blended with the image
    boxes = (r > 200) & (g > 170) & (b < 80)  # yellow box outlines
    assert tinted.sum() > 2000, tinted.sum()
    assert boxes.sum() > 200, boxes.sum()
