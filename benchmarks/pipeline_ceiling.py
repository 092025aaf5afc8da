"""The ceiling of `sempart label` itself: rows/s with a model that costs ~nothing, the
CPU cost per image of each stage, and the writer's own ceiling.

One run does three things on the same JPEGs (the DUTS-TE photos of tests/data,
re-encoded at ~500x375 into `--n` files; hard links to a few hundred distinct
encodings, so decode work is real and generation cheap):

1. `sempart label` end to end in a subprocess (local Ray, Ray Data, Parquet out) with a
   stand-in model: timm's `test_vit` (6 blocks of width 64, RANDOM weights) at 64 px,
   16 tokens per image. Reports rows/s of the labelling stage, and the CPU time of the
   driver and every process below it (Ray services and workers, from /proc), per row.
2. The same stage functions of pipeline/label.py, called in this process on a sample
   of the same files and timed with `time.process_time` (one torch thread):
   fetch (`storage.read_object`), decode + resize (`decode_image` + `prepare_image`, and
   torchvision's decoder via `gpu_decode.decode_and_prepare` on the CPU), model (the
   `Infer` actor class), finish (`finish_batch`: resize, threshold, boxes, score, RLE)
   and write (`ChunkWriter`, Parquet + rename).
3. The writer alone (`ChunkWriter`) on the rows that run 1 wrote, fed in batches of 16
   like the pipeline does: rows/s per CPU-second (one busy writer process) and per
   wall-second.

    python benchmarks/pipeline_ceiling.py --quick     # 200 images
    python benchmarks/pipeline_ceiling.py             # 20,000 images

The last line is one JSON object: `rows_per_s`, `writer_rows_per_s`, `cpu_ms_per_image`
(by stage), and the figures they come from.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PHOTOS = REPO / "tests" / "data" / "duts-te" / "images"
BACKBONE, IMAGE_SIZE = "test_vit", 64
REAL_INPUT = (320, 8)  # image_size and patch of the default model, ViT-S/8 at 320 px
VARIANTS_PER_PHOTO = 16  # distinct encodings per photo (crop offset, flip, quality)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 images, 100 in the per-stage sample.")
    parser.add_argument("--n", type=int, help="Images labelled end to end (default 20,000).")
    parser.add_argument("--sample", type=int, help="Images timed per stage in-process (default 1,000).")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sempart-ceiling", help="Images, model, outputs.")
    parser.add_argument("--interval", type=float, default=0.5, help="Seconds between /proc CPU samples.")
    args = parser.parse_args(argv)
    args.n = args.n or (200 if args.quick else 20_000)
    args.sample = min(args.n, args.sample or (100 if args.quick else 1_000))
    return args


# ---------------------------------------------------------------- inputs


def variants(photo: Path, count: int, rng: np.random.Generator) -> list[bytes]:
    """`count` ~500x375 JPEGs of one photo: resized so the longer side is 500, then
    randomly shifted, flipped and encoded at different qualities."""
    im = Image.open(photo).convert("RGB")
    scale = 520 / max(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BILINEAR)
    out = []
    for _ in range(count):
        dx, dy = (int(v) for v in rng.integers(0, 20, 2))
        crop = im.crop((dx, dy, dx + im.width - 20, dy + im.height - 20))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=int(rng.integers(75, 95)))
        out.append(buf.getvalue())
    return out


def image_folder(work: Path, n: int) -> Path:
    """n JPEG files (hard links to the distinct encodings), made once per n."""
    folder = work / f"images-{n}"
    if folder.is_dir() and len(os.listdir(folder)) == n:
        return folder
    distinct = work / "distinct"
    if not distinct.is_dir():
        tmp = work / "distinct.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for p in sorted(PHOTOS.glob("*.jpg")):
            for k, data in enumerate(variants(p, VARIANTS_PER_PHOTO, rng)):
                (tmp / f"{p.stem}-{k:02d}.jpg").write_bytes(data)
        tmp.rename(distinct)
    sources = sorted(distinct.iterdir())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(n):
        os.link(sources[i % len(sources)], folder / f"img-{i:07d}.jpg")
    return folder


def stand_in_model(work: Path) -> Path:
    out = work / f"model-{BACKBONE}-{IMAGE_SIZE}"
    if not (out / "sempart.json").is_file():
        from sempart_core.artifact import save_untrained_artifact
        from sempart_core.config import SempartConfig

        cfg = SempartConfig()
        cfg.backbone.name, cfg.backbone.weights, cfg.data.image_size = BACKBONE, "random", IMAGE_SIZE
        save_untrained_artifact(str(out), cfg)
    return out


# ---------------------------------------------------------------- 1. end to end


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of `pid` and every process below it."""
    from label_scale import descendants

    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in [pid, *descendants(pid)]:
        try:
            text = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        out[p] = (int(fields[11]) + int(fields[12])) / ticks
    return out


STARTUP_TIMEOUT = "timed out during startup"  # Ray's 30 s limit for its raylet, met on a loaded machine


def sempart_label(label_args: list[str], out: Path, on_start=None, attempts: int = 5) -> dict:
    """`sempart label ... --out OUT` in a subprocess; returns the run record. When Ray's
    node fails to start in time (a loaded machine), the run is resumed, up to `attempts`
    starts. `on_start(pid)` is called with each subprocess's pid."""
    cmd = [sys.executable, "-c", "from pipeline.cli import app; app(prog_name='sempart')",
           "label", *label_args, "--out", str(out)]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO)}
    for attempt in range(attempts):
        resume = ["--resume"] if attempt else []
        proc = subprocess.Popen(cmd + resume, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        if on_start:
            on_start(proc.pid)
        output = proc.communicate()[0]
        if proc.returncode in (0, 1) and (out / "_runs").is_dir() and "labelled" in output:
            return json.loads(next((out / "_runs").glob("*.json")).read_text())
        if STARTUP_TIMEOUT not in output:
            break
        print(f"Ray did not start in time (attempt {attempt + 1}); resuming", file=sys.stderr, flush=True)
    sys.stderr.write(output[-4000:])
    raise SystemExit(f"sempart label failed (exit {proc.returncode})")


def label_end_to_end(args: argparse.Namespace, folder: Path, model: Path) -> dict:
    """`sempart label` with the stand-in model; its rows/s and the CPU time of its
    process tree (the last value seen of each process, sampled every `--interval` s)."""
    out = args.work / f"out-{args.n}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    seen: dict[int, float] = {}
    stop = threading.Event()

    def sample(pid: int) -> None:
        while not stop.is_set():
            seen.update(tree_cpu(pid))
            stop.wait(args.interval)

    def on_start(pid: int) -> None:
        threading.Thread(target=sample, args=(pid,), daemon=True).start()

    start = time.perf_counter()
    run = sempart_label(["--model", str(model), "--input", str(folder), "--no-gpu"], out, on_start)
    stop.set()
    wall = time.perf_counter() - start
    if sum(run["counts"].values()) != args.n:
        raise SystemExit(f"expected {args.n} rows, the run record says {run['counts']}")
    return {"out": out, "wall_s": wall, "rows_per_s": run["images_per_s"], "timings": run["timings"],
            "cpu_s": sum(seen.values()), "processes": len(seen), "invocations": run["invocations"]}


# ---------------------------------------------------------------- 2. stage by stage


def stage_costs(args: argparse.Namespace, folder: Path, model: Path) -> dict[str, float]:
    """CPU-ms per image of each stage, in this process, on the first `--sample` files."""
    import pyarrow as pa
    import torch

    from pipeline import label, sources, storage
    from sempart_core.artifact import read_artifact_info
    from sempart_core.gpu_decode import _fast_path_orientation, decode_and_prepare
    from sempart_core.images import DEFAULT_MAX_PIXELS, decode_image, prepare_image

    torch.set_num_threads(1)
    info = read_artifact_info(str(model))
    patch = info.meta["patch_size"]
    uris = [str(p) for p in sorted(folder.iterdir())[: args.sample]]
    n = len(uris)
    ms: dict[str, float] = {}

    def timed(name: str, fn):
        t = time.process_time()
        result = fn()
        ms[name] = 1000 * (time.process_time() - t) / n
        return result

    datas = timed("fetch", lambda: [storage.read_object(u) for u in uris])
    timed("decode_resize", lambda: [prepare_image(decode_image(d), IMAGE_SIZE, patch) for d in datas])
    timed("decode_resize_torchvision", lambda: decode_and_prepare(datas, IMAGE_SIZE, patch))
    # The same at the product's input size (ViT-S/8 at 320 px), for sizing a cluster.
    timed("decode_resize_320", lambda: [prepare_image(decode_image(d), *REAL_INPUT) for d in datas])
    timed("decode_resize_torchvision_320", lambda: decode_and_prepare(datas, *REAL_INPUT))
    timed("jpeg_header_only", lambda: [_fast_path_orientation(d, DEFAULT_MAX_PIXELS) for d in datas])
    samples = [sources.Sample(uri=u, image_id="", data=d) for u, d in zip(uris, datas)]
    decoded = pa.concat_tables(label.decode_samples(iter(samples), 0, IMAGE_SIZE, patch))
    assert decoded.column("error").null_count == n, "a generated image failed to decode"
    infer = label.Infer(str(model), model_id=info.model_id, device="cpu", batch_size=label.DEFAULT_BATCH_SIZE, threads=1)
    inferred = timed("model", lambda: pa.concat_tables(infer(decoded.slice(s, 8)) for s in range(0, decoded.num_rows, 8)))
    finished = timed("finish", lambda: pa.concat_tables(
        label.finish_batch(inferred.slice(s, 16), info.config.post, info.model_id, "bench")
        for s in range(0, inferred.num_rows, 16)))
    out = args.work / f"stage-out-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    writer = label.ChunkWriter(str(out), "bench")
    timed("write", lambda: [writer(finished.slice(s, 16)) for s in range(0, finished.num_rows, 16)])
    shutil.rmtree(out)
    return ms


# ---------------------------------------------------------------- 3. the writer alone


def writer_ceiling(args: argparse.Namespace, labelled: Path) -> dict[str, float]:
    """ChunkWriter alone on the rows `sempart label` wrote, in batches of 16."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import label

    rows = pq.read_table(sorted(labelled.glob("part-*.parquet")))
    n, per_file = rows.num_rows, label.DEFAULT_ROWS_PER_FILE
    index = np.arange(n)
    for name, values in (("s3_retries", [None] * n), ("chunk_rows", [None] * n), ("row", index % per_file),
                         ("chunk", index // per_file)):
        rows = rows.add_column(0, name, pa.array(values, pa.int64()))
    chunks = -(-n // per_file)
    ends = pa.table({"chunk": range(chunks), "row": [-1] * chunks,
                     "chunk_rows": [min(per_file, n - k * per_file) for k in range(chunks)]})
    rows = pa.concat_tables([rows, ends], promote_options="default")
    batches = [rows.slice(s, 16) for s in range(0, rows.num_rows, 16)]
    out = args.work / f"writer-out-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    writer = label.ChunkWriter(str(out), "bench")
    wall, cpu = time.perf_counter(), time.process_time()
    files = sum(k != label.PROGRESS_ROW for b in batches for k in writer(b).column("chunk").to_pylist())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet")) == n
    shutil.rmtree(out)
    return {"rows": n, "files": files, "cpu_s": cpu, "wall_s": wall,
            "rows_per_cpu_s": n / cpu, "rows_per_wall_s": n / wall}


# ---------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    folder = image_folder(args.work, args.n)
    model = stand_in_model(args.work)
    print(f"{args.n:,} JPEGs in {folder}; model {BACKBONE} (RANDOM) at {IMAGE_SIZE} px", flush=True)
    e2e = label_end_to_end(args, folder, model)
    print(f"sempart label: {e2e['rows_per_s']:.1f} rows/s (labelling stage; {e2e['invocations']} invocation(s)), "
          f"{e2e['wall_s']:.1f} s wall in all, "
          f"{1000 * e2e['cpu_s'] / args.n:.2f} CPU-ms per row over {e2e['processes']} processes", flush=True)
    stages = stage_costs(args, folder, model)
    writer = writer_ceiling(args, e2e["out"])
    shutil.rmtree(e2e["out"])
    per_image = {k: round(v, 3) for k, v in stages.items()}
    cpu_path = sum(stages[k] for k in ("fetch", "decode_resize_320", "finish", "write"))
    device_path = sum(stages[k] for k in ("fetch", "jpeg_header_only", "finish", "write"))
    print(f"CPU-ms per image, {args.sample:,} images in-process (1 thread), {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}:")
    for k, v in stages.items():
        print(f"  {k:28} {v:8.3f}")
    print(f"  CPU stages with PIL decode (fetch + decode_resize_320 + finish + write): {cpu_path:.3f} ms "
          f"= {1000 / cpu_path:.0f} img/s per core")
    print(f"  with decode on the device (fetch + header + finish + write):            {device_path:.3f} ms "
          f"= {1000 / device_path:.0f} img/s per core")
    print(f"writer alone: {writer['rows']:,} rows into {writer['files']} files, {writer['rows_per_cpu_s']:.0f} rows "
          f"per CPU-s, {writer['rows_per_wall_s']:.0f} rows per wall-s")
    print(json.dumps({
        "rows_per_s": round(e2e["rows_per_s"], 1),
        "writer_rows_per_s": round(writer["rows_per_cpu_s"], 1),
        "writer_rows_per_wall_s": round(writer["rows_per_wall_s"], 1),
        "cpu_ms_per_image": per_image,
        "pipeline_cpu_ms_per_row": round(1000 * e2e["cpu_s"] / args.n, 3),
        "cpu_stages_ms_pil_decode": round(cpu_path, 3),
        "cpu_stages_ms_device_decode": round(device_path, 3),
        "n": args.n, "sample": args.sample, "wall_s": round(e2e["wall_s"], 1), "label_timings": e2e["timings"],
        "cpus": os.cpu_count(), "load": round(os.getloadavg()[0], 1),
    }))


if __name__ == "__main__":
    main()
