"""One short run that measures a GPU for sempart (benchmarks/gpu_check.sh calls this).

Needs torch, torchvision, timm, pyarrow, pillow (no network: RANDOM weights, images from
tests/data/duts-te). Steps, all on the same images:

1. model forward img/s: timm ViT (forward_features) in bf16, the best of a few batches;
2. `Predictor.predict` end to end with CPU decode (PIL on a thread pool per core) and
   the same images through `gpu_decode.decode_and_prepare` on the device;
3. where the time goes, per image: decode (PIL / device), host-to-device transfer of
   prepared batches (pinned, non-blocking), model (`Predictor.infer`), post-processing
   (`Predictor.finish`: resize, threshold, boxes);
4. SEMPART against TokenCut, per-image latency (batch 1);
5. a training step (heads on the frozen backbone) in bf16, img/s;
6. the device's peak memory;
7. when `ray` imports: `sempart label` end to end on local JPEGs, img/s against step 1.

`--cpu` runs every step tiny on the CPU (a ViT-Ti/16 at 64 px) so that the script is
tested everywhere. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from timing import timed  # noqa: E402


@dataclass
class Plan:
    """Sizes of one check: the full GPU run or the tiny CPU one."""

    device: str
    backbone: str
    image_size: int
    forward_batches: tuple[int, ...]
    images: int  # in memory, for predict and the time split
    batch_size: int  # Predictor batch
    latency_repeats: int
    train_batch: int
    train_steps: int
    label_images: int


GPU_PLAN = Plan("cuda", "vit_small_patch8_224", 320, (32, 64, 128), 512, 32, 10, 32, 10, 3000)
CPU_PLAN = Plan("cpu", "vit_tiny_patch16_224", 64, (2, 4), 8, 4, 2, 2, 2, 16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="Every step, tiny, on the CPU.")
    parser.add_argument("--work", type=Path, help="Folder for the model, images and label output (default: a temp dir).")
    parser.add_argument("--no-label", action="store_true", help="Skip the `sempart label` step even if ray imports.")
    return parser.parse_args(argv)


def photo_bytes(n: int) -> list[bytes]:
    """n JPEGs at ~500x375: the DUTS photos re-encoded (as pipeline_ceiling makes them)."""
    import numpy as np

    from pipeline_ceiling import PHOTOS, variants

    rng = np.random.default_rng(0)
    photos = sorted(PHOTOS.glob("*.jpg"))
    per = -(-n // len(photos))
    return [d for p in photos for d in variants(p, per, rng)][:n]


def model_forward(plan: Plan) -> dict[int, float]:
    """img/s of the bare ViT forward in bf16 (autocast on CUDA) per batch size."""
    import torch

    from sempart_core.backbone import create_vit

    vit = create_vit(plan.backbone, image_size=plan.image_size).to(plan.device).eval()
    rates = {}
    for b in plan.forward_batches:
        x = torch.randn(b, 3, plan.image_size, plan.image_size, device=plan.device)
        with torch.inference_mode(), torch.autocast(plan.device, dtype=torch.bfloat16, enabled=plan.device == "cuda"):
            vit.forward_features(x)  # warm-up (kernel selection)
            seconds = min(timed(lambda: vit.forward_features(x), plan.device).wall_s for _ in range(3))
        rates[b] = b / seconds
    del vit
    return rates


def predict_device_decode(predictor, datas: list[bytes]) -> list:
    """What `Predictor.predict` does, from bytes, with decode and resize on the device."""
    import torch

    from sempart_core.gpu_decode import decode_and_prepare

    prepared = decode_and_prepare(datas, predictor.config.data.image_size, predictor.patch, predictor.device)
    groups = defaultdict(list)
    for i, p in enumerate(prepared):
        groups[tuple(p.pixels.shape)].append(i)
    results = [None] * len(datas)
    for idx in groups.values():
        for s in range(0, len(idx), predictor.batch_size):
            part = idx[s : s + predictor.batch_size]
            raws = predictor.infer(torch.stack([prepared[i].pixels for i in part]))
            for i, raw in zip(part, raws):
                results[i] = predictor.finish(raw, prepared[i].height, prepared[i].width)
    return results


def decode_on_cpu(datas: list[bytes], threads: int) -> list:
    from sempart_core.images import decode_image

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(decode_image, datas))


def time_split(predictor, datas: list[bytes], threads: int) -> dict[str, float]:
    """ms per image of each step, each timed alone over all the images."""
    import numpy as np
    import torch

    from sempart_core.gpu_decode import decode_and_prepare
    from sempart_core.prefetch import DeviceCopier, prefetch

    n, size, patch, device = len(datas), predictor.config.data.image_size, predictor.patch, predictor.device
    pil = timed(lambda: decode_on_cpu(datas, threads), device)
    rgbs = pil.result
    resize = timed(lambda: [predictor.prepare(r) for r in rgbs], device)
    host = resize.result
    on_device_decode = timed(lambda: decode_and_prepare(datas, size, patch, device), device)
    groups = defaultdict(list)
    for i, p in enumerate(host):
        groups[p.shape].append(i)
    batches = [torch.from_numpy(np.stack([host[i] for i in idx[s : s + predictor.batch_size]]))
               for idx in groups.values() for s in range(0, len(idx), predictor.batch_size)]
    copier = DeviceCopier(device)
    copy = timed(lambda: list(prefetch(batches, copier)), device)
    model = timed(lambda: [r for b in copy.result for r in predictor.infer(b)], device)
    order = [i for idx in groups.values() for s in range(0, len(idx), predictor.batch_size)
             for i in idx[s : s + predictor.batch_size]]
    post = timed(lambda: [predictor.finish(raw, *rgbs[i].shape[:2]) for i, raw in zip(order, model.result)], device)
    ms = lambda t: round(1000 * t.wall_s / n, 3)  # noqa: E731
    return {"decode_pil_threads": ms(pil), "resize_pil": ms(resize), "decode_resize_device": ms(on_device_decode),
            "transfer": ms(copy), "model": ms(model), "post": ms(post), "decode_threads": threads}


def latency(predictor_for, image, repeats: int) -> dict[str, float]:
    """Median ms of `predict` on one image, SEMPART and TokenCut alternating."""
    times = {m: [] for m in ("sempart", "tokencut")}
    predictors = {m: predictor_for(m) for m in times}
    for m, p in predictors.items():
        p.predict([image])  # warm-up
    for _ in range(repeats):
        for m, p in predictors.items():
            times[m].append(timed(lambda: p.predict([image]), p.device).wall_s)
    return {m: round(1000 * statistics.median(t), 2) for m, t in times.items()}


def train_step_rate(plan: Plan, cfg) -> float:
    """img/s of `training_step` (bf16 autocast on CUDA) on random uint8 batches."""
    import torch

    from sempart_core.model import build_model
    from sempart_core.training import make_optimizer, training_step

    backbone, heads = build_model(cfg, seed=0)
    backbone, heads = backbone.to(plan.device), heads.to(plan.device).train()
    opt = make_optimizer(heads, cfg.train)
    dtype = torch.bfloat16 if plan.device == "cuda" else None
    batch = torch.randint(0, 256, (plan.train_batch, plan.image_size, plan.image_size, 3), dtype=torch.uint8,
                          device=plan.device)
    step = lambda: training_step(backbone, heads, batch, opt, None, cfg, plan.device, dtype)  # noqa: E731
    step()  # warm-up
    seconds = timed(lambda: [step() for _ in range(plan.train_steps)], plan.device).wall_s
    return plan.train_batch * plan.train_steps / seconds


def label_end_to_end(plan: Plan, work: Path, model: Path) -> dict:
    """`sempart label` on local JPEGs in a subprocess; its run record's img/s."""
    from pipeline_ceiling import image_folder, sempart_label

    folder = image_folder(work, plan.label_images)
    label_args = ["--model", str(model), "--input", str(folder), "--batch-size", str(plan.batch_size),
                  *(["--no-gpu"] if plan.device == "cpu" else [])]
    run = sempart_label(label_args, work / "label-out")["run"]
    return {"images": sum(run["counts"].values()), "ips": run["images_per_s"], "timings": run["timings"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    import torchvision

    from sempart_core.artifact import save_untrained_artifact
    from sempart_core.config import SempartConfig
    from sempart_core.images import decode_image
    from sempart_core.predictor import load_predictor

    plan = CPU_PLAN if args.cpu else GPU_PLAN
    if args.cpu:
        torch.set_num_threads(1)  # tiny models: more threads only wait on each other
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu")
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="sempart-gpu-check-"))
    threads = os.cpu_count() or 1
    report: dict = {"device": torch.cuda.get_device_name() if plan.device == "cuda" else "cpu", "cpus": threads,
                    "torch": torch.__version__, "torchvision": torchvision.__version__,
                    "model": f"{plan.backbone} (RANDOM weights) at {plan.image_size} px"}

    def step(name: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {name}", file=sys.stderr, flush=True)

    step("model forward")
    rates = model_forward(plan)
    report["model_forward_ips"] = round(max(rates.values()), 1)
    report["model_forward_ips_by_batch"] = {b: round(r, 1) for b, r in rates.items()}

    cfg = SempartConfig()
    cfg.backbone.name, cfg.backbone.weights, cfg.data.image_size = plan.backbone, "random", plan.image_size
    model = work / "model"
    save_untrained_artifact(str(model), cfg)
    predictor_for = lambda method: load_predictor(str(model), plan.device, method, plan.batch_size)  # noqa: E731
    predictor = predictor_for("sempart")
    datas = photo_bytes(plan.images)

    step("predict, CPU decode and device decode")
    predictor.predict([decode_image(d) for d in datas[: plan.batch_size]])  # warm-up
    predict_device_decode(predictor, datas[: plan.batch_size])
    t_cpu = timed(lambda: predictor.predict(decode_on_cpu(datas, threads)), plan.device).wall_s
    t_dev = timed(lambda: predict_device_decode(predictor, datas), plan.device).wall_s
    report["predict_ips_cpu_decode"] = round(len(datas) / t_cpu, 1)
    report["predict_ips_device_decode"] = round(len(datas) / t_dev, 1)

    step("time split")
    report["ms_per_image"] = time_split(predictor, datas, threads)

    step("SEMPART vs TokenCut latency")
    report["latency_ms"] = latency(predictor_for, decode_image(datas[0]), plan.latency_repeats)

    step("training step")
    train_cfg = SempartConfig.from_dict(cfg.to_dict())
    train_cfg.train.batch_size = plan.train_batch
    report["train_step_ips"] = round(train_step_rate(plan, train_cfg), 1)
    if plan.device == "cuda":
        report["gpu_memory_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)

    if args.no_label:
        report["label"] = "skipped (--no-label)"
    elif importlib.util.find_spec("ray") is None:
        report["label"] = "skipped: ray is not installed"
    else:
        step(f"sempart label on {plan.label_images} images")
        report["label"] = label_end_to_end(plan, work, model)
        if "ips" in report["label"]:
            report["label"]["vs_model_forward"] = round(report["label"]["ips"] / report["model_forward_ips"], 3)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
