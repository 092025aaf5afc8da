"""Per-image latency of SEMPART against TokenCut and TokenCut + bilateral solver, in one run.

SEMPART's claim is speed: one forward pass (backbone + heads) instead of TokenCut's
eigen-decomposition of an N x N graph per image, and no post-inference refinement
(TokenCut's masks are refined with the bilateral solver). This script times the three
end to end through `Predictor.predict` on single images (batch 1, same backbone and
size, including the resize in and the post-processing out), interleaved so that load on
the machine hits all alike, and breaks the time down into backbone, heads, graph,
eigen-solve, bilateral solver and post-processing.

Timing does not depend on training: the heads are freshly initialised and the backbone
may be random (`--weights random`, the default, needs no network).

    python benchmarks/latency.py --quick
    python benchmarks/latency.py --backbone vit_small_patch8_224 --image-size 320 --n 5

Prints a human summary, then as its last line one JSON object of the figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from sempart_core.config import BackboneConfig, DataConfig, SempartConfig
from sempart_core.bilateral import refine_mask
from sempart_core.graph import affinity, partition_ncut
from sempart_core.images import decode_image
from sempart_core.model import build_model
from sempart_core.foreground import apply_foreground_rule
from sempart_core.predictor import Predictor
from sempart_core.synthetic import synthetic_dataset
from sempart_core.tokencut import fiedler_vector
from sempart_core.training import to_model_input
from timing import timed  # beside this script

log = logging.getLogger("benchmarks.latency")

DEFAULT_IMAGES = Path(__file__).resolve().parents[1] / "tests" / "data" / "duts-te" / "images"
SYNTHETIC = "synthetic"
SYNTHETIC_SIZE = (300, 400)  # (h, w) of a typical DUTS-TE image
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# Flags left unset take these; --quick swaps in a small model (about a minute on 2 cores).
FULL = {"backbone": "vit_small_patch8_224", "image_size": 320, "n": 5, "repeats": 2}
QUICK = {"backbone": "vit_tiny_patch16_224", "image_size": 224, "n": 6, "repeats": 3}
EIGENSOLVER = "torch.linalg.eigh (float64, on the device)"
# What TokenCut's own code (object_discovery.py) runs, timed for reference on the same W.
SCIPY_EIGENSOLVER = "scipy.linalg.eigh(D - W, D, subset_by_index=[1, 2]) (float64, CPU)"
# Breakdown rows: key -> label. The end-to-end rows are "ours", "baseline", "baseline_bs".
STAGES = {
    "backbone_only": "backbone only (normalise + ViT up to the last keys)",
    "heads_only": "heads only (coarse + fine branch, foreground rule)",
    "ncut": "SEMPART's score ncut (graph built blockwise, never whole)",
    "graph": "TokenCut's graph W = affinity(features)",
    "eigen": "eigen-solve, our TokenCut (torch.linalg.eigh)",
    "eigen_scipy": "eigen-solve, TokenCut's reference (scipy.linalg.eigh)",
    "bilateral": "bilateral solver on the original image (TokenCut + BS)",
    "post": "post-processing (resize to original, threshold, boxes, score)",
}
LABEL_WIDTH = 66


@dataclass(frozen=True)
class Settings:
    backbone: str
    weights: str
    image_size: int
    images: str  # a folder of images or "synthetic"
    n: int
    device: str
    threads: int
    warmup: int
    repeats: int
    scipy_reference: bool


@dataclass
class LatencyResult:
    """Medians in milliseconds per image; `ratio` is the speed-up TokenCut / SEMPART and
    `ratio_bs` TokenCut + bilateral solver / SEMPART.

    The minima are there to judge noise: on a loaded machine medians drift up, while the
    fastest run stays close to what the hardware can do.
    """

    ours_ms: float
    baseline_ms: float
    baseline_bs_ms: float
    ratio: float
    ratio_bs: float
    ours_min_ms: float
    baseline_min_ms: float
    baseline_bs_min_ms: float
    breakdown_ms: dict[str, float]
    backbone: str
    weights: str
    random_weights: bool
    image_size: int
    device: str
    threads: int
    images: str
    n_images: int
    repeats: int
    warmup: int
    median_tokens: int
    eigensolver: str

    def to_json(self) -> str:
        """One flat JSON object: breakdown rows become `<stage>_ms` keys."""
        fields = asdict(self)
        breakdown = fields.pop("breakdown_ms")
        fields.update({f"{k}_ms": round(v, 3) for k, v in breakdown.items()})
        return json.dumps(fields)


def parse_settings(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", help=f"timm ViT name (default {FULL['backbone']})")
    parser.add_argument("--weights", default="random",
                        help="random (default, no network), hub, or a weights PATH/URI")
    parser.add_argument("--image-size", type=int, help=f"shorter side (default {FULL['image_size']})")
    parser.add_argument("--images", help=f"folder of images, or '{SYNTHETIC}' (default "
                        f"{DEFAULT_IMAGES} if present, else synthetic scenes)")
    parser.add_argument("--n", type=int, help=f"number of images (default {FULL['n']})")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch and BLAS threads (default: torch's current setting)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each stage first")
    parser.add_argument("--repeats", type=int, help=f"timed runs per image (default {FULL['repeats']})")
    parser.add_argument("--no-scipy-reference", dest="scipy_reference", action="store_false",
                        help="skip timing TokenCut's reference scipy eigen-solve")
    parser.add_argument("--quick", action="store_true",
                        help=f"small run: {QUICK['backbone']} at {QUICK['image_size']}, "
                        f"{QUICK['n']} images")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.images is None:
        args.images = str(DEFAULT_IMAGES) if DEFAULT_IMAGES.is_dir() else SYNTHETIC
    if min(args.n, args.image_size, args.threads, args.repeats) < 1 or args.warmup < 0:
        parser.error("--n, --image-size, --threads and --repeats must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return Settings(args.backbone, args.weights, args.image_size, args.images, args.n,
                    args.device, args.threads, args.warmup, args.repeats, args.scipy_reference)


def load_images(source: str, n: int) -> list[np.ndarray]:
    """The first n images of a folder (sorted by name), or n synthetic scenes."""
    if source == SYNTHETIC:
        return synthetic_dataset(n, size=SYNTHETIC_SIZE)[0]
    paths = sorted(p for p in Path(source).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
    return [decode_image(p.read_bytes()) for p in paths[:n]]


def build_predictors(s: Settings) -> tuple[Predictor, Predictor, Predictor]:
    """SEMPART (untrained heads), TokenCut and TokenCut + BS sharing one backbone, batch 1."""
    config = SempartConfig(
        backbone=BackboneConfig(name=s.backbone, weights=s.weights),
        data=DataConfig(image_size=s.image_size),
    )
    backbone, heads = build_model(config, seed=0)
    ours = Predictor(backbone, heads, config, s.device, method="sempart", batch_size=1)
    baseline = Predictor(backbone, None, config, s.device, method="tokencut", batch_size=1)
    baseline_bs = Predictor(backbone, None, config, s.device, method="tokencut-bs", batch_size=1)
    return ours, baseline, baseline_bs


@contextmanager
def inference(predictor: Predictor) -> Iterator[None]:
    """The same no-grad and autocast context as `Predictor.infer` uses."""
    dtype = predictor.autocast_dtype
    with torch.inference_mode(), torch.autocast(
        predictor.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
    ):
        yield


def scipy_fiedler(w: torch.Tensor) -> np.ndarray:
    """TokenCut's reference eigen-solve (its object_discovery.py) for one graph [1, N, N]."""
    a = w[0].double().cpu().numpy()
    d = np.diag(a.sum(axis=1))
    _, vectors = scipy.linalg.eigh(d - a, d, subset_by_index=[1, 2])
    return vectors[:, 0]


def stage_calls(ours: Predictor, baseline: Predictor, baseline_bs: Predictor, rgb: np.ndarray,
                scipy_reference: bool) -> dict[str, Callable[[], object]]:
    """One zero-argument call per timed row, with its inputs computed beforehand."""
    prepared = ours.prepare(rgb)[None]
    backbone, heads, graph = ours.backbone, ours.heads, ours.config.graph

    def run_backbone() -> torch.Tensor:
        with inference(ours):
            return backbone(to_model_input(prepared, backbone.mean, backbone.std, ours.device))

    x = to_model_input(prepared, backbone.mean, backbone.std, ours.device)
    feats = run_backbone()
    w = affinity(feats, graph.tau, graph.eps)
    raw = ours.infer(prepared)[0]
    hard = torch.from_numpy((raw.coarse > 0.5).reshape(1, -1).astype(np.float32)).to(ours.device)
    tokencut_mask = baseline.predict([rgb])[0].mask

    def run_heads() -> tuple[torch.Tensor, torch.Tensor]:
        with inference(ours):
            out = heads(feats, x)
            return apply_foreground_rule(out.coarse, out.fine)

    def run_graph() -> torch.Tensor:
        with inference(ours):
            return affinity(feats, graph.tau, graph.eps)

    calls: dict[str, Callable[[], object]] = {
        "ours": lambda: ours.predict([rgb]),
        "baseline": lambda: baseline.predict([rgb]),
        "baseline_bs": lambda: baseline_bs.predict([rgb]),
        "backbone_only": run_backbone,
        "heads_only": run_heads,
        "ncut": lambda: partition_ncut(feats, hard, graph.tau, graph.eps, clamp_eps=1e-6),
        "graph": run_graph,
        "eigen": lambda: fiedler_vector(w),
        "bilateral": lambda: refine_mask(rgb, tokencut_mask, baseline_bs.bilateral),
        "post": lambda: ours.finish(raw, *rgb.shape[:2]),
    }
    if scipy_reference:
        calls["eigen_scipy"] = lambda: scipy_fiedler(w)
    return calls


def measure(ours: Predictor, baseline: Predictor, baseline_bs: Predictor, images: list[np.ndarray],
            s: Settings) -> dict[str, list[float]]:
    """Samples per row: warm-up on the first image, then rounds over every row per image.

    Rows alternate within each round, so a burst of load elsewhere on the machine
    slows SEMPART and TokenCut alike instead of biasing the ratios.
    """
    samples: dict[str, list[float]] = defaultdict(list)
    for i, rgb in enumerate(images):
        calls = stage_calls(ours, baseline, baseline_bs, rgb, s.scipy_reference)
        if i == 0:
            for _ in range(s.warmup):
                for call in calls.values():
                    call()
        for _ in range(s.repeats):
            for name, call in calls.items():
                samples[name].append(timed(call, ours.device).wall_s * 1e3)
        log.info("image %d/%d %s: ours %.1f ms, TokenCut %.1f ms, TokenCut + BS %.1f ms", i + 1,
                 len(images), "x".join(map(str, rgb.shape[:2])), samples["ours"][-1],
                 samples["baseline"][-1], samples["baseline_bs"][-1])
    return samples


def median_tokens(predictor: Predictor, images: list[np.ndarray]) -> int:
    p = predictor.patch
    return int(statistics.median(
        (q.shape[0] // p) * (q.shape[1] // p) for q in map(predictor.prepare, images)))


def run_benchmark(s: Settings) -> LatencyResult:
    torch.set_num_threads(s.threads)
    with threadpool_limits(limits=s.threads):  # scipy's BLAS too, for the reference solve
        ours, baseline, baseline_bs = build_predictors(s)
        images = load_images(s.images, s.n)
        samples = measure(ours, baseline, baseline_bs, images, s)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ours_ms, baseline_ms = medians.pop("ours"), medians.pop("baseline")
    baseline_bs_ms = medians.pop("baseline_bs")
    return LatencyResult(
        ours_ms=round(ours_ms, 3),
        baseline_ms=round(baseline_ms, 3),
        baseline_bs_ms=round(baseline_bs_ms, 3),
        ratio=round(baseline_ms / ours_ms, 3),
        ratio_bs=round(baseline_bs_ms / ours_ms, 3),
        ours_min_ms=round(min(samples["ours"]), 3),
        baseline_min_ms=round(min(samples["baseline"]), 3),
        baseline_bs_min_ms=round(min(samples["baseline_bs"]), 3),
        breakdown_ms=medians,
        backbone=s.backbone,
        weights=s.weights,
        random_weights=ours.backbone.random_weights,
        image_size=s.image_size,
        device=str(ours.device),
        threads=s.threads,
        images=s.images,
        n_images=len(images),
        repeats=s.repeats,
        warmup=s.warmup,
        median_tokens=median_tokens(ours, images),
        eigensolver=EIGENSOLVER,
    )


def summary(r: LatencyResult) -> str:
    """The human-readable report printed above the JSON line."""
    b = r.breakdown_ms
    weights = ("RANDOM weights: the arithmetic, and so the timing, does not depend on the "
               "weights" if r.random_weights else f"weights {r.weights}")
    ours_parts = b["backbone_only"] + b["heads_only"] + b["ncut"] + b["post"]
    baseline_parts = b["backbone_only"] + b["graph"] + b["eigen"] + b["post"]
    lines = [
        f"Latency per image, batch 1: SEMPART vs TokenCut (+ BS) on the same backbone "
        f"(median of {r.n_images} images x {r.repeats} repeats, {r.warmup} warm-up)",
        f"  backbone {r.backbone} ({weights}); heads untrained (random init)",
        f"  image size {r.image_size} (median {r.median_tokens} tokens), device {r.device}, "
        f"{r.threads} threads, images: {r.images}",
        f"  SEMPART  Predictor.predict (backbone + heads + post):        {r.ours_ms:9.1f} ms"
        f"  (fastest {r.ours_min_ms:.1f})",
        f"  TokenCut Predictor.predict (backbone + eigen-solve + post):  {r.baseline_ms:9.1f} ms"
        f"  (fastest {r.baseline_min_ms:.1f})",
        f"  TokenCut + BS (the above + bilateral solver):                {r.baseline_bs_ms:9.1f} ms"
        f"  (fastest {r.baseline_bs_min_ms:.1f})",
        f"  speed-up TokenCut / SEMPART: {r.ratio:.2f}x, TokenCut + BS / SEMPART: {r.ratio_bs:.2f}x "
        f"(TokenCut solver: {r.eigensolver})",
        "  breakdown (median ms per image):",
        *(f"    {label:<{LABEL_WIDTH}} {b[key]:9.1f}" for key, label in STAGES.items() if key in b),
        f"    {'SEMPART end-to-end - parts (resize in, ncut score; and noise)':<{LABEL_WIDTH}} "
        f"{r.ours_ms - ours_parts:9.1f}",
        f"    {'TokenCut end-to-end - parts (resize in, split, ncut; and noise)':<{LABEL_WIDTH}} "
        f"{r.baseline_ms - baseline_parts:9.1f}",
        f"    {'TokenCut + BS end-to-end - TokenCut - bilateral (noise)':<{LABEL_WIDTH}} "
        f"{r.baseline_bs_ms - r.baseline_ms - b['bilateral']:9.1f}",
    ]
    if "eigen_scipy" in b:
        lines.append(f"  TokenCut's reference solver: {SCIPY_EIGENSOLVER}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    result = run_benchmark(parse_settings(argv))
    print(summary(result))
    print(result.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
