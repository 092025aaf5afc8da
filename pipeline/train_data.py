"""What `sempart train` reads: the image list, and the Ray Data pipeline that decodes and
augments it on CPU tasks. Kept apart from `pipeline.train` and free of torch and timm:
Ray Data's tasks and Ray Train's dataset actors import the module their functions come
from, and importing torch and timm costs each of those processes seconds of CPU."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import manifest as manifests
from pipeline.sources import InputSource
from pipeline.storage import is_s3, pyarrow_filesystem, redact
from sempart_core.augment import augment, crop_size
from sempart_core.config import DataConfig, SempartConfig
from sempart_core.images import ImageDecodeError, decode_image

logger = logging.getLogger(__name__)
EPOCH_ROWS = 4096  # small datasets are repeated up to this many rows per pass


def _uris_to_paths(uris: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """One file system for a list of URIs (all s3:// or all local)."""
    schemes = {"s3" if is_s3(u) else "local" for u in uris}
    if len(schemes) > 1:
        raise ValueError("the input mixes s3:// and local URIs: keep them on one file system")
    fs, _ = pyarrow_filesystem(uris[0])
    if schemes == {"s3"}:
        return fs, [u.split("://", 1)[1] for u in uris]
    return fs, [pyarrow_filesystem(u)[1] for u in uris]


def training_image_paths(src: str) -> tuple[pafs.FileSystem, list[str]]:
    """(file system, paths) of the training images named by SRC: a folder or prefix, a
    manifest Parquet or a text file of URIs, read as `sempart label` reads its input."""
    uris = [row["uri"] for row in InputSource.resolve(src).image_rows()]
    if not uris:
        raise ValueError(f"no image files ({', '.join(sorted(manifests.IMAGE_EXTENSIONS))}) in {redact(src)}")
    return _uris_to_paths(uris)


@ray.remote(num_cpus=0)
class SkippedImages:
    """Counts undecodable inputs met by the decode tasks (they run anywhere in the cluster).

    Create it with `skipped_images_counter()`: on the driver's node, so that losing a
    worker node mid-run (which training survives) cannot take the count with it."""

    def __init__(self) -> None:
        self.paths: set[str] = set()

    def add(self, paths: list[str]) -> None:
        self.paths.update(paths)

    def count(self) -> int:
        return len(self.paths)


def skipped_images_counter() -> Any:
    """A SkippedImages actor pinned to this (the driver's) node."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return SkippedImages.options(scheduling_strategy=here).remote()


def decode_training_batch(
    batch: dict[str, np.ndarray], *, data: dict[str, Any], patch: int, skipped: Any
) -> dict[str, np.ndarray]:
    """bytes -> augmented uint8 crops [n, S, S, 3]; undecodable images are dropped and counted."""
    cfg = DataConfig(**data)
    rng = np.random.default_rng()  # fresh entropy: every epoch sees new crops
    crops, bad = [], []
    for blob, path in zip(batch["bytes"], batch["path"]):
        try:
            crops.append(augment(decode_image(blob), cfg, patch, rng))
        except ImageDecodeError as exc:
            logger.warning("skipping undecodable image %s: %s", path, exc)
            bad.append(str(path))
    if bad:
        skipped.add.remote(bad)
    size = crop_size(cfg, patch)
    return {"image": np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)}


def image_dataset(
    fs: pafs.FileSystem, paths: list[str], cfg: SempartConfig, patch: int, skipped: Any, stage_cpus: float = 1.0
) -> ray.data.Dataset:
    """Read the files (order reshuffled every epoch), decode and augment on CPU tasks
    that reserve `stage_cpus` each (the resource plan's, cluster.plan_workers).

    A small dataset is listed several times over, so that one pass of the Ray dataset
    covers up to EPOCH_ROWS images: every pass restarts the streaming pipeline, which
    costs seconds, and would dominate training on a few hundred images.
    """
    wanted = min(cfg.train.steps * cfg.train.batch_size, EPOCH_ROWS)
    repeats = max(1, math.ceil(wanted / len(paths)))
    ds = ray.data.read_binary_files(
        paths * repeats,
        filesystem=fs,
        include_paths=True,
        shuffle=ray.data.FileShuffleConfig(seed=cfg.train.seed),
        ray_remote_args={"num_cpus": stage_cpus},
    )
    return ds.map_batches(
        decode_training_batch,
        batch_size=32,
        batch_format="numpy",
        fn_kwargs={"data": dataclasses.asdict(cfg.data), "patch": patch, "skipped": skipped},
        num_cpus=stage_cpus,
    )
