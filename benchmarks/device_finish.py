"""Finishing maps on the device (`device_finish.finish_on_device`) against the CPU path
(`postprocess.finish_raw`), per image: time, agreement, and the labelling's rounds.

The maps are ground-truth masks of real photos brought to the model's input size as a
model would give them (`images.input_shape`, PIL bilinear of mask / 255: soft edges),
so the masks, their components and the resize ratios are those of labelling, without a
model. For each map:

- cpu: `finish_raw` at the image's size + `Prediction.rle()` (what the finish tasks of
  `sempart label` do today, per image);
- device: `finish_on_device` on batches of `--batch-size` maps of one input shape (on
  `--device`; CUDA synchronised), timed in wall time and in this process's CPU time
  (on a GPU: what the actor's thread spends launching), then `CompactPrediction.rle()`
  (the CPU work left: compressing the runs);
- agreement of the two: smallest mask IoU, largest box and score difference;
- `label_components` rounds and pointer jumps, per image and per batch.

    python benchmarks/device_finish.py [--masks DIR] [--n 30] [--image-size 320] [--device cuda]
    python benchmarks/device_finish.py --quick

Prints a human summary, then one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sempart_core.config import PostConfig
from sempart_core.device_finish import finish_on_device, label_components, pad_masks
from sempart_core.images import input_shape
from sempart_core.postprocess import RawPrediction, finish_raw, rle_to_mask
from timing import timed  # beside this script

REPO_MASKS = Path(__file__).resolve().parents[1] / "tests" / "data" / "duts-te" / "masks"
PATCH = 8
NCUT = 0.3


@dataclass
class Figures:
    n_images: int
    image_size: int
    device: str
    threads: int
    batch_size: int
    cpu_finish_ms: float  # per image, median over repeats: finish_raw + rle
    device_finish_ms: float  # per image, wall: finish_on_device
    device_finish_cpu_ms: float  # per image, this process's CPU time during finish_on_device
    rle_from_runs_ms: float  # per image: CompactPrediction.rle on the CPU
    rounds_per_image_median: float
    rounds_per_image_max: int
    jumps_per_image_median: float
    jumps_per_image_max: int
    rounds_per_batch_max: int
    jumps_per_batch_max: int
    min_iou: float
    max_box_diff: float
    max_score_diff: float
    identical_rows: int


def model_like_maps(folder: Path, n: int, image_size: int) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """(map at the input size, the image's (height, width)) for the first `n` masks."""
    out = []
    for path in sorted(folder.glob("*.png"))[:n]:
        mask = Image.open(path).convert("L")
        h_in, w_in = input_shape(mask.height, mask.width, image_size, PATCH)
        prob = np.asarray(mask.resize((w_in, h_in), Image.Resampling.BILINEAR), np.float32) / 255.0
        out.append((prob, (mask.height, mask.width)))
    return out


def measure(maps: list[tuple[np.ndarray, tuple[int, int]]], image_size: int, device: str, batch_size: int,
            repeats: int) -> Figures:
    post = PostConfig()
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (prob, _) in enumerate(maps):
        groups[prob.shape].append(i)
    batches = [idx[s:s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]
    on_device = [torch.from_numpy(np.stack([maps[i][0] for i in b])).to(device) for b in batches]
    cpu_ms, dev_ms, dev_cpu_ms, rle_ms = [], [], [], []
    for _ in range(repeats):
        start = time.process_time()
        wanted = [finish_raw(RawPrediction(prob, NCUT), *size, post) for prob, size in maps]
        [p.rle() for p in wanted]
        cpu_ms.append((time.process_time() - start) * 1e3 / len(maps))
        got, wall, cpu = [None] * len(maps), 0.0, 0.0
        for b, tensor in zip(batches, on_device):
            t = timed(lambda: finish_on_device(tensor, [maps[i][1] for i in b], [NCUT] * len(b), post), device)
            wall, cpu = wall + t.wall_s, cpu + t.cpu_s
            for i, r in zip(b, t.result):
                got[i] = r
        dev_ms.append(wall * 1e3 / len(maps))
        dev_cpu_ms.append(cpu * 1e3 / len(maps))
        start = time.process_time()
        [g.rle() for g in got]
        rle_ms.append((time.process_time() - start) * 1e3 / len(maps))
    masks = [torch.from_numpy(rle_to_mask(g.rle())).to(device) for g in got]
    per_image = [label_components(m[None]) for m in masks]
    per_batch = [label_components(pad_masks([masks[i] for i in b])) for b in batches]
    ious, box_diffs, score_diffs = [], [0.0], []
    for g, w in zip(got, wanted):
        a, b = rle_to_mask(g.rle()), w.mask
        union = np.count_nonzero(a | b)
        ious.append(np.count_nonzero(a & b) / union if union else 1.0)
        if len(g.boxes) == len(w.boxes):
            box_diffs += [float(np.abs(np.subtract(x, y)).max()) for x, y in zip(g.boxes, w.boxes)]
        else:
            box_diffs.append(float("inf"))
        score_diffs.append(abs(g.score - w.score))
    return Figures(
        n_images=len(maps), image_size=image_size, device=device, threads=torch.get_num_threads(),
        batch_size=batch_size, cpu_finish_ms=statistics.median(cpu_ms), device_finish_ms=statistics.median(dev_ms),
        device_finish_cpu_ms=statistics.median(dev_cpu_ms), rle_from_runs_ms=statistics.median(rle_ms),
        rounds_per_image_median=statistics.median(c.rounds for c in per_image),
        rounds_per_image_max=max(c.rounds for c in per_image),
        jumps_per_image_median=statistics.median(c.jumps for c in per_image),
        jumps_per_image_max=max(c.jumps for c in per_image),
        rounds_per_batch_max=max(c.rounds for c in per_batch), jumps_per_batch_max=max(c.jumps for c in per_batch),
        min_iou=min(ious), max_box_diff=max(box_diffs), max_score_diff=max(score_diffs),
        identical_rows=sum(g.rle() == w.rle() and g.boxes == w.boxes and g.box == w.box and g.score == w.score
                           for g, w in zip(got, wanted)),
    )


def main(argv: list[str] | None = None) -> Figures:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--masks", type=Path, default=REPO_MASKS, help="a folder of 0/255 PNG masks")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=320, help="the model's input size (shorter side)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="4 masks, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.repeats = 4, 1
    torch.set_num_threads(args.threads)
    maps = model_like_maps(args.masks, args.n, args.image_size)
    if not maps:
        parser.error(f"no PNG masks in {args.masks}")
    with torch.inference_mode():
        finish_on_device(torch.from_numpy(maps[0][0][None]).to(args.device), [maps[0][1]], [NCUT], PostConfig())  # warm-up
        f = measure(maps, args.image_size, args.device, args.batch_size, args.repeats)
    print(f"{f.n_images} masks at {f.image_size} px on {f.device}, {f.threads} threads, batches of {f.batch_size}")
    print(f"per image: CPU path {f.cpu_finish_ms:.2f} ms; device path {f.device_finish_ms:.2f} ms "
          f"({f.device_finish_cpu_ms:.2f} CPU-ms) + RLE from runs {f.rle_from_runs_ms:.3f} ms")
    print(f"rounds per image: median {f.rounds_per_image_median}, max {f.rounds_per_image_max} "
          f"(jumps {f.jumps_per_image_median} / {f.jumps_per_image_max}); per batch max {f.rounds_per_batch_max} "
          f"rounds, {f.jumps_per_batch_max} jumps")
    print(f"agreement: min IoU {f.min_iou:.6f}, max box diff {f.max_box_diff}, max score diff {f.max_score_diff:.2e}, "
          f"{f.identical_rows}/{f.n_images} rows identical")
    print(json.dumps(asdict(f)))
    return f


if __name__ == "__main__":
    main()
