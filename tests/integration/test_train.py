"""`sempart train` on local Ray Train: S3 in and out with recovery from a lost worker,
DDP equal to single-process training, and checkpoint and input helpers without Ray.

The backbone is a tiny RANDOM vit_tiny_patch16_224 at 32-48 px: these tests check the
training machinery (data, DDP, checkpoints, resume), not mask quality.
"""
from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from PIL import Image
from processes import descendants_titled, kill

import pipeline.train as train
import pipeline.train_data as train_data
from pipeline.train import TrainJob, run_training
from sempart_core.artifact import read_artifact
from sempart_core.augment import augment
from sempart_core.config import SempartConfig
from sempart_core.images import decode_image
from sempart_core.model import build_model
from sempart_core.predictor import load_predictor
from sempart_core.training import make_optimizer, make_scheduler, training_step

pytestmark = pytest.mark.integration
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "train_sample"


def tiny_config(steps: int, batch_size: int = 4, image_size: int = 32, **train_fields) -> SempartConfig:
    cfg = SempartConfig()
    cfg.backbone.name, cfg.backbone.weights = "vit_tiny_patch16_224", "random"
    cfg.data.image_size = image_size
    cfg.train.steps, cfg.train.batch_size = steps, batch_size
    cfg.train.lr, cfg.train.warmup_steps = 1e-3, 1
    for name, value in train_fields.items():
        setattr(cfg.train, name, value)
    return cfg


@pytest.fixture(autouse=True)
def fast_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train's controller polls workers every 2 s and each report waits for a poll;
    the variable reaches the controller through Ray Train's env propagation."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def s3_keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def kill_a_worker_after(client, bucket: str, key: str, killed: list[int], stop: threading.Event) -> None:
    """Once `key` is in the bucket, SIGKILL one Ray Train worker process of this test
    session's Ray (a descendant of this process), as a lost worker would die."""
    while not stop.is_set():
        if client.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount"):
            workers = descendants_titled(os.getpid(), "ray::RayTrainWorker")
            if workers:
                kill(workers[-1:])
                killed.extend(workers[-1:])
                return
        time.sleep(0.1)  # each listing costs ~4 ms of CPU (client and moto) that training shares


def test_train_from_s3_to_s3_recovering_a_lost_worker(s3_endpoint: str, s3_bucket: str, ray_session) -> None:
    """Images from S3 (one undecodable), checkpoints and artifact to S3; one of the two
    workers is SIGKILLed from outside once the step-2 checkpoint is complete, and the
    worker group restarts from the newest checkpoint Ray Train had registered (read back
    from S3), which the run then records in `resumed_from`."""
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = s3_bucket.removeprefix("s3://")
    for path in sorted(SAMPLE.glob("*.jpg")):
        client.put_object(Bucket=bucket, Key=f"images/{path.name}", Body=path.read_bytes())
    client.put_object(Bucket=bucket, Key="images/broken.jpg", Body=b"\xff\xd8\xff\xe0 not a jpeg at all")
    client.put_object(Bucket=bucket, Key="images/notes.txt", Body=b"not an image name: not listed")

    steps = 20
    cfg = tiny_config(steps=steps, checkpoint_every=2, keep_checkpoints=2, max_failures=1)
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_a_worker_after, args=(
        client, bucket, f"runs/s3run/checkpoint_00000002/{train.COMPLETE_FILE}", killed, stop))
    killer.start()
    try:
        summary = run_training(
            TrainJob(data=f"{s3_bucket}/images", out=f"{s3_bucket}/runs", name="s3run", config=cfg, workers=2,
                     gpu=False)
        )
    finally:
        stop.set()
        killer.join()
    assert killed  # a worker was killed ...
    [resumed] = summary.resumed_from  # ... and the run recovered from a checkpoint
    assert 2 <= resumed < steps and resumed % 2 == 0
    assert (summary.steps, summary.skipped_images) == (steps, 1)
    assert summary.images == (steps - resumed) * 4  # since the restart

    keys = s3_keys(client, bucket, "runs/s3run/")
    checkpoints = sorted({k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_0")})
    assert checkpoints == [f"checkpoint_{steps - 2:08d}", f"checkpoint_{steps:08d}"]  # the newest 2 kept
    last = f"runs/s3run/checkpoint_{steps:08d}/"
    files = {k.removeprefix(last) for k in keys if k.startswith(last)} - {""}  # "": pyarrow's folder marker
    assert files == {"progress.json", "train_state.pt", "rng_rank0.pt", "rng_rank1.pt", train.COMPLETE_FILE}
    progress = json.loads(client.get_object(Bucket=bucket, Key=last + "progress.json")["Body"].read())
    assert progress == {"step": steps, "resumed_from": [resumed]}
    state = torch.load(
        io.BytesIO(client.get_object(Bucket=bucket, Key=last + "train_state.pt")["Body"].read()),
        weights_only=True,
    )

    model = f"{s3_bucket}/runs/s3run/model"
    artifact = read_artifact(model)
    assert (artifact.meta["steps"], artifact.meta["resumed_from"], artifact.meta["run_id"]) == (steps, [resumed], "s3run")
    assert artifact.heads_state.keys() == state["heads"].keys()
    for name, tensor in artifact.heads_state.items():  # the artifact holds the trained heads
        assert torch.equal(tensor, state["heads"][name]), name
    fresh = build_model(cfg, seed=cfg.train.seed)[1].state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in artifact.heads_state.items())

    image = decode_image((SAMPLE / "ILSVRC2012_test_00000004.jpg").read_bytes())
    [prediction] = load_predictor(model).predict([image])
    assert prediction.mask.shape == image.shape[:2]


def square_images(folder: Path, count: int, size: int) -> list[np.ndarray]:
    """The first sample photos, centre-cropped square at the training size, as PNG files."""
    folder.mkdir()
    images = []
    for path in sorted(SAMPLE.glob("*.jpg"))[:count]:
        im = Image.open(path).convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        im.save(folder / f"{path.stem}.png")
        images.append(np.asarray(im))
    return images


def reference_heads(images: list[np.ndarray], cfg: SempartConfig) -> dict[str, torch.Tensor]:
    """Plain single-process training, every step on the whole (augmentation-free) set."""
    backbone, heads = build_model(cfg, seed=cfg.train.seed)
    optimizer = make_optimizer(heads, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    rng = np.random.default_rng(0)
    batch = np.stack([augment(im, cfg.data, backbone.patch_size, rng) for im in images])
    assert np.array_equal(batch, np.stack(images))  # the config below makes augment the identity
    for _ in range(cfg.train.steps):
        training_step(backbone, heads, batch, optimizer, scheduler, cfg)
    return heads.state_dict()


def comparable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters with a real gradient. Attention is invariant to the key bias (the
    middle third of in_proj_bias), so its gradient is rounding noise, which Adam's first
    steps turn into updates of +-lr whatever the batch: leave it out."""
    out = dict(state)
    for name, tensor in state.items():
        if name.endswith("self_attn.in_proj_bias"):
            dim = tensor.numel() // 3
            out[name] = torch.cat([tensor[:dim], tensor[2 * dim:]])
    return out


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_ddp_two_workers_equal_one_worker(ray_session, tmp_path: Path, monkeypatch) -> None:
    """Global batch 4 = the whole data set, so every step sees the same 4 images
    however Ray splits them: 1 worker x 4 and 2 workers x 2 (DDP averages the two
    half-batch means) must give the parameters of plain single-process training."""
    size = 48
    images = square_images(tmp_path / "images", 4, size)
    cfg = tiny_config(steps=3, image_size=size, checkpoint_every=100, report_every=100)
    cfg.data.crop_scale, cfg.data.hflip, cfg.data.color_jitter, cfg.data.grayscale_p = 1.0, False, 0.0, 0.0
    monkeypatch.setattr(train_data, "EPOCH_ROWS", 4)  # one pass = the 4 images, not repeats of them
    trained = {}
    for workers in (1, 2):
        job = TrainJob(data=str(tmp_path / "images"), out=str(tmp_path / "runs"), name=f"ddp{workers}",
                       config=cfg, workers=workers, gpu=False)
        assert run_training(job).steps == 3
        trained[workers] = comparable(read_artifact(str(tmp_path / "runs" / f"ddp{workers}" / "model")).heads_state)
    expected = comparable(reference_heads(images, cfg))
    initial = comparable(build_model(cfg, seed=cfg.train.seed)[1].state_dict())
    assert max_difference(expected, initial) > 1e-3  # three Adam steps at lr 1e-3 move the weights
    # Power check: one worker's half batch alone (no gradient averaging) ends elsewhere.
    assert max_difference(comparable(reference_heads(images[:2], cfg)), expected) > 1e-4
    for workers, state in trained.items():
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5, msg=f"{workers} worker(s): {name}")


# ------------------------------------------------------------- without Ray (seconds)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    """Heads, optimiser, scheduler, progress and every RNG come back exactly."""
    import random

    cfg = tiny_config(steps=10)
    backbone, heads = build_model(cfg, seed=0)
    optimizer = make_optimizer(heads, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    batch = np.stack([augment(decode_image(p.read_bytes()), cfg.data, 16, np.random.default_rng(0))
                      for p in sorted(SAMPLE.glob("*.jpg"))[:2]])
    for _ in range(2):
        training_step(backbone, heads, batch, optimizer, scheduler, cfg)
    train.save_checkpoint(tmp_path, 0, heads, optimizer, scheduler, train.Progress(step=2, resumed_from=[1]))
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])

    _, heads2 = build_model(cfg, seed=1)
    optimizer2 = make_optimizer(heads2, cfg.train)
    scheduler2 = make_scheduler(optimizer2, cfg.train)
    progress = train.load_checkpoint(tmp_path, 0, heads2, optimizer2, scheduler2)
    assert progress == train.Progress(step=2, resumed_from=[1])
    for (name, a), b in zip(heads.state_dict().items(), heads2.state_dict().values()):
        assert torch.equal(a, b), name
    assert scheduler2.last_epoch == 2 and scheduler2.get_last_lr() == scheduler.get_last_lr()
    for key, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(value, optimizer2.state_dict()["state"][key][name])
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1])
    assert [random.random() for _ in range(3)] == draws[2]


def test_training_image_paths_from_folder_text_and_manifest(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    for name in ("b.jpg", "a.PNG", "nested/c.webp", "notes.txt"):
        (folder / name).write_bytes(b"x")
    fs, paths = train_data.training_image_paths(str(folder))
    assert paths == [str(folder / n) for n in ("a.PNG", "b.jpg", "nested/c.webp")]

    listing = tmp_path / "uris.txt"
    listing.write_text(f"{folder / 'b.jpg'}\n\nfile://{folder / 'a.PNG'}\n")
    assert train_data.training_image_paths(str(listing))[1] == [str(folder / "b.jpg"), str(folder / "a.PNG")]

    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"uri": ["s3://bucket/k/1.jpg", "s3://bucket/k/2.jpg"], "size": [1, 2]}), manifest)
    fs, paths = train_data.training_image_paths(str(manifest))
    assert (fs.type_name, paths) == ("s3", ["bucket/k/1.jpg", "bucket/k/2.jpg"])

    listing.write_text("s3://bucket/x.jpg\n/local/y.jpg\n")
    with pytest.raises(ValueError, match="mixes"):
        train_data.training_image_paths(str(listing))
    with pytest.raises(FileNotFoundError):
        train_data.training_image_paths(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        train_data.training_image_paths(str(tmp_path / "empty"))


def test_worker_plan_round_trip_and_other_versions() -> None:
    cfg = tiny_config(steps=7)
    plan = train.WorkerPlan(config=cfg, run="r", run_uri="s3://b/runs/r", batch_size_per_worker=2,
                            torch_threads=1, resume_from="s3://b/runs/r/checkpoint_00000005")
    data = json.loads(json.dumps(plan.to_dict()))  # plain values only, as Ray ships them
    assert train.WorkerPlan.from_dict(data) == plan
    assert plan.model_uri == "s3://b/runs/r/model"
    old = {k: v for k, v in data.items() if k != "version"}
    with pytest.raises(ValueError, match="plan version None") as info:
        train.WorkerPlan.from_dict(old)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="not version 1"):
        train.WorkerPlan.from_dict({**data, "fail_at_step": 5})


def test_newest_complete_checkpoint(tmp_path: Path) -> None:
    """The highest step whose folder holds the completion file; a newer folder without
    it (a run killed during its upload) is passed over; other folders are ignored."""
    run = tmp_path / "run"
    assert train.newest_complete_checkpoint(str(run)) is None  # no run folder yet
    for step in (5, 10, 15):
        (run / f"checkpoint_{step:08d}").mkdir(parents=True)
        (run / f"checkpoint_{step:08d}" / "train_state.pt").write_bytes(b"x")
    (run / "checkpoint_tmp_1").mkdir()
    assert train.newest_complete_checkpoint(str(run)) is None
    for step in (5, 10):
        train.mark_complete(str(run), f"checkpoint_{step:08d}", step, 2)
    assert train.newest_complete_checkpoint(str(run)) == str(run / "checkpoint_00000010")
    assert train.checkpoint_step(str(run / "checkpoint_00000010")) == 10
    assert json.loads((run / "checkpoint_00000010" / train.COMPLETE_FILE).read_text()) == {"step": 10, "workers": 2}


def test_rerun_says_where_it_resumes(tmp_path: Path, caplog) -> None:
    """A new run records its config; a rerun names the step it resumes from, or says
    plainly that it starts from step 0 when no checkpoint is complete."""
    run, cfg = tmp_path / "run", tiny_config(steps=10)
    assert train.check_run(str(run), cfg, "r") is None  # new: nothing said
    assert "RESUMING" not in caplog.text
    (run / "checkpoint_00000005").mkdir()
    assert train.check_run(str(run), cfg, "r") is None
    assert "holds no complete checkpoint: training from step 0" in caplog.text
    train.mark_complete(str(run), "checkpoint_00000005", 5, 1)
    assert train.check_run(str(run), cfg, "r") == str(run / "checkpoint_00000005")
    assert "RESUMING from step 5, its newest complete checkpoint" in caplog.text
