"""MaskCut instances: ours (batched on the device) against the published procedure, in one run.

Both sides get the same features of the same photos: each photo is resized to a fixed
square (MaskCut's ``fixed_size``, LANCZOS), the backbone runs once per batch, and then

- **ours**: `sempart_core.instances.maskcut_batch` on the batch (one similarity product
  per image, one batched eigen-solve per cut: `sempart_core.fiedler`; on the CPU it
  takes the batch's images one at a time, which is faster there);
- **reference**: MaskCut as CutLER's ``maskcut.py`` runs it, one image at a time on the
  CPU with numpy: per cut a dense float64 W with ``D = np.diag(d)``, scipy's generalised
  ``eigh(D - W, D, subset_by_index=[1, 2])``, the split at the mean, the corner rule,
  the seed's component (``scipy.ndimage.label``), the drop rules, the painting of the
  found patches, and the subtraction of earlier masks at the input resolution.

One deliberate difference, on both sides: the eigenvector's sign is fixed (largest
|entry| positive) before the corner rule, because CutLER's code applies that rule only
when the solver happens to return the seed entry positive (see instances.py);
``sign_decided_cuts`` counts the cuts where the returned sign would have changed the
reference's decision.

    python benchmarks/instances.py --quick
    python benchmarks/instances.py --images DIR --n 24 --threads 1

Prints per-stage times, then as its last line one JSON object: ``ratio`` (reference /
ours, wall time of the instance stage on the same features; ``ratio_cpu`` the same in
process CPU time, steadier on a shared machine), ``mean_iou`` (our masks against the
reference's, instance by instance in the order found), ``ours_ips`` and
``baseline_ips`` (images/s including the shared backbone time).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from threadpoolctl import threadpool_limits

from sempart_core.backbone import Backbone, build_backbone
from sempart_core.config import BackboneConfig, InstanceConfig
from sempart_core.images import decode_image
from sempart_core.instances import PaintedGraph, feature_links, maskcut_batch, solve
from sempart_core.training import to_model_input
from timing import timed  # beside this script

log = logging.getLogger("benchmarks.instances")

DEFAULT_IMAGES = Path(__file__).resolve().parents[1] / "tests" / "data" / "duts-te" / "images"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
FULL = {"backbone": "vit_small_patch8_224", "image_size": 320, "n": 12}
QUICK = {"backbone": "vit_tiny_patch16_224", "image_size": 128, "n": 4}


@dataclass(frozen=True)
class Settings:
    backbone: str
    weights: str
    image_size: int
    images: str
    n: int
    batch_size: int
    threads: int
    tau: float
    max_instances: int
    device: str


# A decision of the reference is rounding's call when the values it compares differ
# by less than this share of max |x|: then two correct solvers may decide differently.
AMBIGUOUS = 1e-9


@dataclass
class ReferenceResult:
    """The reference's masks for one image, [K, h, w] bool in the order found (earlier
    ones subtracted, empty ones left out), its time per stage in seconds, the cuts
    where the returned sign decided (``sign_decided``) and those where rounding could
    (``ambiguous``: see `ambiguous_cut`)."""

    masks: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)
    sign_decided: int = 0
    ambiguous: int = 0


def ambiguous_cut(x: np.ndarray, seed_values: np.ndarray, labels: np.ndarray) -> bool:
    """Whether rounding can change this cut's mask: a node within AMBIGUOUS (of max |x|)
    of the mean; near-largest |x| of both signs (the sign fix); or near-largest
    ``seed_values`` (x or -x) in different components of the foreground (the seed)."""
    tol = AMBIGUOUS * np.abs(x).max()
    peaks = x[np.abs(x) >= np.abs(x).max() - tol]
    seeds = labels.reshape(-1)[seed_values >= seed_values.max() - tol]
    return bool(np.abs(x - x.mean()).min() < tol or (peaks.min() < 0 < peaks.max()) or len(set(seeds)) > 1)


def parse_settings(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", help=f"timm ViT name (default {FULL['backbone']})")
    parser.add_argument("--weights", default="random", help="random (default, no network), hub, or PATH/URI")
    parser.add_argument("--image-size", type=int, help=f"side of the square input (default {FULL['image_size']})")
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of photos (default: the shipped DUTS-TE photos)")
    parser.add_argument("--n", type=int, help=f"photos, the first by name, cycled when fewer (default {FULL['n']})")
    parser.add_argument("--batch-size", type=int, default=8, help="images per call of ours (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads for both sides (default 1)")
    parser.add_argument("--tau", type=float, default=InstanceConfig.tau)
    parser.add_argument("--max-instances", type=int, default=InstanceConfig.max_instances)
    parser.add_argument("--device", default="cpu",
                        help="where the backbone and ours run (cpu, cuda); the reference always runs on the CPU")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['backbone']} at {QUICK['image_size']} px, {QUICK['n']} photos (seconds)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.n, args.image_size, args.batch_size, args.threads, args.max_instances) < 1:
        parser.error("--n, --image-size, --batch-size, --threads and --max-instances must be >= 1")
    return Settings(args.backbone, args.weights, args.image_size, args.images, args.n, args.batch_size,
                    args.threads, args.tau, args.max_instances, args.device)


def load_photos(folder: str, n: int, size: int) -> np.ndarray:
    """The first n photos of a folder (cycled), each resized to size x size: [n, S, S, 3]."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images in {folder}")
    photos = []
    for i in range(n):
        rgb = decode_image(paths[i % len(paths)].read_bytes())
        photos.append(np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.LANCZOS)))
    return np.stack(photos)


def features(backbone: Backbone, photos: np.ndarray, batch_size: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """Keys of every photo [n, N, C] on `device` and the backbone's seconds, in batches."""

    def run() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [backbone(to_model_input(photos[i : i + batch_size], backbone.mean, backbone.std, device))
                    for i in range(0, len(photos), batch_size)]

    t = timed(run, device)
    return torch.cat(t.result), t.wall_s


def reference_maskcut(feats: torch.Tensor, grid: tuple[int, int], patch: int, config: InstanceConfig) -> ReferenceResult:
    """MaskCut as CutLER's maskcut.py computes it, for one image's features [N, C]."""
    h, w = grid
    clock = Stopwatch()
    f = feats.float().cpu().T.clone()  # [C, N], the original's layout
    painting = np.zeros(grid)
    current = np.zeros(grid)
    found: list[np.ndarray] = []
    sign_decided = ambiguous = 0
    for i in range(config.max_instances):
        with clock("graph"):
            if i > 0:
                painting = np.where(painting + current > 0, 1.0, 0.0)
                f = (f.view(-1, h, w) * torch.from_numpy(1.0 - painting).float()).view(f.shape[0], -1)
            fn = F.normalize(f, p=2, dim=0)
            A = (fn.T @ fn).numpy() > config.tau
            A = np.where(A.astype(float) == 0, config.eps, A)
            D = np.diag(A.sum(axis=1))
        with clock("solve"):
            _, vectors = scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])
        with clock("post"):
            x = vectors[:, 0]
            returned_negative = x[np.argmax(np.abs(x))] < 0
            if returned_negative:
                x = -x
            side = x > x.mean()
            corners = side.reshape(grid)[[0, 0, -1, -1], [0, -1, 0, -1]].sum()
            reverse = config.corner_flip > 0 and corners >= config.corner_flip
            sign_decided += int(bool(returned_negative and reverse))
            seed = int(np.argmin(x) if reverse else np.argmax(x))
            fg = (~side if reverse else side).reshape(grid)
            labels, _ = ndimage.label(fg)
            ambiguous += ambiguous_cut(x, -x if reverse else x, labels)
            mask = (labels == labels.flat[seed]).astype(float)
            if i >= 1:
                union = np.logical_or(mask, current).sum()
                iou = np.logical_and(mask, current).sum() / union if union else 0.0
                if iou > config.overlap_iou or mask.mean() <= config.min_patch_frac:
                    mask = np.zeros(grid)
            current = mask
            full = np.kron(mask, np.ones((patch, patch)))  # nearest upsampling to the input
            earlier = np.sum(found, axis=0) if found else 0
            found.append(np.clip(full - earlier, 0, None))
    masks = np.stack([m[::patch, ::patch] > 0 for m in found])
    return ReferenceResult(masks[masks.reshape(len(masks), -1).any(-1)], clock.seconds, sign_decided, ambiguous)


class Stopwatch:
    """Seconds per named stage: ``with clock("solve"): ...`` adds to ``seconds["solve"]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> "_Lap":
        return _Lap(self, name)


class _Lap:
    def __init__(self, watch: Stopwatch, name: str):
        self.watch, self.name = watch, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.watch.seconds[self.name] = self.watch.seconds.get(self.name, 0.0) + time.perf_counter() - self.start


def instance_iou(ours: np.ndarray, ref: np.ndarray) -> list[float]:
    """IoU of the k-th mask of each side, k over the longer list (a missing mask: 0)."""
    ious = []
    for k in range(max(len(ours), len(ref))):
        if k >= len(ours) or k >= len(ref):
            ious.append(0.0)
            continue
        union = np.logical_or(ours[k], ref[k]).sum()
        ious.append(float(np.logical_and(ours[k], ref[k]).sum() / union))
    return ious


def our_stages(feats: torch.Tensor, grid: tuple[int, int], config: InstanceConfig) -> dict[str, float]:
    """Seconds of our graph (built once per image) and first cut's solve, alone, for the
    images of one batch taken one at a time (as `maskcut_batch` takes them on the CPU)."""
    seconds = {"graph (once per image)": 0.0, "solve (first cut)": 0.0}
    for f in feats:
        links = timed(lambda: feature_links(f[None], config.tau), feats.device)
        graph = PaintedGraph(links.result, torch.zeros(1, f.shape[0], dtype=torch.bool, device=f.device), config.eps)
        seconds["graph (once per image)"] += links.wall_s
        seconds["solve (first cut)"] += timed(lambda: solve(graph, grid, config), feats.device).wall_s
    return seconds


def run(s: Settings) -> dict:
    torch.set_num_threads(s.threads)
    config = InstanceConfig(tau=s.tau, max_instances=s.max_instances)
    with threadpool_limits(limits=s.threads):
        device = torch.device(s.device)
        backbone = build_backbone(BackboneConfig(name=s.backbone, weights=s.weights), s.image_size).eval().to(device)
        patch = backbone.patch_size
        grid = (s.image_size // patch, s.image_size // patch)
        photos = load_photos(s.images, s.n, grid[0] * patch)
        feats, t_backbone = features(backbone, photos, s.batch_size, device)
        batches = [feats[i : i + s.batch_size] for i in range(0, len(feats), s.batch_size)]
        maskcut_batch(batches[0][:1], grid, config)  # warm-up: first calls allocate
        stages = our_stages(batches[0], grid, config)
        ours, refs, t_ours, cpu = [], [], 0.0, {"ours": 0.0, "reference": 0.0}
        for b, batch in enumerate(batches):  # alternating, so that load elsewhere hits both alike
            mine = timed(lambda: maskcut_batch(batch, grid, config), device)
            theirs = timed(lambda: [reference_maskcut(f, grid, patch, config) for f in batch])
            refs += theirs.result
            cpu["ours"] += mine.cpu_s
            cpu["reference"] += theirs.cpu_s
            ours, t_ours = ours + mine.result, t_ours + mine.wall_s
            log.info("batch %d/%d: ours %.2f s, reference %.2f s", b + 1, len(batches), mine.wall_s,
                     sum(sum(r.seconds.values()) for r in refs[-len(batch):]))
    t_ref = sum(sum(r.seconds.values()) for r in refs)
    ref_stages = {k: sum(r.seconds.get(k, 0.0) for r in refs) for k in ("graph", "solve", "post")}
    ious = [v for o, r in zip(ours, refs) for v in instance_iou(o.masks, r.masks)]
    n = len(photos)
    return {
        "ratio": round(t_ref / t_ours, 3),
        "ratio_cpu": round(cpu["reference"] / cpu["ours"], 3),
        "ratio_end_to_end": round((t_backbone + t_ref) / (t_backbone + t_ours), 3),
        "mean_iou": round(float(np.mean(ious)) if ious else 1.0, 4),
        "exact_images": sum(np.array_equal(o.masks, r.masks) for o, r in zip(ours, refs)),
        "ours_ips": round(n / (t_backbone + t_ours), 3),
        "baseline_ips": round(n / (t_backbone + t_ref), 3),
        "ours_ms": round(1e3 * t_ours / n, 2),
        "baseline_ms": round(1e3 * t_ref / n, 2),
        "backbone_ms": round(1e3 * t_backbone / n, 2),
        "baseline_stage_ms": {k: round(1e3 * v / n, 2) for k, v in ref_stages.items()},
        "ours_stage_ms": {k: round(1e3 * v / len(batches[0]), 2) for k, v in stages.items()},
        "instances_ours": sum(len(o.masks) for o in ours),
        "instances_reference": sum(len(r.masks) for r in refs),
        "sign_decided_cuts": sum(r.sign_decided for r in refs),
        "ambiguous_cuts": sum(r.ambiguous for r in refs),
        "n_images": n, "tokens": grid[0] * grid[1], "batch_size": s.batch_size, "threads": s.threads,
        "backbone": s.backbone, "weights": s.weights, "random_weights": backbone.random_weights,
        "image_size": grid[0] * patch, "tau": s.tau, "max_instances": s.max_instances, "images": s.images,
        "device": s.device,
    }


def summary(r: dict) -> str:
    weights = "RANDOM weights" if r["random_weights"] else f"weights {r['weights']}"
    lines = [
        f"MaskCut instances, ours (batched, {r['batch_size']} per call) vs the published procedure "
        f"(scipy, one image at a time)",
        f"  {r['backbone']} ({weights}) at {r['image_size']} x {r['image_size']} ({r['tokens']} tokens), "
        f"{r['n_images']} photos, tau {r['tau']}, N {r['max_instances']}, {r['threads']} thread(s), ours on {r['device']}",
        f"  backbone (shared, batched)          {r['backbone_ms']:9.1f} ms/image",
        f"  reference instances                 {r['baseline_ms']:9.1f} ms/image",
        *(f"    {k:<32}  {v:9.1f}" for k, v in r["baseline_stage_ms"].items()),
        f"  ours instances                      {r['ours_ms']:9.1f} ms/image",
        *(f"    {k:<32}  {v:9.1f}  (alone)" for k, v in r["ours_stage_ms"].items()),
        f"  speed-up {r['ratio']:.1f}x on the instance stage (CPU time: {r['ratio_cpu']:.1f}x), "
        f"{r['ratio_end_to_end']:.1f}x with the backbone",
        f"  masks: mean IoU {r['mean_iou']:.4f} against the reference, {r['exact_images']}/{r['n_images']} "
        f"images identical; {r['instances_ours']} vs {r['instances_reference']} instances; "
        f"{r['sign_decided_cuts']} cut(s) where the returned sign decided the reference, "
        f"{r['ambiguous_cuts']} where rounding could (a tie within {AMBIGUOUS:g} of max |x|)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    result = run(parse_settings(argv))
    print(summary(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
