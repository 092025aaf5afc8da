"""The label pipeline's inference stage finishing maps on the device (`finish="device"`,
run here on CPU tensors) gives the rows the CPU finish gives, on the shipped photos:
the same masks (IoU >= 0.999), boxes within a pixel, scores within 1e-3, instances too."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.label import Infer, finish_batch
from pipeline.labeler import DECODED_SCHEMA, instance_config
from sempart_core.artifact import read_artifact_info
from sempart_core.images import decode_image
from sempart_core.postprocess import rle_to_mask

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "data" / "duts-te" / "images").glob("*.jpg"))


def encoded_block() -> pa.Table:
    """Decode-stage rows as --decode gpu gives them (encoded bytes, in_h null), and one bad image."""
    rows = [{"chunk": 0, "row": i, "image_id": p.stem, "uri": str(p), "pixels": p.read_bytes()}
            for i, p in enumerate(PHOTOS)]
    rows.append({"chunk": 0, "row": len(rows), "image_id": "bad", "uri": "bad", "pixels": b"not an image"})
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def rows_with(model: str, finish: str, instances: int = 0) -> list[dict]:
    info = read_artifact_info(model)
    actor = Infer(model, model_id=info.model_id, device="cpu", batch_size=4, decode="gpu", finish=finish,
                  instances=instances)
    inferred = actor(encoded_block())
    return finish_batch(inferred, info.config.post, info.model_id, "run", instances=instance_config(instances,
                                                                                                   "maskcut")).to_pylist()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_device_finished_rows_equal_cpu_finished_rows(model: str) -> None:
    on_cpu, on_device = rows_with(model, "cpu"), rows_with(model, "device")
    assert len(on_cpu) == len(on_device) == len(PHOTOS) + 1
    assert len({decode_image(p.read_bytes()).shape[:2] for p in PHOTOS}) > 1  # several shapes: several device groups
    for a, b in zip(on_cpu, on_device):
        assert (a["image_id"], a["status"], a["width"], a["height"]) == (b["image_id"], b["status"], b["width"],
                                                                         b["height"])
        if a["status"] == "error":
            assert a["error"] == b["error"] and a["error"].startswith("NotAnImageError")
            continue
        mask_a, mask_b = rle_to_mask(a["mask_rle"]), rle_to_mask(b["mask_rle"])
        assert mask_a.shape == (a["height"], a["width"]) and iou(mask_a, mask_b) >= 0.999
        assert abs(a["mask_area"] - b["mask_area"]) <= 0.001 * max(a["mask_area"], b["mask_area"])
        assert (a["box"] is None) == (b["box"] is None)
        if a["box"] is not None:
            assert max(abs(x - y) for x, y in zip(a["box"], b["box"])) <= 1
        assert abs(a["score"] - b["score"]) <= 1e-3 and abs(a["ncut"] - b["ncut"]) <= 1e-6


def test_device_finish_keeps_the_instances(model: str) -> None:
    on_cpu, on_device = rows_with(model, "cpu", instances=2), rows_with(model, "device", instances=2)
    for a, b in zip(on_cpu, on_device):
        if a["status"] == "error":
            continue
        assert len(a["instances"]) == len(b["instances"])
        for x, y in zip(a["instances"], b["instances"]):
            assert iou(rle_to_mask(x["mask_rle"]), rle_to_mask(y["mask_rle"])) >= 0.999
