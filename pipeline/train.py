"""`sempart train`: fit the SEMPART heads with Ray Train on unlabelled images.

The driver lists the inputs once, builds a Ray Data pipeline (read bytes -> decode and
augment on CPU tasks) and starts a `TorchTrainer` whose run lives at RUN_ROOT/RUN.
Re-running the same command resumes: the driver picks the newest COMPLETE checkpoint
in RUN_ROOT/RUN (one holding COMPLETE_FILE, which rank 0 writes once every worker's
files are uploaded) and hands it to the workers, which take it unless Ray Train offers
a newer one (a worker group restarted within this run after a lost worker,
`FailureConfig`). Ray Train's own record of a run's checkpoints is not enough: a run
killed between an upload and its registration would restart from an older one, or from
step 0. Each worker runs the frozen backbone and the DDP-wrapped heads through
`sempart_core.training.training_step`; every K steps the workers write a checkpoint
(heads, optimiser, scheduler, step, RNG), and rank 0 writes the model artifact to
RUN_ROOT/RUN/model/ at the end.

Checkpoints hold only tensors and plain values (`torch.load(weights_only=True)` reads
them back) plus a JSON progress file; the frozen backbone is never saved there.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch

from pipeline.cluster import cluster_plan, init_ray
from pipeline.storage import is_s3, pyarrow_filesystem, redact, s3_env
from pipeline.train_data import image_dataset, skipped_images_counter, training_image_paths
from sempart_core import uri
from sempart_core.artifact import META_FILE, meta_for_backbone, save_artifact
from sempart_core.backbone import patch_size_of
from sempart_core.config import SempartConfig
from sempart_core.model import build_model
from sempart_core.training import make_optimizer, make_scheduler, training_step

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"  # heads, optimiser, scheduler (rank 0)
PROGRESS_FILE = "progress.json"  # step, resumed_from (rank 0); readable without torch
RNG_FILE = "rng_rank{rank}.pt"  # each worker's RNG state
RUN_FILE = "sempart_run.json"  # the config a run was started with, checked on resume
COMPLETE_FILE = "_complete.json"  # written last into a checkpoint folder, once it is whole
CHECKPOINT_DIR = re.compile(r"checkpoint_(\d{8})")
PLAN_VERSION = 1
MODEL_DIR = "model"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
POSITIVE_TRAIN_FIELDS = ("steps", "batch_size", "checkpoint_every", "report_every", "keep_checkpoints")
# Sections that shape the saved tensors: a run cannot resume with other values.
FIXED_SECTIONS = ("backbone", "model")


@dataclass
class TrainJob:
    """What `sempart train` was asked to do; the config carries model and schedule."""

    data: str  # folder/prefix of images, manifest Parquet (`uri` column) or .txt of URIs
    out: str  # RUN_ROOT
    name: str  # RUN
    config: SempartConfig
    workers: int | None = None  # default: one per GPU with --gpu, else 1
    gpu: bool | None = None  # default: when the cluster has GPUs


@dataclass
class TrainSummary:
    """The end-of-run line: what this invocation did and where the model is."""

    run: str
    steps: int
    resumed_from: list[int]
    images: int  # images trained on (all workers) since the workers last (re)started
    seconds: float
    images_per_s: float
    skipped_images: int  # distinct undecodable inputs met by this invocation
    model: str
    metrics: dict[str, float] = field(default_factory=dict)  # the last report to Ray Train

    def line(self) -> str:
        resumed = f" (resumed from step {', '.join(map(str, self.resumed_from))})" if self.resumed_from else ""
        return (
            f"trained {self.run}: step {self.steps}{resumed}; {self.images} images in "
            f"{self.seconds:.1f} s ({self.images_per_s:.1f} images/s in the loop); "
            f"{self.skipped_images} undecodable images skipped; model at {redact(self.model)}"
        )


@dataclass
class WorkerPlan:
    """What the driver tells every training worker (Ray Train's `train_loop_config`)."""

    config: SempartConfig
    run: str  # RUN
    run_uri: str  # RUN_ROOT/RUN: checkpoints and the model live here
    batch_size_per_worker: int
    torch_threads: int
    resume_from: str | None = None  # URI of the newest complete checkpoint when the run started
    version: int = PLAN_VERSION

    @property
    def model_uri(self) -> str:
        return uri.join(self.run_uri, MODEL_DIR)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorkerPlan":
        """The plan back from `to_dict`; a plan of another sempart version is one clear error."""
        names = {f.name for f in dataclasses.fields(cls)}
        if data.get("version") != PLAN_VERSION or set(data) != names:
            raise ValueError(
                f"training worker plan version {data.get('version')!r} with fields {sorted(data)} is not "
                f"version {PLAN_VERSION}: run the same sempart version on the driver and the workers"
            )
        return cls(**{**data, "config": SempartConfig.from_dict(data["config"])})


# ------------------------------------------------------------------------ checkpoints


@dataclass
class Progress:
    """The plain part of a checkpoint."""

    step: int = 0
    resumed_from: list[int] = field(default_factory=list)


def _rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA), numpy and python RNG state as tensors and plain values."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
         state["numpy_has_gauss"], state["numpy_gauss"])
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: Path, rank: int, heads: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, progress: Progress,
) -> None:
    """Write this worker's part of a checkpoint: rank 0 the training state, every rank its RNG."""
    torch.save(_rng_state(), folder / RNG_FILE.format(rank=rank))
    if rank == 0:
        state = {"heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict()}
        torch.save(state, folder / STATE_FILE)
        (folder / PROGRESS_FILE).write_text(json.dumps(dataclasses.asdict(progress)))


def load_checkpoint(
    folder: Path, rank: int, heads: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Progress:
    """Restore a checkpoint written by `save_checkpoint` (no pickled code is run)."""
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    heads.load_state_dict(state["heads"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = folder / RNG_FILE.format(rank=rank)
    if rng_file.exists():  # absent when the run restarts with more workers
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return Progress(**json.loads((folder / PROGRESS_FILE).read_text()))


def checkpoint_step(folder: str) -> int:
    """The step of a checkpoint folder, from its name (checkpoint_<step:08d>)."""
    return int(CHECKPOINT_DIR.fullmatch(folder.rstrip("/").rsplit("/", 1)[-1]).group(1))


def mark_complete(run_uri: str, folder: str, step: int, workers: int) -> None:
    """Rank 0, once every worker has uploaded its files: the checkpoint may be resumed from."""
    uri.write_bytes(uri.join(run_uri, folder, COMPLETE_FILE), json.dumps({"step": step, "workers": workers}).encode())


def newest_complete_checkpoint(run_uri: str) -> str | None:
    """URI of the checkpoint with the highest step that holds COMPLETE_FILE, or None.

    Folders without it were cut short (a worker killed during its upload) or written by
    a run killed before rank 0 saw every upload finish: resuming from one could miss a
    worker's files."""
    fs, root = pyarrow_filesystem(run_uri)
    folders = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
               if i.type == pafs.FileType.Directory and CHECKPOINT_DIR.fullmatch(i.base_name)]
    for folder in sorted(folders, key=checkpoint_step, reverse=True):
        if fs.get_file_info(f"{root}/{folder}/{COMPLETE_FILE}").type == pafs.FileType.File:
            return uri.join(run_uri, folder)
    return None


# ------------------------------------------------------------------------ worker loop


def _worker_logging() -> None:
    """Ray worker processes have no log handler of their own: print INFO to stderr."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class _Window:
    """Loss terms and throughput since the last report to Ray Train."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, terms: dict[str, float]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def pop(self, global_batch: int) -> dict[str, float]:
        """Mean of each term over the window and its images/s; starts a new window."""
        means = {k: v / self.steps for k, v in self.sums.items()}
        means["window_images_per_s"] = self.steps * global_batch / (time.perf_counter() - self.start)
        self.__init__()
        return means


class _WorkerRun:
    """One worker's model, optimiser and progress; `train_loop` drives it."""

    def __init__(self, plan: WorkerPlan) -> None:
        self.plan = plan
        self.cfg = plan.config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(plan.torch_threads)
        self.backbone, self.heads = build_model(self.cfg, seed=self.cfg.train.seed)
        self.backbone.to(self.device)
        self.heads.to(self.device)  # before the optimiser, so that restored state lands there
        self.optimizer = make_optimizer(self.heads, self.cfg.train)
        self.scheduler = make_scheduler(self.optimizer, self.cfg.train)
        torch.manual_seed(self.cfg.train.seed + self.rank)
        self.progress = self._restore()
        self.model = ray.train.torch.prepare_model(self.heads)  # DDP: gloo on CPU, NCCL on GPU
        self.autocast = torch.bfloat16 if self.device.type == "cuda" else None

    def _checkpoint_to_restore(self) -> ray.train.Checkpoint | None:
        """The newer of the plan's checkpoint and the one Ray Train hands over (its
        newest registered one: after a worker-group restart, newer than the plan's)."""
        registered = ray.train.get_checkpoint()
        if self.plan.resume_from is None:
            return registered
        if registered is not None and checkpoint_step(registered.path) >= checkpoint_step(self.plan.resume_from):
            return registered
        fs, path = pyarrow_filesystem(self.plan.resume_from)
        return ray.train.Checkpoint(path, filesystem=fs)

    def _restore(self) -> Progress:
        checkpoint = self._checkpoint_to_restore()
        if checkpoint is None:
            return Progress()
        with checkpoint.as_directory() as folder:
            progress = load_checkpoint(Path(folder), self.rank, self.heads, self.optimizer, self.scheduler)
        if progress.step < self.cfg.train.steps:
            progress.resumed_from.append(progress.step)
        if self.rank == 0:
            logger.warning("resuming %s from step %d (of %d)", self.plan.run, progress.step, self.cfg.train.steps)
        return progress

    def step(self, batch: torch.Tensor) -> dict[str, float]:
        terms = training_step(
            self.backbone, self.model, batch, self.optimizer, self.scheduler, self.cfg, self.device, self.autocast
        )
        self.progress.step += 1
        return terms.as_floats()

    def report(self, metrics: dict[str, float], checkpoint: bool) -> None:
        """Report to Ray Train; with a checkpoint, every worker uploads its files into
        one folder named by the step (rank 0: training state, each rank: its RNG), and
        once all have (a `report` returns when its own upload is done), rank 0 marks
        the folder complete."""
        if not checkpoint:
            ray.train.report(metrics)
            return
        name = f"checkpoint_{self.progress.step:08d}"
        with tempfile.TemporaryDirectory(prefix="sempart-ckpt-") as folder:
            save_checkpoint(Path(folder), self.rank, self.heads, self.optimizer, self.scheduler, self.progress)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        # A report skipped by Ray Train (a worker failed meanwhile) uploaded nothing.
        if self.rank == 0 and uri.exists(uri.join(self.plan.run_uri, name, STATE_FILE)):
            mark_complete(self.plan.run_uri, name, self.progress.step, self.world)

    def write_artifact(self) -> None:
        meta = meta_for_backbone(
            self.backbone, run_id=self.plan.run, steps=self.progress.step,
            resumed_from=list(self.progress.resumed_from),
        )
        save_artifact(self.plan.model_uri, self.cfg, self.heads, self.backbone, meta)


def train_loop(plan: dict[str, Any]) -> None:
    """One Ray Train worker: restore, train to `steps` (repeating the data), checkpoint
    every K steps, report every `report_every`, and (rank 0) write the artifact.

    Ray Train V2 takes one report per worker per controller poll (2 s by default), so
    reporting every step would stall training; the console gets every step instead.
    """
    _worker_logging()
    run = _WorkerRun(WorkerPlan.from_dict(plan))
    cfg, progress = run.cfg, run.progress
    per_worker = run.plan.batch_size_per_worker
    global_batch = per_worker * run.world
    shard = ray.train.get_dataset_shard("train")
    start_step, start, window = progress.step, time.perf_counter(), _Window()
    while progress.step < cfg.train.steps:
        seen = 0
        batches = shard.iter_torch_batches(
            batch_size=per_worker, drop_last=True, prefetch_batches=2, dtypes=torch.uint8, device=run.device
        )
        for batch in batches:
            seen += 1
            terms = run.step(batch["image"])
            window.add(terms)
            images = (progress.step - start_step) * global_batch
            rate = images / (time.perf_counter() - start)
            if run.rank == 0:
                logger.info(
                    "step %d/%d loss %.4f ncut %.4f ftv %.4f itv %.4f dist %.4f border %.4f (%.1f img/s)",
                    progress.step, cfg.train.steps, terms["total"], terms["ncut"], terms["ftv"],
                    terms["itv"], terms["dist"], terms["border"], rate,
                )
            done = progress.step >= cfg.train.steps
            checkpoint = done or progress.step % cfg.train.checkpoint_every == 0
            metrics = None
            if checkpoint or progress.step % cfg.train.report_every == 0:
                metrics = {**window.pop(global_batch), "step": progress.step, "images": images,
                           "images_per_s": rate, "lr": run.scheduler.get_last_lr()[0]}
            if done and run.rank == 0:  # before the last checkpoint: a resume then only rewrites it
                run.write_artifact()
            if metrics is not None:
                run.report(metrics, checkpoint)
            if done:
                break
        if seen == 0:
            raise ValueError(
                f"worker {run.rank} got no full batch of {per_worker} images in an epoch: fewer usable "
                f"images than --batch-size ({global_batch})"
            )
    if progress.step == start_step:  # a finished run started again: refresh the artifact
        if run.rank == 0:
            logger.warning("%s already finished at step %d", run.plan.run, progress.step)
            run.write_artifact()
        run.report({"step": progress.step, "images": 0, "images_per_s": 0.0}, checkpoint=False)


# ----------------------------------------------------------------------------- driver


def check_run(run_uri: str, cfg: SempartConfig, name: str) -> str | None:
    """Record a new run's config, or check a resumed run's against it and say loudly
    from which step it resumes; returns the checkpoint to resume from (None: step 0)."""
    record = uri.join(run_uri, RUN_FILE)
    if not uri.exists(record):
        uri.write_bytes(record, json.dumps({"config": cfg.to_dict()}, indent=2).encode())
        return None
    previous = json.loads(uri.read_bytes(record))["config"]
    current = cfg.to_dict()
    changed = [s for s in FIXED_SECTIONS if previous.get(s) != current[s]]
    if changed:
        raise ValueError(
            f"run {name!r} in {redact(run_uri)} was started with another {' and '.join(changed)} "
            "config: use a new --name to start a new run"
        )
    checkpoint = newest_complete_checkpoint(run_uri)
    if checkpoint is None:
        logger.warning("run %s exists in %s but holds no complete checkpoint: training from step 0",
                       name, redact(run_uri))
    else:
        logger.warning(
            "run %s exists in %s: RESUMING from step %d, its newest complete checkpoint "
            "(use a new --name to start afresh)", name, redact(run_uri), checkpoint_step(checkpoint),
        )
    return checkpoint


def run_training(job: TrainJob) -> TrainSummary:
    """Train on Ray (joined or started here after the inputs are checked) and write
    RUN_ROOT/RUN/model/."""
    cfg = job.config
    if not RUN_NAME.fullmatch(job.name):
        raise ValueError(f"--name {job.name!r}: use letters, digits, '.', '_' and '-' only")
    for name in POSITIVE_TRAIN_FIELDS:
        if getattr(cfg.train, name) < 1:
            raise ValueError(f"train.{name} must be at least 1, got {getattr(cfg.train, name)}")
    fs, paths = training_image_paths(job.data)
    if len(paths) < cfg.train.batch_size:
        raise ValueError(f"{len(paths)} images in {redact(job.data)}: fewer than --batch-size {cfg.train.batch_size}")
    init_ray()
    gpu = job.gpu if job.gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    workers = job.workers or (int(ray.cluster_resources().get("GPU", 1)) if gpu else 1)
    if cfg.train.batch_size % workers:
        raise ValueError(f"--batch-size {cfg.train.batch_size} must be a multiple of --workers {workers}")
    storage_fs, storage_path = pyarrow_filesystem(job.out)
    run_uri = uri.join(job.out if is_s3(job.out) else storage_path, job.name)
    resume_from = check_run(run_uri, cfg, job.name)

    # The per-step lines are training's progress; Ray Data's bars would restart every pass.
    ray.data.DataContext.get_current().enable_progress_bars = False
    skipped = skipped_images_counter()
    resources = cluster_plan(workers, gpu)
    dataset = image_dataset(fs, paths, cfg, patch_size_of(cfg.backbone.name), skipped, resources.stage_cpus)
    env = s3_env()  # for the artifact write (fsspec); Ray Train's uploads use storage_fs
    plan = WorkerPlan(config=cfg, run=job.name, run_uri=run_uri, batch_size_per_worker=cfg.train.batch_size // workers,
                      torch_threads=resources.threads, resume_from=resume_from)
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config=plan.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources.resources),
        run_config=ray.train.RunConfig(
            name=job.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
        datasets={"train": dataset},
    )
    logger.info(
        "training %s on %d %s worker(s), %d images from %s, %d steps of %d images",
        job.name, workers, "GPU" if gpu else "CPU", len(paths), redact(job.data),
        cfg.train.steps, cfg.train.batch_size,
    )
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    meta = json.loads(uri.read_bytes(uri.join(plan.model_uri, META_FILE)))
    metrics = result.metrics or {}
    return TrainSummary(
        run=job.name,
        steps=meta["steps"],
        resumed_from=meta["resumed_from"],
        images=int(metrics.get("images", 0)),
        seconds=seconds,
        images_per_s=float(metrics.get("images_per_s", 0.0)),
        skipped_images=ray.get(skipped.count.remote()),
        model=plan.model_uri,
        metrics=metrics,
    )
