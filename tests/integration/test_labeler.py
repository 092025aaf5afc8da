"""The public Ray Data stage (`from pipeline import Labeler`), as the README shows it: any
Ray Dataset with an `image` column of encoded bytes, or a `path`/`uri` column, through
`map_batches(Labeler, ...)` gives the output table's columns, equal to what the
predictor gives for the same images, with the input's own columns kept and a bad image
as an error row."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import Labeler
from pipeline.schema import LABELS_SCHEMA, image_id_for
from sempart_core.images import decode_image
from sempart_core.postprocess import rle_to_mask
from sempart_core.predictor import load_predictor

pytestmark = pytest.mark.integration
PHOTOS = sorted((Path(__file__).resolve().parents[1] / "data" / "duts-te" / "images").glob("*.jpg"))[:5]


def check_rows(rows: list[dict], datas: dict[str, bytes], model: str) -> None:
    predictor = load_predictor(model)
    for row in rows:
        assert set(LABELS_SCHEMA.names) <= set(row)
        data = datas[row["name"]]
        if data == b"not an image":
            assert row["status"] == "error" and row["error"].startswith("NotAnImageError"), row
            continue
        assert row["status"] in ("ok", "empty") and row["error"] is None
        (pred,) = predictor.predict([decode_image(data)])
        assert (row["width"], row["height"]) == (pred.mask.shape[1], pred.mask.shape[0])
        mask = rle_to_mask(row["mask_rle"])
        assert (mask == pred.mask).mean() > 0.999 and row["box"] == pred.box
        assert abs(row["score"] - pred.score) < 1e-4
        assert row["model_id"] == predictor.model_id


def test_labeler_on_a_dataset_of_image_bytes(ray_session, model: str) -> None:
    datas = {p.stem: p.read_bytes() for p in PHOTOS} | {"broken": b"not an image"}
    ds = ray_session.data.from_items([{"name": k, "image": v} for k, v in datas.items()])
    labels = ds.map_batches(Labeler, fn_constructor_kwargs={"model": model}, concurrency=1, batch_size=4)
    rows = labels.take_all()
    assert sorted(r["name"] for r in rows) == sorted(datas)
    check_rows(rows, datas, model)
    assert "image" not in rows[0]  # the bytes are not carried along
    assert len({r["image_id"] for r in rows}) == len(datas)  # named by their bytes


def test_labeler_reads_paths(ray_session, model: str, tmp_path: Path) -> None:
    datas = {}
    for i, photo in enumerate(PHOTOS[:3]):
        buf = io.BytesIO()
        Image.open(photo).convert("RGB").resize((96, 64)).save(buf, "PNG")
        datas[f"p{i}"] = buf.getvalue()
        (tmp_path / f"p{i}.png").write_bytes(buf.getvalue())
    items = [{"name": k, "path": str(tmp_path / f"{k}.png")} for k in datas] + [
        {"name": "missing", "path": str(tmp_path / "missing.png")}]
    labels = ray_session.data.from_items(items).map_batches(
        Labeler, fn_constructor_kwargs={"model": model, "batch_size": 2}, concurrency=1, batch_size=8,
        batch_format="pyarrow")
    rows = {r["name"]: r for r in labels.take_all()}
    check_rows([r for k, r in rows.items() if k != "missing"], datas, model)
    assert rows["missing"]["status"] == "error" and "FileNotFoundError" in rows["missing"]["error"]
    assert rows["p0"]["uri"] == rows["p0"]["path"] == str(tmp_path / "p0.png")  # where it was read
    assert rows["p0"]["image_id"] == image_id_for(str(tmp_path / "p0.png"))


def test_labeler_says_what_a_batch_lacks(model: str) -> None:
    with pytest.raises(ValueError, match="rows need an 'image' column"):
        Labeler(model)({"name": np.array(["a"])})
