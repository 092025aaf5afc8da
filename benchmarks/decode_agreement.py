"""How far the device decode path is from the CPU path, on photos: inputs and masks.

`sempart label --decode gpu` prepares JPEGs with `gpu_decode.decode_and_prepare`
(torchvision's decoder, resize on the device), `--decode cpu` with PIL
(`images.decode_image` + `images.prepare_image`). This script prepares each photo both
ways and reports where they differ: the decoded pixels (torchvision's decoder against
PIL's, before any resize), the prepared inputs, and the masks one random model gives
from each (SEMPART's untrained heads, and TokenCut on the same backbone), as mask IoU.

    python benchmarks/decode_agreement.py --images DIR [--n 30] [--image-size 128]
    python benchmarks/decode_agreement.py --quick    # 4 of the repository's photos

Photos whose names are in `--exclude` (default: the repository's test photos) are
skipped, so that a figure is measured on photos the tests do not use. With --device cuda
the device path runs nvJPEG. Prints a human summary, then one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sempart_core.config import SempartConfig
from sempart_core.gpu_decode import decode_and_prepare
from sempart_core.images import decode_image, prepare_image
from sempart_core.model import build_model
from sempart_core.predictor import Predictor

log = logging.getLogger("benchmarks.decode_agreement")

REPO_PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "data" / "duts-te" / "images"
SUFFIXES = {".jpg", ".jpeg"}


@dataclass
class Figures:
    n_images: int
    image_size: int
    backbone: str
    device: str
    threads: int
    decoded_equal_frac: float  # decoded RGB values equal between torchvision and PIL
    prepared_equal_frac: float  # prepared input values equal between the two paths
    prepared_mean_abs: float
    prepared_max_abs: int
    iou_mean_sempart: float
    iou_min_sempart: float
    iou_mean_tokencut: float
    iou_min_tokencut: float


def photos(folder: Path, n: int, exclude: Path | None) -> list[Path]:
    skip = {p.name for p in exclude.iterdir()} if exclude is not None and exclude.is_dir() else set()
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.name not in skip)
    return found[:n]


def decoded_on_device(data: bytes, device: str) -> np.ndarray:
    """torchvision's decode alone (no EXIF orientation: compared on upright photos)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, device=device)
    return chw.permute(1, 2, 0).cpu().numpy()


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def measure(paths: list[Path], image_size: int, backbone: str, device: str, seed: int) -> Figures:
    cfg = SempartConfig()
    cfg.backbone.name, cfg.backbone.weights, cfg.data.image_size = backbone, "random", image_size
    vit, heads = build_model(cfg, seed=seed)
    predictors = {m: Predictor(vit, heads if m == "sempart" else None, cfg, device, method=m)
                  for m in ("sempart", "tokencut")}
    patch = vit.patch_size
    datas = [p.read_bytes() for p in paths]
    decoded_equal, prepared_equal, prepared_abs, prepared_max = [], [], [], 0
    ious: dict[str, list[float]] = {m: [] for m in predictors}
    for data, prepared in zip(datas, decode_and_prepare(datas, image_size, patch, device)):
        rgb = decode_image(data)
        decoded_equal.append(float(np.mean(decoded_on_device(data, device) == rgb)))
        cpu = prepare_image(rgb, image_size, patch)
        diff = np.abs(prepared.pixels.cpu().numpy().astype(int) - cpu)
        prepared_equal.append(float(np.mean(diff == 0)))
        prepared_abs.append(float(diff.mean()))
        prepared_max = max(prepared_max, int(diff.max()))
        for method, predictor in predictors.items():
            masks = [predictor.finish(predictor.infer(x[None])[0], *rgb.shape[:2]).mask
                     for x in (prepared.pixels, cpu)]
            ious[method].append(mask_iou(*masks))
    return Figures(
        n_images=len(paths), image_size=image_size, backbone=backbone, device=device,
        threads=torch.get_num_threads(), decoded_equal_frac=float(np.mean(decoded_equal)),
        prepared_equal_frac=float(np.mean(prepared_equal)), prepared_mean_abs=float(np.mean(prepared_abs)),
        prepared_max_abs=prepared_max, iou_mean_sempart=float(np.mean(ious["sempart"])),
        iou_min_sempart=float(np.min(ious["sempart"])), iou_mean_tokencut=float(np.mean(ious["tokencut"])),
        iou_min_tokencut=float(np.min(ious["tokencut"])),
    )


def main(argv: list[str] | None = None) -> Figures:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=REPO_PHOTOS, help="a folder of JPEG photos")
    parser.add_argument("--exclude", type=Path, default=REPO_PHOTOS,
                        help="skip photos whose names are in this folder (default: the repository's test photos)")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="4 of the repository's photos")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.exclude, args.n = REPO_PHOTOS, None, 4
    torch.set_num_threads(args.threads)
    paths = photos(args.images, args.n, args.exclude)
    if not paths:
        parser.error(f"no JPEG photos in {args.images} (after --exclude)")
    with torch.inference_mode():
        figures = measure(paths, args.image_size, args.backbone, args.device, args.seed)
    print(f"{figures.n_images} photos, {args.backbone} at {args.image_size} px, {figures.threads} threads")
    print(f"decoded values equal: {figures.decoded_equal_frac:.4%}; prepared values equal: "
          f"{figures.prepared_equal_frac:.4%} (mean |diff| {figures.prepared_mean_abs:.4f}, max {figures.prepared_max_abs})")
    print(f"mask IoU, SEMPART (untrained heads): mean {figures.iou_mean_sempart:.4f}, min {figures.iou_min_sempart:.4f}; "
          f"TokenCut: mean {figures.iou_mean_tokencut:.4f}, min {figures.iou_min_tokencut:.4f}")
    print(json.dumps(asdict(figures)))
    return figures


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
