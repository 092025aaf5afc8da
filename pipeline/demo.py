"""`sempart demo`: the whole system on one machine, no GPU, no network needed.

Starts a local S3 (moto's server) and local Ray, uploads the sample photos shipped in
`pipeline/demo_images/`, trains a few steps, labels the photos into S3 Parquet, runs a
query, writes the review gallery, and copies the table and the model out of the
(in-memory) S3 into the work folder so they outlive the demo.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sempart_core.backbone import WeightLoadError, build_backbone
from sempart_core.config import SempartConfig

logger = logging.getLogger(__name__)

SAMPLE_IMAGES = Path(__file__).with_name("demo_images")
BUCKET = "sempart-demo"
# Pretrained DINO when the hub can be reached.
PRETRAINED = {"backbone": {"name": "vit_small_patch16_224.dino", "weights": "hub"}, "data": {"image_size": 224}}
# Otherwise a tiny random ViT; random features need a high tau (see tests/unit/test_learning.py).
RANDOM = {
    "backbone": {"name": "vit_tiny_patch16_224", "weights": "random"},
    "graph": {"tau": 0.8},
    "loss": {"border": 0.1},
    "data": {"image_size": 128},
}
# A few steps, with a checkpoint on the way: the demo shows the pipeline, not a trained model.
TRAIN = {"steps": 30, "batch_size": 8, "lr": 2e-3, "warmup_steps": 5, "checkpoint_every": 15}
# One inference actor: each costs seconds to start (torch, timm, the model), more than
# a second one would save on the 40 sample photos.
LABEL_ACTORS = 1
QUERY = "SELECT status, count(*) AS images, round(avg(score), 3) AS mean_score FROM labels GROUP BY status ORDER BY status"


@dataclass
class DemoResult:
    table: Path
    gallery: Path
    model: Path
    random_backbone: bool


def hub_reachable(host: str = "huggingface.co") -> bool:
    """A DNS lookup first: offline, the hub client would retry for a minute."""
    import socket

    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        logger.warning("%s cannot be resolved: no pretrained weights can be downloaded", host)
        return False


def demo_config() -> SempartConfig:
    """Pretrained DINO if it can be downloaded now, else the tiny random backbone."""
    cfg = SempartConfig.from_dict({**PRETRAINED, "train": TRAIN})
    if hub_reachable():
        try:
            build_backbone(cfg.backbone, cfg.data.image_size)
            return cfg
        except WeightLoadError as exc:
            logger.warning("%s", exc)
    logger.warning(
        "*** NO PRETRAINED WEIGHTS: the demo uses a tiny RANDOM backbone; its masks show the "
        "pipeline working, not the method's quality ***"
    )
    return SempartConfig.from_dict({**RANDOM, "train": TRAIN})


def start_s3():
    """moto's standalone S3 on 127.0.0.1 (a free port); this process's AWS_* point at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return server


def upload_samples(prefix: str) -> int:
    from sempart_core import uri

    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    paths = sorted(SAMPLE_IMAGES.glob("*.jpg"))
    for path in paths:
        uri.write_bytes(uri.join(prefix, path.name), path.read_bytes())
    return len(paths)


def copy_out(src: str, dest: Path) -> Path:
    """Copy an S3 prefix into a local folder (replacing it)."""
    from sempart_core import uri

    fs, path = uri.filesystem(src)
    shutil.rmtree(dest, ignore_errors=True)
    fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    return dest


def run_demo(workdir: Path) -> DemoResult:
    import ray

    from pipeline.export import export_gallery
    from pipeline.cluster import init_ray
    from pipeline.label import LabelOptions, run_label
    from pipeline.query import format_table, run_query
    from pipeline.train import TrainJob, run_training

    start = time.perf_counter()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request lines
    workdir.mkdir(parents=True, exist_ok=True)
    server = start_s3()
    try:
        images, runs, labels = f"s3://{BUCKET}/images", f"s3://{BUCKET}/runs", f"s3://{BUCKET}/labels"
        logger.info("[1/6] local S3 at %s; uploaded %d photos to %s", os.environ["AWS_ENDPOINT_URL"], upload_samples(images), images)
        cfg = demo_config()
        os.environ.setdefault("SEMPART_NUM_CPUS", str(os.cpu_count() or 2))
        init_ray()
        logger.info("[2/6] training %d steps on Ray Train (%s)", cfg.train.steps, cfg.backbone.name)
        trained = run_training(TrainJob(data=images, out=runs, name="demo", config=cfg, workers=1, gpu=False))
        logger.info(trained.line())
        logger.info("[3/6] labelling %s on Ray Data", images)
        summary = run_label(LabelOptions(model=trained.model, input=images, out=labels, rows_per_file=16, gpu=False,
                                           actors=LABEL_ACTORS))
        logger.info(summary.line())
        logger.info("[4/6] query: %s\n%s", QUERY, format_table(run_query(labels, QUERY)))
        gallery = workdir / "gallery"
        shutil.rmtree(gallery, ignore_errors=True)
        export_gallery(labels, gallery)
        logger.info("[5/6] gallery written")
        table = copy_out(labels, workdir / "labels")
        model = copy_out(trained.model, workdir / "model")
        logger.info("[6/6] copied the table and the model out of the demo S3 in %.0f s", time.perf_counter() - start)
        return DemoResult(table, gallery / "index.html", model, cfg.backbone.weights == "random")
    finally:
        ray.shutdown()
        server.stop()
