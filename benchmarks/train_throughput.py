"""Training images/s of the Ray Train job against a plain single-process loop, in one run.

Ours: `pipeline.train.run_training` (Ray Data reads the files, decodes and augments on
CPU tasks; a TorchTrainer worker runs the training step). Baseline:
`sempart_core.training.fit` in this process on the same model, config and images,
decoded into memory beforehand and augmented inline. Both use the same number of torch
threads (the Ray worker's share of the CPUs) and bf16 autocast on GPU.

Each side is timed after `--warmup` steps (start-up, the data pipeline filling, first
calls): ours from its first report to Ray Train at the warm-up step to its last step,
the baseline from the end of its warm-up step to its last step.

    python benchmarks/train_throughput.py --quick
    python benchmarks/train_throughput.py --backbone vit_small_patch8_224 --image-size 224 --gpu

The backbone is random by default (`--weights random`, no network): throughput does
not depend on the weights. Prints a human summary, then as its last line one JSON
object of the figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cluster import cluster_plan  # noqa: E402
from pipeline.manifest import is_image_name  # noqa: E402
from pipeline.train import TrainJob, run_training  # noqa: E402
from sempart_core.config import SempartConfig  # noqa: E402
from sempart_core.images import decode_image  # noqa: E402
from sempart_core.model import build_model  # noqa: E402
from sempart_core.training import fit, random_batches  # noqa: E402
from timing import synchronizer  # noqa: E402  (beside this script)

log = logging.getLogger("benchmarks.train_throughput")

# The photos the repository ships (8; cycled up to --n-images); pass --images for more.
DEFAULT_IMAGES = Path(__file__).resolve().parent.parent / "tests" / "data" / "train_sample"
# Flags left unset take these; --quick is about a minute on 2 CPU cores.
FULL = {"backbone": "vit_small_patch16_224", "image_size": 224, "batch_size": 8, "steps": 120, "warmup": 20,
        "n_images": 256}
QUICK = {"backbone": "vit_tiny_patch16_224", "image_size": 96, "batch_size": 8, "steps": 60, "warmup": 15,
         "n_images": 64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Small model and run (about a minute on CPU).")
    parser.add_argument("--images", type=Path, dest="folder", default=DEFAULT_IMAGES,
                        help="Folder of training images (default: the repository's test sample).")
    parser.add_argument("--backbone")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int, help="Global batch.")
    parser.add_argument("--steps", type=int, help="Steps per side, warm-up included.")
    parser.add_argument("--warmup", type=int, help="Steps left out of the timing.")
    parser.add_argument("--n-images", type=int, help="Use the first N images of the folder.")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (the baseline is one process).")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")
    return args


def image_folder(args: argparse.Namespace, scratch: Path) -> Path:
    """A folder of N images (symlinks to the source's, cycled when it has fewer), so both
    sides read the same files."""
    files = sorted(p for p in args.folder.iterdir() if is_image_name(p.name))
    if not files:
        raise SystemExit(f"no images in {args.folder}")
    folder = scratch / "images"
    folder.mkdir()
    for i in range(args.n_images):
        path = files[i % len(files)]
        (folder / f"{i:05d}-{path.name}").symlink_to(path)
    return folder


def config(args: argparse.Namespace) -> SempartConfig:
    cfg = SempartConfig()
    cfg.backbone.name, cfg.backbone.weights = args.backbone, args.weights
    cfg.data.image_size = args.image_size
    cfg.train.batch_size, cfg.train.steps = args.batch_size, args.steps
    # One report at the end of the warm-up (it starts our timing window), one checkpoint
    # at the end; no other reports or checkpoints, as none are in the baseline.
    cfg.train.report_every, cfg.train.checkpoint_every = args.warmup, args.steps
    return cfg


def ours(folder: Path, cfg: SempartConfig, args: argparse.Namespace, scratch: Path) -> float:
    """Steady images/s of the Ray Train run: the window after the warm-up report."""
    job = TrainJob(data=str(folder), out=str(scratch / "runs"), name="bench", config=cfg,
                   workers=args.workers, gpu=args.gpu)
    start = time.perf_counter()
    summary = run_training(job)
    log.info("ours: %s (%.1f s with start-up)", summary.line(), time.perf_counter() - start)
    return float(summary.metrics["window_images_per_s"])


class TimedBatches:
    """Endless batches that note when each is asked for: batch k+1 is asked for when
    step k is done."""

    def __init__(self, batches: Iterator[np.ndarray]) -> None:
        self.batches = batches
        self.asked: list[float] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        for batch in self.batches:
            self.asked.append(time.perf_counter())
            yield batch


def baseline(folder: Path, cfg: SempartConfig, args: argparse.Namespace, threads: int) -> float:
    """Steady images/s of `fit` in this process, on images decoded beforehand."""
    images = [decode_image(p.read_bytes()) for p in sorted(folder.iterdir())]
    device = "cuda" if args.gpu else "cpu"
    if device == "cpu":
        torch.set_num_threads(threads)
    backbone, heads = build_model(cfg, seed=cfg.train.seed)
    backbone.to(device)
    batches = TimedBatches(random_batches(images, cfg, backbone.patch_size, seed=cfg.train.seed))
    autocast = torch.bfloat16 if device == "cuda" else None
    fit(backbone, heads, batches, cfg, device=device, log_every=cfg.train.steps, autocast_dtype=autocast)
    synchronizer(device)()
    end = time.perf_counter()
    warm = batches.asked[args.warmup]  # step `warmup` done
    return (cfg.train.steps - args.warmup) * cfg.train.batch_size / (end - warm)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    own_ray = not ray.is_initialized()  # a caller's Ray (the test suite's) is used as it is
    if own_ray:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    threads = cluster_plan(args.workers, args.gpu).threads
    cfg = config(args)
    with tempfile.TemporaryDirectory(prefix="sempart-train-bench-") as tmp:
        scratch = Path(tmp)
        folder = image_folder(args, scratch)
        count = len(list(folder.iterdir()))
        ours_ips = ours(folder, cfg, args, scratch)
        if own_ray:
            ray.shutdown()  # the baseline gets the machine to itself
        baseline_ips = baseline(folder, cfg, args, threads)
    ratio = ours_ips / baseline_ips
    device = torch.cuda.get_device_name(0) if args.gpu else f"CPU, {threads} torch thread(s) per side"
    print(f"train throughput, {args.backbone} ({args.weights} weights) at {args.image_size} px, global batch "
          f"{args.batch_size}, {args.steps} steps ({args.warmup} warm-up), {count} images, "
          f"{device}")
    print(f"  ours (Ray Train, {args.workers} worker(s), Ray Data decode+augment): {ours_ips:8.1f} images/s")
    print(f"  baseline (sempart_core.training.fit, in-memory images):        {baseline_ips:8.1f} images/s")
    print(f"  ratio ours/baseline: {ratio:.2f} (target >= 0.9 with 1 worker)")
    print(json.dumps({"ours_ips": round(ours_ips, 2), "baseline_ips": round(baseline_ips, 2),
                      "ratio": round(ratio, 3), "workers": args.workers, "device": device}))


if __name__ == "__main__":
    main()
