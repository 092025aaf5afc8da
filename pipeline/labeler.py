"""`Labeler`: the labelling stage as a Ray Data class, for pipelines of your own.

    import ray
    from pipeline import Labeler

    ds = ray.data.read_parquet("s3://bucket/photos.parquet")   # an `image` column of encoded bytes
    labels = ds.map_batches(Labeler, fn_constructor_kwargs={"model": "s3://bucket/models/v1"},
                            concurrency=8, num_gpus=1, batch_size=32)

Each actor loads the model once. A batch's images are encoded bytes (the `image`
column, or `image_column`), or are read from their `path` or `uri` (local, file:// or
s3://, with sempart's S3 settings and retries); they are decoded (JPEGs on the model's
device with decode="gpu"), inferred in batches of one input shape within the token
budget (`sempart_core.batching.infer_in_batches`, host-to-device copies overlapping
compute) and finished into the output table's columns (docs/design.md, "Output
table"), the input's other columns kept. A bad image is an `error` row, never a failed
batch.

`sempart label` runs the same class as its inference stage (`label.Infer`): there the
CPU tasks before it decode the images (with --decode gpu the actor reads them itself,
`label.ChunkInfer`) and the CPU tasks after it finish the maps (`finish_rows`; with
--finish device the actor does it on its device), so that the actor's CPU time goes to
the model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.schema import LABELS_SCHEMA, STATUS_ERROR, image_id_for
from pipeline.storage import read_object, redact
from sempart_core.batching import DEFAULT_MAX_BATCH_TOKENS
from sempart_core.config import InstanceConfig, PostConfig
from sempart_core.heap import long_lived
from sempart_core.images import decode_image, prepare_image
from sempart_core.postprocess import (
    CompactPrediction,
    Instance,
    Prediction,
    RawInstances,
    RawPrediction,
    finish_instances,
    finish_raw,
    rle_to_mask,
)

IMAGE_COLUMN = "image"  # the default column of encoded bytes
LOCATION_COLUMNS = ("path", "uri")  # read when there is no image column

# Rows between the stages of `sempart label` (pipeline/label.py): the decode tasks give
# DECODED rows, the inference actor INFERRED rows, the finish tasks ROWS for the writer.
DECODED_SCHEMA = pa.schema(
    [
        ("chunk", pa.int64()),
        ("row", pa.int64()),  # in the chunk; -1 on the end row
        ("chunk_rows", pa.int64()),  # the end row: the chunk's row count (or label.CHUNK_FAILED); null on image rows
        ("s3_retries", pa.int64()),  # the end row: S3 retries made reading the chunk (storage.read_object)
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("error", pa.string()),
        ("in_h", pa.int32()),
        ("in_w", pa.int32()),
        ("pixels", pa.large_binary()),  # prepared uint8 [in_h, in_w, 3], or the encoded image when in_h is null
    ]
)
RAW_INSTANCES_TYPE = pa.struct([  # postprocess.RawInstances.pack(): patch masks as bits, per-instance floats
    ("shape", pa.list_(pa.int32())), ("bits", pa.binary()), ("ncut", pa.list_(pa.float32())),
    ("score", pa.list_(pa.float32())), ("first_is_model", pa.bool_()),
])
INFERRED_SCHEMA = pa.schema(
    [f for f in DECODED_SCHEMA if f.name != "pixels"] + [
        pa.field("device_s", pa.float64()),  # the row's share of the actor's time in device stages (decode, model, finish)
        pa.field("prob", pa.large_binary()),  # float32 [in_h, in_w]; null where the device finished the map
        pa.field("ncut", pa.float64()),
        # finished on the device (CompactPrediction): the mask as uint32 run lengths, and its values
        pa.field("runs", pa.large_binary()),
        pa.field("mask_area", pa.int64()),
        pa.field("box", LABELS_SCHEMA.field("box").type),
        pa.field("boxes", LABELS_SCHEMA.field("boxes").type),
        pa.field("score", pa.float32()),
        pa.field("instances", RAW_INSTANCES_TYPE),  # with --instances; null otherwise
        pa.field("image", pa.large_binary()),  # the prepared image, for instances refined on it (bilateral)
    ]
)
ROWS_SCHEMA = pa.schema(list(DECODED_SCHEMA)[:4] + [INFERRED_SCHEMA.field("device_s")] + list(LABELS_SCHEMA),
                        metadata=LABELS_SCHEMA.metadata)


def one_line(exc: BaseException) -> str:
    """An exception as a row's `error`: its class and message on one line."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


@dataclass
class Finished:
    """One image finished where the model ran (`device_finish`): its label without the
    full-size maps, and its patch-level instances (finished on the CPU: they need the
    image for the bilateral solver)."""

    compact: CompactPrediction
    instances: RawInstances | None = None


def prediction_columns(pred: Prediction | CompactPrediction, instances: list[Instance] | None) -> dict[str, Any]:
    """The output table's columns that a prediction fills (`instances` null when none
    were asked for)."""
    columns = {"status": pred.status, "mask_rle": pred.rle(), "mask_area": pred.mask_area, "box": pred.box,
               "boxes": pred.boxes, "score": pred.score, "ncut": pred.ncut}
    if instances is not None:
        columns["instances"] = [{"mask_rle": i.rle(), "box": i.box, "area": i.area, "score": i.score, "ncut": i.ncut}
                                for i in instances]
    return columns


def finish_columns(result: RawPrediction | Finished, height: int, width: int, post: PostConfig,
                   instances: InstanceConfig | None, image: np.ndarray | None) -> dict[str, Any]:
    """One image's columns: a map finished on the CPU here, or a device-finished label;
    instances refined (`postprocess.finish_instances`) when asked for."""
    if isinstance(result, RawPrediction):
        pred = finish_raw(result, height, width, post, instances, image)
        return prediction_columns(pred, pred.instances if instances is not None else None)
    found = None
    if instances is not None:
        raw = result.instances
        model_mask = rle_to_mask(result.compact.rle()) if raw is not None and raw.first_is_model else None
        found = finish_instances(raw, (height, width), instances, model_mask, image) if raw is not None else []
    return prediction_columns(result.compact, found)


def instance_config(count: int, mode: str) -> InstanceConfig | None:
    """`--instances N --instances-from MODE` as the predictor takes them (None for 0)."""
    return InstanceConfig(max_instances=count, mode=mode) if count else None


def needs_image(instances: InstanceConfig | None) -> bool:
    """Whether finishing the instances needs the image (the bilateral solver)."""
    return instances is not None and instances.refine == "bilateral"


def finish_rows(batch: pa.Table, post: PostConfig, model_id: str, run_id: str,
                instances: InstanceConfig | None = None) -> pa.Table:
    """INFERRED rows -> ROWS: each map resized to its image, thresholded, boxed, scored
    and RLE-encoded, instances refined (on the CPU, no torch); an image that fails to
    finish is an error row."""
    now = datetime.now(timezone.utc)
    out = []
    for r in batch.to_pylist():
        rec = {k: r.get(k) for k in ("chunk", "row", "chunk_rows", "s3_retries", "device_s", "image_id", "uri",
                                     "width", "height")}
        rec.update(model_id=model_id, run_id=run_id, labeled_at=now, error=r["error"])
        if r["error"] is None:
            try:
                rec.update(finish_columns(inferred_result(r), r["height"], r["width"], post, instances,
                                          np.frombuffer(r["image"], np.uint8).reshape(r["in_h"], r["in_w"], 3)
                                          if r["image"] else None))
            except Exception as exc:  # noqa: BLE001
                rec["error"] = f"postprocess failed: {one_line(exc)}"
        if rec["error"] is not None:
            rec["status"] = STATUS_ERROR
        out.append(rec)
    return pa.Table.from_pylist(out, schema=ROWS_SCHEMA)


def inferred_result(r: dict[str, Any]) -> RawPrediction | Finished:
    """An INFERRED row's result: the map to finish, or the device-finished label."""
    raw_instances = RawInstances.unpack(r["instances"]) if r["instances"] else None
    if r["runs"] is not None:
        return Finished(CompactPrediction(r["height"], r["width"], np.frombuffer(r["runs"], np.uint32), r["mask_area"],
                                          r["box"], r["boxes"], r["score"], r["ncut"]), raw_instances)
    prob = np.frombuffer(r["prob"], np.float32).reshape(r["in_h"], r["in_w"]).copy()
    return RawPrediction(prob, r["ncut"], instances=raw_instances)


def result_columns(results: list[RawPrediction | Finished | None], images: list, keep_image: bool) -> dict[str, pa.Array]:
    """INFERRED's columns of each image's result (the device-finished fields, or the map),
    its instances, and the prepared image where the instances need it."""
    compact = [r.compact if isinstance(r, Finished) else None for r in results]
    raw = [r if isinstance(r, RawPrediction) else None for r in results]
    found = [r.instances if r is not None else None for r in results]
    field = INFERRED_SCHEMA.field
    return {
        "prob": pa.array([r.prob.astype(np.float32).tobytes() if r else None for r in raw], pa.large_binary()),
        "ncut": pa.array([r.ncut if r else c.ncut if c else None for r, c in zip(raw, compact)], pa.float64()),
        "runs": pa.array([c.runs.astype(np.uint32).tobytes() if c else None for c in compact], pa.large_binary()),
        "mask_area": pa.array([c.mask_area if c else None for c in compact], pa.int64()),
        "box": pa.array([c.box if c else None for c in compact], field("box").type),
        "boxes": pa.array([c.boxes if c else None for c in compact], field("boxes").type),
        "score": pa.array([c.score if c else None for c in compact], pa.float32()),
        "instances": pa.array([f.pack() if f else None for f in found], field("instances").type),
        "image": pa.array([host_image(images[i]).tobytes() if keep_image and results[i] else None
                           for i in range(len(results))], pa.large_binary()),
    }


class Labeler:
    """Images in, label rows out (module docstring). A Ray Data class: give it to
    `map_batches` with its arguments in `fn_constructor_kwargs`.

    model: a model folder or URI. device: "cuda" or "cpu" (default: cuda when there is
    one). batch_size / max_batch_tokens: images and backbone tokens per model call.
    decode: "gpu" decodes JPEGs on the device, "cpu" with PIL (default: gpu on cuda).
    image_column: the column of encoded bytes (default `image`; without it, `path` or
    `uri` is read). instances / instances_from: up to N objects per image in the
    `instances` column (MaskCut, "maskcut", or after the model's own mask, "sempart").
    run_id: written to each row's `run_id`. model_id: refuse a model whose id differs
    (a run must keep the model it started with). threads: torch threads (the CPUs this
    actor reserves). finish: "device" resizes, thresholds, boxes and scores the maps
    where the model ran (`device_finish`), so the CPU only compresses run lengths;
    "cpu" does it all on the CPU (default: device on cuda, where CPUs are scarce; on a
    CPU the scipy path is ~10x cheaper)."""

    def __init__(
        self, model: str, device: str | None = None, batch_size: int = 8,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, decode: str | None = None, image_column: str | None = None,
        instances: int = 0, instances_from: str = "maskcut", run_id: str = "", model_id: str | None = None,
        threads: int | None = None, finish: str | None = None,
    ):
        if decode not in (None, "gpu", "cpu") or finish not in (None, "device", "cpu"):
            raise ValueError(f"decode takes gpu or cpu, finish device or cpu: not {decode!r}, {finish!r}")
        with long_lived():  # torch, timm and the model stay for the actor's life
            import torch

            from sempart_core.artifact import ArtifactError
            from sempart_core.predictor import load_predictor
            from sempart_core.prefetch import DeviceCopier

            if threads:
                torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.predictor = load_predictor(model, device=device, batch_size=batch_size,
                                            instances=instance_config(instances, instances_from))
        if model_id is not None and self.predictor.model_id != model_id:  # rows must carry the model that made them
            raise ArtifactError(f"model {redact(model)} changed since the run started: use a new OUT")
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.decode = decode or ("gpu" if self.predictor.device.type == "cuda" else "cpu")
        self.finish = finish or ("device" if self.predictor.device.type == "cuda" else "cpu")
        self.image_column, self.run_id = image_column, run_id
        self.copier = DeviceCopier(self.predictor.device)

    # ------------------------------------------------------------ the public stage

    def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table:
        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        column = self._image_column(table)
        if column is not None:
            datas: list[bytes | Exception | None] = table.column(column).to_pylist()
            table = table.drop_columns([column])
            locations = None
        else:
            locations = table.column(next(c for c in LOCATION_COLUMNS if c in table.column_names)).to_pylist()
            datas = [self._read(uri) for uri in locations]
        prepared, errors = self.decode_encoded(datas)
        results = self.infer([p.pixels if p is not None else None for p in prepared], errors,
                             [(p.width, p.height) if p is not None else None for p in prepared])
        return self._rows(table, locations, datas, prepared, results, errors)

    def _image_column(self, table: pa.Table) -> str | None:
        if self.image_column is not None:
            if self.image_column not in table.column_names:
                raise ValueError(f"no column {self.image_column!r} in the batch ({', '.join(table.column_names)})")
            return self.image_column
        if IMAGE_COLUMN in table.column_names:
            return IMAGE_COLUMN
        if not any(c in table.column_names for c in LOCATION_COLUMNS):
            raise ValueError(f"rows need an {IMAGE_COLUMN!r} column of encoded images, or a path or uri column "
                             f"(got {', '.join(table.column_names)})")
        return None

    @staticmethod
    def _read(uri: str | None) -> bytes | Exception:
        try:
            return read_object(uri) if uri else ValueError("no path or uri")
        except Exception as exc:  # noqa: BLE001 - a missing image is that row's error
            return exc

    def _rows(self, table: pa.Table, locations: list | None, datas: list, prepared: list, results: list,
              errors: list) -> pa.Table:
        """The output table's columns for each row, then the input's other columns."""
        now, post = datetime.now(timezone.utc), self.predictor.config.post
        given_ids = table.column("image_id").to_pylist() if "image_id" in table.column_names else [None] * len(datas)
        rows = []
        for i, data in enumerate(datas):
            uri = locations[i] if locations is not None else None
            image_id = given_ids[i] or (image_id_for(uri) if uri else _content_id(data))
            rec: dict[str, Any] = {"image_id": str(image_id), "uri": uri or "", "model_id": self.predictor.model_id,
                                   "run_id": self.run_id, "labeled_at": now, "error": errors[i]}
            if prepared[i] is not None:
                rec.update(width=prepared[i].width, height=prepared[i].height)
            if rec["error"] is None:
                try:
                    image = host_image(prepared[i].pixels) if needs_image(self.predictor.instances) else None
                    rec.update(finish_columns(results[i], prepared[i].height, prepared[i].width, post,
                                              self.predictor.instances, image))
                except Exception as exc:  # noqa: BLE001
                    rec["error"] = f"postprocess failed: {one_line(exc)}"
            if rec["error"] is not None:
                rec["status"] = STATUS_ERROR
            rows.append(rec)
        labels = pa.Table.from_pylist(rows, schema=LABELS_SCHEMA)
        for name in table.column_names:
            if name not in LABELS_SCHEMA.names:
                labels = labels.append_column(name, table.column(name))
        return labels

    # ------------------------------------------------------------ the steps, also used by `sempart label`

    def decode_encoded(self, datas: list[bytes | Exception | None]) -> tuple[list, list[str | None]]:
        """Each encoded image prepared for the model (`gpu_decode.PreparedImage`: on the
        device with decode "gpu", else decoded with PIL), or its row's error."""
        from sempart_core.gpu_decode import PreparedImage, decode_and_prepare

        cfg, patch = self.predictor.config.data, self.predictor.patch
        prepared: list[PreparedImage | None] = [None] * len(datas)
        errors: list[str | None] = [one_line(d) if isinstance(d, Exception) else None for d in datas]
        todo = [i for i, d in enumerate(datas) if errors[i] is None]
        if self.decode == "gpu":
            results = decode_and_prepare([datas[i] or b"" for i in todo], cfg.image_size, patch, self.predictor.device)
        else:
            results = [self._decode_on_cpu(datas[i] or b"", cfg.image_size, patch) for i in todo]
        for i, result in zip(todo, results):
            if isinstance(result, Exception):
                errors[i] = one_line(result)
            else:
                prepared[i] = result
        return prepared, errors

    @staticmethod
    def _decode_on_cpu(data: bytes, image_size: int, patch: int) -> Any:
        from sempart_core.gpu_decode import PreparedImage

        try:
            rgb = decode_image(data)
        except Exception as exc:  # noqa: BLE001 - bad input is the row's error
            return exc
        return PreparedImage(prepare_image(rgb, image_size, patch), rgb.shape[0], rgb.shape[1])

    def infer(self, images: list, errors: list[str | None], sizes: list[tuple[int, int] | None]) -> list:
        """Each prepared image's result (numpy [h, w, 3] or a device tensor) whose row has
        no error yet: the model's RawPrediction, or with finish "device" the `Finished`
        label; an image out of memory alone, or a batch that fails, gives the rows'
        `errors` instead."""
        from sempart_core.batching import infer_in_batches

        todo = [i for i in range(len(images)) if errors[i] is None]
        found: list = [None] * len(images)
        on_device = self.finish == "device"
        results = infer_in_batches(self._device_maps if on_device else self.predictor.infer,
                                   [images[i] for i in todo], self.predictor.patch, self.batch_size,
                                   self.max_batch_tokens, [sizes[i] for i in todo], self.copier,
                                   failed=lambda exc: f"inference failed: {one_line(exc)}")
        for i, result in zip(todo, results):
            if isinstance(result, (RawPrediction, _OnDevice)):
                found[i] = result
            else:  # ImageOutOfMemory, or the failure's message
                errors[i] = str(result)
        return self._finish_on_device(found, errors, sizes) if on_device else found

    def _device_maps(self, batch: Any) -> list[_OnDevice]:
        maps = self.predictor.infer_maps(batch)
        return [_OnDevice(maps.fine[i], maps.ncut[i], maps.instances[i]) for i in range(len(maps.fine))]

    def _finish_on_device(self, found: list, errors: list[str | None], sizes: list) -> list[Finished | None]:
        """The device maps finished where they are (`device_finish`), those of one input
        shape together; a map that cannot be finished is its row's error."""
        import torch

        from sempart_core.device_finish import finish_on_device

        finished: list[Finished | None] = [None] * len(found)
        by_shape: dict[tuple, list[int]] = {}
        for i, result in enumerate(found):
            if result is not None:
                by_shape.setdefault(tuple(result.fine.shape), []).append(i)
        for rows in by_shape.values():
            done = finish_on_device(torch.stack([found[i].fine for i in rows]), [sizes[i][::-1] for i in rows],
                                    torch.stack([found[i].ncut for i in rows]), self.predictor.config.post)
            for i, compact in zip(rows, done):
                if isinstance(compact, Exception):
                    errors[i] = f"postprocess failed: {one_line(compact)}"
                else:
                    finished[i] = Finished(compact, found[i].instances)
        return finished


@dataclass
class _OnDevice:
    """One image's model output, still on the device, waiting to be finished there."""

    fine: Any  # torch.Tensor [h_in, w_in]
    ncut: Any  # torch.Tensor []
    instances: RawInstances | None


def host_image(pixels: Any) -> np.ndarray:
    """A prepared image as a numpy array, from the device if it is there."""
    return pixels if isinstance(pixels, np.ndarray) else pixels.cpu().numpy()


def _content_id(data: bytes | Exception | None) -> str:
    """An image without id or location is named by its bytes (sha1)."""
    import hashlib

    return hashlib.sha1(data if isinstance(data, bytes) else b"").hexdigest()
