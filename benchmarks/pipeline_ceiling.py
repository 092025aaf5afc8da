"""The CPU that `sempart label` costs per image outside the device stages, with a model
that costs ~nothing: what a GPU node's CPUs must carry, and so how many cores per GPU.

On the same JPEGs (the DUTS-TE photos of tests/data re-encoded at ~500x375; `--n` hard
links to a few hundred distinct encodings, so decode work is real and generation cheap)
and a stand-in model (timm's `test_vit`, width 64, RANDOM weights, at 64 px), one run:

1. reads the CPU per second of Ray and a Ray Data pipeline of the run's shape with no
   rows flowing: `fixed_cpu_ms_per_s`;
2. runs `sempart label --decode D --finish F` (`--no-gpu`, or `--gpu`) twice, on
   `--base-n` images and on `--n`, reading the CPU of each run's process tree (driver,
   Ray services, tasks, actors: /proc) and the inference actors' device stages (decode,
   model, finish: timed in the actor; without a GPU they run on its CPU). Per row beyond
   the small run: `device_ms_per_row`, and `cpu_ms_per_row`, the rest less the idle
   cost over the extra seconds; by process too;
3. with `--sample`, times the stage functions in this process (fetch, decode + resize,
   model, finish, write) and the writer alone on the rows run 2 wrote.

    python benchmarks/pipeline_ceiling.py --decode gpu --n 5000
    python benchmarks/pipeline_ceiling.py --decode cpu --n 20000
    python benchmarks/pipeline_ceiling.py --quick     # 200 images

The last line is one JSON object: `decode`, `finish`, `cpu_ms_per_row`,
`fixed_cpu_ms_per_s`, `device_ms_per_row`, `cores_per_gpu` and the figures they come
from (benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
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
    parser.add_argument("--decode", choices=["gpu", "cpu"], default="gpu",
                        help="gpu: the inference actor reads and decodes the images; cpu: CPU tasks decode "
                             "them with PIL (`sempart label --decode`).")
    parser.add_argument("--finish", choices=["device", "cpu"], default="device",
                        help="device: the maps finished where the model ran, as `--gpu` does by default (without "
                             "a GPU the actor's device stages run on its CPU, timed apart); cpu: in CPU tasks.")
    parser.add_argument("--gpu", action="store_true",
                        help="Label with `--gpu` (the device stages on this machine's GPUs) instead of `--no-gpu`.")
    parser.add_argument("--quick", action="store_true", help="200 images, 100 in the per-stage sample, 5 s idle.")
    parser.add_argument("--n", type=int, help="Images labelled end to end (default 20,000).")
    parser.add_argument("--sample", type=int, help="Images timed per stage in-process (default 1,000; 0: none).")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sempart-ceiling", help="Images, model, outputs.")
    parser.add_argument("--interval", type=float, default=0.5, help="Seconds between /proc CPU samples.")
    parser.add_argument("--idle-s", type=float, help="Seconds the idle pipeline's CPU is read (default 30).")
    parser.add_argument("--settle", type=float, default=5.0, help="Seconds the idle pipeline is left to settle first.")
    parser.add_argument("--base-n", type=int, default=32,
                        help="Images of the second, small run whose cost is subtracted as the run's fixed cost.")
    parser.add_argument("--gpu-rate", type=float, default=2500.0, help="img/s of one GPU, for the cores it needs.")
    args = parser.parse_args(argv)
    args.n = args.n or (200 if args.quick else 20_000)
    args.sample = min(args.n, 100 if args.quick else 1_000) if args.sample is None else min(args.n, args.sample)
    args.idle_s = args.idle_s or (5.0 if args.quick else 30.0)
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


def process_name(pid: int) -> str | None:
    """A short name: the program (raylet, gcs_server, ...), or a Ray worker's title
    (ray::MapWorker(MapBatches(Infer)), ray::MapBatches(finish_batch), ...)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    first = args[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split(" ")[0].split(".")[0]
    if "python" in Path(first).name and len(args) > 1:
        script = next((a.decode(errors="replace") for a in args[1:] if a.endswith(b".py")), "")
        return "python " + Path(script).name if script else "python"
    return Path(first).name


STARTUP_TIMEOUT = "timed out during startup"  # Ray's 30 s limit for its raylet, met on a loaded machine
FIRST_ROWS = "first rows at the writer"  # pipeline.label.consume logs it once


class TreeSampler:
    """The CPU seconds of a process tree: every process's last value seen, sampled every
    `interval` s in a thread, and on demand (`now`) at the moments that matter."""

    def __init__(self, pid: int, interval: float):
        self.pid, self.interval, self.seen, self.names = pid, interval, {}, {}
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.now()
            self.stop.wait(self.interval)

    def now(self) -> float:
        """Sample now; the tree's CPU seconds so far."""
        cpu = tree_cpu(self.pid)
        with self.lock:
            self.seen.update(cpu)
            for p in cpu:
                if p not in self.names or self.names[p].startswith(("ray::IDLE", "python")):
                    self.names[p] = process_name(p) or self.names.get(p, "?")
            return sum(self.seen.values())

    def by_name(self) -> dict[str, float]:
        """CPU seconds per kind of process (driver, raylet, gcs_server, ray::<task or actor>)."""
        out: dict[str, float] = {}
        with self.lock:
            for p, cpu in self.seen.items():
                name = "driver" if p == self.pid else self.names.get(p, "?")
                out[name] = out.get(name, 0.0) + cpu
        return out

    def close(self) -> float:
        self.stop.set()
        self.thread.join()
        with self.lock:
            return sum(self.seen.values())


def repo_on_path() -> str:
    """PYTHONPATH for a child running this checkout, keeping what the caller had there
    (packages installed with --target, as on a machine without an index)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def sempart_label(label_args: list[str], out: Path, interval: float = 0.5, attempts: int = 5) -> dict:
    """`sempart label ... --out OUT` in a subprocess running this checkout's code; returns
    the run record and, from its last start, the tree's CPU seconds and wall seconds at
    three moments: the first rows at the writer, the summary line, the exit. When Ray's
    node fails to start in time (a loaded machine), the run is resumed, up to `attempts`
    starts."""
    cmd = [sys.executable, "-c", "from pipeline.cli import app; app(prog_name='sempart')",
           "label", *label_args, "--out", str(out)]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": repo_on_path()}
    for attempt in range(attempts):
        resume = ["--resume"] if attempt else []
        start = time.perf_counter()
        proc = subprocess.Popen(cmd + resume, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        tree, marks, lines = TreeSampler(proc.pid, interval), {}, []
        for line in proc.stdout:
            lines.append(line)
            key = "first_row" if FIRST_ROWS in line else "summary" if line.startswith("labelled ") else None
            if key and key not in marks:
                marks[key] = (time.perf_counter() - start, tree.now())
                if key == "first_row":
                    marks["first_rows"] = int(re.search(r"\((\d+) rows\)", line).group(1))
        proc.wait()
        marks["exit"] = (time.perf_counter() - start, tree.close())
        output = "".join(lines)
        if proc.returncode in (0, 1) and (out / "_runs").is_dir() and "summary" in marks:
            run = json.loads(next((out / "_runs").glob("*.json")).read_text())
            return {"run": run, "marks": marks, "processes": len(tree.seen), "by_process": tree.by_name()}
        if STARTUP_TIMEOUT not in output:
            break
        print(f"Ray did not start in time (attempt {attempt + 1}); resuming", file=sys.stderr, flush=True)
    sys.stderr.write(output[-4000:])
    raise SystemExit(f"sempart label failed (exit {proc.returncode})")


def label_end_to_end(args: argparse.Namespace, n: int, model: Path) -> dict:
    """`sempart label` of `n` images with the stand-in model, `--decode` and `--finish` as given; its
    rows/s, the CPU seconds of its process tree in all and until its first rows reached
    the writer (start-up: Ray, the actors' imports and model load, the first blocks)."""
    folder = image_folder(args.work, n)
    out = args.work / f"out-{args.decode}-{args.finish}-{n}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    result = sempart_label(["--model", str(model), "--input", str(folder), "--gpu" if args.gpu else "--no-gpu",
                            "--decode", args.decode, "--finish", args.finish], out, args.interval)
    run, marks = result["run"], result["marks"]
    if sum(run["counts"].values()) != n:
        raise SystemExit(f"expected {n} rows, the run record says {run['counts']}")
    first_wall, first_cpu = marks.get("first_row", (None, None))
    if first_wall is None:
        raise SystemExit(f"no {FIRST_ROWS!r} line in the output of sempart label")
    exit_wall, exit_cpu = marks["exit"]
    return {"out": out, "rows_per_s": run["images_per_s"], "timings": run["timings"],
            "invocations": run["invocations"], "processes": result["processes"],
            "wall_s": exit_wall, "cpu_s": exit_cpu, "startup_s": first_wall, "startup_cpu_s": first_cpu,
            "device_cpu_s": run["timings"].get("device_cpu_s", 0.0), "by_process": result["by_process"]}


IDLE_CHILD = """
import os, sys, tempfile, threading, time
import ray
from pipeline.cluster import init_ray

init_ray()
workers, seconds, arrived = int(sys.argv[1]), float(sys.argv[2]), tempfile.mkdtemp()

class Waiting:  # an inference actor with nothing to do: it reports in, then waits
    def __call__(self, batch):
        open(os.path.join(arrived, str(os.getpid())), "w").close()
        time.sleep(seconds)
        return batch

class Passing:  # the writer's place, waiting for rows
    def __call__(self, batch):
        return batch

ds = ray.data.from_items([{"i": i} for i in range(workers)], override_num_blocks=workers)
ds = ds.map_batches(Waiting, batch_size=1, num_cpus=0,
                    compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1))
ds = ds.map_batches(Passing, batch_size=None, num_cpus=0, compute=ray.data.ActorPoolStrategy(size=1))
threading.Thread(target=lambda: list(ds.iter_batches(batch_size=None)), daemon=True).start()
while len(os.listdir(arrived)) < workers:
    time.sleep(0.2)
print("ready", flush=True)
time.sleep(seconds)
"""


def idle_pipeline(args: argparse.Namespace) -> dict:
    """The fixed CPU cost per second of `sempart label`'s Ray with no rows flowing: Ray
    started as `sempart label` starts it (`init_ray`, the same CPUs) and a Ray Data
    pipeline of the run's shape (one inference actor per CPU, or per GPU with `--gpu`,
    each waiting inside its first call; the writer's actor; the driver iterating;
    Ray Data's own helper actors). After `--settle` s the tree's CPU is read over
    `--idle-s` s. What Ray and Ray Data cost per second whatever the rows (the driver's
    scheduling loop, the services' polling) is so kept out of the per-row figure."""
    if args.gpu:
        import torch

        workers = torch.cuda.device_count()
    else:
        workers = int(os.environ.get("SEMPART_NUM_CPUS") or os.cpu_count() or 1)
    env = {**os.environ, "PYTHONPATH": repo_on_path(), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", IDLE_CHILD, str(workers), str(args.settle + args.idle_s + 60)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        tree = TreeSampler(proc.pid, args.interval)
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("the idle pipeline did not start")
        time.sleep(args.settle)
        t0, c0 = time.perf_counter(), tree.now()
        time.sleep(args.idle_s)
        t1, c1 = time.perf_counter(), tree.now()
        processes = len(tree.seen)
        tree.close()
    finally:
        proc.terminate()
        proc.wait()
    return {"fixed_cpu_ms_per_s": 1000 * (c1 - c0) / (t1 - t0), "idle_s": t1 - t0, "processes": processes}


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
    rows = rows.append_column("device_s", pa.nulls(n, pa.float64()))
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
    if not 0 < args.base_n < args.n:
        raise SystemExit(f"--base-n must be between 0 and --n, got {args.base_n}")
    print(f"{args.n:,} JPEGs in {folder}; model {BACKBONE} (RANDOM) at {IMAGE_SIZE} px; "
          f"--decode {args.decode} --finish {args.finish}", flush=True)
    idle = idle_pipeline(args)
    fixed = idle["fixed_cpu_ms_per_s"]
    print(f"idle pipeline ({idle['processes']} processes): {fixed:.1f} CPU-ms per second over {idle['idle_s']:.0f} s",
          flush=True)
    base = label_end_to_end(args, args.base_n, model)
    print(f"sempart label of {args.base_n} images (the fixed cost of a run): {base['wall_s']:.1f} s wall, "
          f"{base['cpu_s']:.1f} CPU-s, {base['device_cpu_s']:.1f} of them in the device stages", flush=True)
    shutil.rmtree(base["out"])
    e2e = label_end_to_end(args, args.n, model)
    n = args.n
    # Per row, from the difference of two runs (n and base_n images), so that what a run
    # pays once (Ray's start, the actors' imports and model load, first calls, shutdown)
    # drops out: the tree's CPU less the device stages (the inference actor's decode,
    # model, finish, timed in the actor: on a GPU node they run on the GPU) less the idle
    # cluster's cost over the extra seconds, per extra row.
    rows = n - args.base_n
    device_s = e2e["device_cpu_s"] - base["device_cpu_s"]
    extra_s = e2e["wall_s"] - base["wall_s"]
    cpu_per_row = 1000 * (e2e["cpu_s"] - base["cpu_s"] - device_s - fixed / 1000 * extra_s) / rows
    device_per_row = 1000 * device_s / rows
    cores = cpu_per_row * args.gpu_rate / 1000 + fixed / 1000
    if cpu_per_row <= 0:
        print(f"WARNING: the {n:,}-row run cost no more CPU outside the device stages than the {args.base_n:,}-row "
              "one: the runs' start-ups differ by more than the extra rows cost; use a larger --n", flush=True)
    t = e2e["timings"]
    print(f"sempart label: {e2e['rows_per_s']:.1f} rows/s (labelling stage; {e2e['invocations']} invocation(s)), "
          f"{e2e['wall_s']:.1f} s wall in all over {e2e['processes']} processes, {e2e['cpu_s']:.1f} CPU-s "
          f"= {1000 * e2e['cpu_s'] / n:.2f} CPU-ms per row with start-up")
    print(f"  start-up until the first rows at the writer: {e2e['startup_s']:.1f} s wall, {e2e['startup_cpu_s']:.1f} "
          f"CPU-s (ray.init {t['ray_start_s']:.1f} s, then {t['first_row_s']:.1f} s to the first rows)")
    print(f"  the {rows:,} rows more than the fixed run: {e2e['cpu_s'] - base['cpu_s']:.1f} CPU-s = device stages "
          f"{device_s:.1f} + fixed {fixed / 1000 * extra_s:.1f} ({extra_s:.1f} s) + the rest")
    by_process = {k: round(1000 * (v - base["by_process"].get(k, 0.0)) / rows, 3)
                  for k, v in sorted(e2e["by_process"].items(), key=lambda kv: -kv[1])}
    print("  CPU-ms per extra row by process (device stages included in the inference actors'): "
          + ", ".join(f"{k} {v:.2f}" for k, v in by_process.items()))
    print(f"  CPU-ms per row in CPU processes: {cpu_per_row:.2f}; in the device stages: {device_per_row:.2f}; "
          f"fixed: {fixed:.1f} CPU-ms per s")
    print(f"  cores per GPU at {args.gpu_rate:.0f} img/s: {cpu_per_row:.2f} x {args.gpu_rate / 1000:g} + "
          f"{fixed / 1000:.2f} = {cores:.1f}", flush=True)
    figures = {"decode": args.decode, "finish": args.finish, "n": n, "cpu_ms_per_row": round(cpu_per_row, 3),
               "fixed_cpu_ms_per_s": round(fixed, 2), "device_ms_per_row": round(device_per_row, 3),
               "gpu_rate": args.gpu_rate, "cores_per_gpu": round(cores, 2), "rows_per_s": round(e2e["rows_per_s"], 1),
               "wall_s": round(e2e["wall_s"], 1), "cpu_ms_per_row_with_startup": round(1000 * e2e["cpu_s"] / n, 3),
               "startup_s": round(e2e["startup_s"], 1), "startup_cpu_s": round(e2e["startup_cpu_s"], 1),
               "base_n": args.base_n, "base_cpu_s": round(base["cpu_s"], 1), "base_wall_s": round(base["wall_s"], 1),
               "cpu_s": round(e2e["cpu_s"], 1),
               "device_cpu_s": round(e2e["device_cpu_s"], 1), "label_timings": t, "processes": e2e["processes"],
               "cpu_ms_per_row_by_process": by_process}
    if args.sample:
        stages = stage_costs(args, folder, model)
        print(f"CPU-ms per image, {args.sample:,} images in-process (1 thread):")
        for k, v in stages.items():
            print(f"  {k:28} {v:8.3f}")
        figures["cpu_ms_per_image"] = {k: round(v, 3) for k, v in stages.items()}
        writer = writer_ceiling(args, e2e["out"])
        print(f"writer alone: {writer['rows']:,} rows into {writer['files']} files, {writer['rows_per_cpu_s']:.0f} rows "
              f"per CPU-s, {writer['rows_per_wall_s']:.0f} rows per wall-s")
        figures["writer_rows_per_s"] = round(writer["rows_per_cpu_s"], 1)
    shutil.rmtree(e2e["out"])
    figures.update(cpus=os.cpu_count(), load=round(os.getloadavg()[0], 1))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
