"""Images/s of `sempart label` (Ray Data) against a bare single-process loop, in one run.

Both sides label the same image files with the same model and write the same table:

- **ours**: `sempart label --model M --input FOLDER --out OUT` in a subprocess (local Ray
  started by the command, local files in and out);
- **baseline**: a plain loop in one subprocess, no Ray: read the bytes, `decode_image`,
  `Predictor.predict` on `--batch-size` images at a time (prepare, infer per group of
  equal input shapes, as the pipeline groups them, finish), COCO RLE, and one
  `pyarrow.parquet.write_table` of LABELS_SCHEMA rows (zstd).

Figures (nothing subtracted from either side's own work):

- *end to end*: images / wall time of the whole subprocess (Python start, imports, for
  ours `ray.init`, listing and the run record, model load, labelling, writing);
- *pipeline only*: ours from the start of the Ray Data execution to its end (inference
  actor start-up and model load included; `ray.init` and listing excluded, from the
  run record's timings), the baseline from before its model load to its written file.

The JSON's `ours_ips` / `baseline_ips` are the pipeline-only figures. With `--repeats`
R the sides alternate R times (ours, baseline, ours, ...) and each figure is the best of
its side's runs, which damps bursts of load from elsewhere on a shared machine.

Threading: on CPU the pipeline runs one single-threaded inference actor per CPU under
OMP_WAIT_POLICY=PASSIVE, its light stages at nice 10 (see `pipeline.label.build_dataset`);
the baseline is a plain loop: torch's default threads (all cores), the same
OMP_WAIT_POLICY.

    python benchmarks/label_throughput.py --quick    # vit_tiny_patch16_224 at 128 px, 64 images
    python benchmarks/label_throughput.py            # vit_small_patch8_224 at 320 px, 512 images (~18 min on 2 CPUs)
    python benchmarks/label_throughput.py --images DIR   # your own images (default: the 12 DUTS-TE
                                                     # photos in tests/data, cycled up to --n)

It also reports the fixed cost before the first row, paid once per run: `ray.init`, then
from the start of Ray Data to the first rows at the writer (the run record's
`first_row_s`: the actors start, import torch and timm and load the model), and the
model loads the run's output shows (each actor logs its load; at most one per actor,
however many blocks it labels).

Bulk labelling is the use: the default run is long enough (about 500 s per side on 2
CPUs) that Ray's fixed start-up (~10 s: `ray.init`, worker processes, the model load in
the actor) weighs as it would in a real job; `--n 32` shows that start-up instead.

The backbone has RANDOM weights (no network): the arithmetic, hence the timing, does not
depend on the weights. Prints a human summary, then as its last line one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from pipeline_ceiling import repo_on_path  # noqa: E402

# The 12 DUTS-TE photos the repository ships, cycled up to --n; pass --images for more.
DEFAULT_IMAGES = REPO / "tests" / "data" / "duts-te" / "images"
FULL = {"backbone": "vit_small_patch8_224", "image_size": 320, "n": 512, "repeats": 1}
QUICK = {"backbone": "vit_tiny_patch16_224", "image_size": 128, "n": 64, "repeats": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Tiny model, 64 images (about a minute on 2 CPUs).")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="Folder of images (default: the repository's DUTS-TE test images).")
    parser.add_argument("--n", type=int, help="Use the first N images (cycled when the folder has fewer).")
    parser.add_argument("--backbone")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int, default=8, help="Images per model call, both sides.")
    parser.add_argument("--repeats", type=int, help="Runs per side, alternating; the fastest of each counts.")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="Both sides on a GPU (default: when CUDA is available).")
    parser.add_argument("--label-args", default="", help="Extra `sempart label` flags, e.g. '--actors 2'.")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.gpu is None:
        import torch

        args.gpu = torch.cuda.is_available()
    return args


def image_folder(source: Path, n: int, scratch: Path) -> Path:
    """A folder of symlinks to the first n images of `source` (cycled if it has fewer)."""
    from pipeline.manifest import is_image_name

    files = sorted(p for p in source.iterdir() if is_image_name(p.name))
    folder = scratch / "images"
    folder.mkdir()
    for i in range(n):
        path = files[i % len(files)]
        (folder / f"{i:05d}-{path.name}").symlink_to(path)
    return folder


def make_model(out: Path, backbone: str, image_size: int) -> Path:
    """A model with a RANDOM backbone and untrained heads."""
    from sempart_core.artifact import save_untrained_artifact
    from sempart_core.config import SempartConfig

    cfg = SempartConfig()
    cfg.backbone.name, cfg.backbone.weights, cfg.data.image_size = backbone, "random", image_size
    save_untrained_artifact(str(out), cfg)
    return out


# ---------------------------------------------------------------- baseline (a subprocess)


def baseline_child(model: str, folder: str, out: str, batch_size: int, device: str) -> None:
    """The bare loop; prints its timings as JSON."""
    start = time.perf_counter()
    from datetime import datetime, timezone

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipeline.manifest import is_image_name
    from pipeline.schema import LABELS_SCHEMA, image_id_for
    from sempart_core.images import decode_image
    from sempart_core.predictor import load_predictor

    imported = time.perf_counter()
    predictor = load_predictor(model, device=device, batch_size=batch_size)
    loaded = time.perf_counter()
    paths = sorted(str(p) for p in Path(folder).iterdir() if is_image_name(p.name))
    rows, now = [], datetime.now(timezone.utc)
    for s in range(0, len(paths), batch_size):
        part = paths[s : s + batch_size]
        images = [decode_image(Path(p).read_bytes()) for p in part]
        for path, pred, rgb in zip(part, predictor.predict(images), images):
            rows.append({
                "image_id": image_id_for(path), "uri": path, "width": rgb.shape[1], "height": rgb.shape[0],
                "status": pred.status, "error": None, "mask_rle": pred.rle(), "mask_area": pred.mask_area,
                "box": pred.box, "boxes": pred.boxes, "score": pred.score, "ncut": pred.ncut,
                "model_id": predictor.model_id, "run_id": "baseline", "labeled_at": now,
            })
    pq.write_table(pa.Table.from_pylist(rows, schema=LABELS_SCHEMA), out, compression="zstd")
    end = time.perf_counter()
    print(json.dumps({"images": len(rows), "import_s": imported - start, "load_s": loaded - imported,
                      "pipeline_s": end - imported, "threads": torch.get_num_threads(),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}))


# ---------------------------------------------------------------- the two sides


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **env})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write((proc.stdout + proc.stderr)[-4000:])
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd[:4])} ...")
    return seconds, proc.stdout, proc.stderr


MODEL_LOADED = "uses a RANDOM backbone"  # the line each load of the benchmark's model logs (predictor.py)


def ours(model: Path, folder: Path, out: Path, args: argparse.Namespace) -> dict:
    """`sempart label` of this checkout in a subprocess; its run record's timings and the
    model loads its output shows (Ray forwards the actors' logs; RAY_DEDUP_LOGS=0 keeps
    the same line of different actors apart)."""
    cmd = [sys.executable, "-c", "from pipeline.cli import app; app(prog_name='sempart')",
           "label", "--model", str(model), "--input", str(folder), "--out", str(out),
           "--batch-size", str(args.batch_size), "--gpu" if args.gpu else "--no-gpu", *args.label_args.split()]
    wall, stdout, stderr = timed(cmd, {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_DEDUP_LOGS": "0",
                                       "PYTHONPATH": repo_on_path()})
    output = stdout + stderr
    run = json.loads(next((out / "_runs").glob("*.json")).read_text())
    actors = run["last_config"].get("actors") or (
        torch_gpus() if args.gpu else int(os.environ.get("SEMPART_NUM_CPUS") or os.cpu_count() or 1))
    return {"images": sum(run["counts"].values()), "wall_s": wall, "model_loads": output.count(MODEL_LOADED),
            "actors": actors, **run["timings"]}


def torch_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def baseline(model: Path, folder: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--baseline-child", str(model), str(folder), str(out), str(args.batch_size),
           "cuda" if args.gpu else "cpu"]
    wall, stdout, _ = timed(cmd, {"OMP_WAIT_POLICY": "PASSIVE"})  # as the pipeline's CPU actors
    return {"wall_s": wall, **json.loads(stdout.strip().splitlines()[-1])}


def best(runs: list[dict], key: str) -> dict:
    """The run with the least `key` seconds."""
    return min(runs, key=lambda r: r[key])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--baseline-child"]:
        baseline_child(argv[1], argv[2], argv[3], int(argv[4]), argv[5])
        return
    args = parse_args(argv)
    source = args.images
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="sempart-label-bench-") as tmp:
        scratch = Path(tmp)
        folder = image_folder(source, args.n, scratch)
        model = make_model(scratch / "model", args.backbone, args.image_size)
        for r in range(args.repeats):
            runs["ours"].append(ours(model, folder, scratch / f"out-{r}", args))
            runs["baseline"].append(baseline(model, folder, scratch / f"baseline-{r}.parquet", args))
            print(f"round {r + 1}: ours {runs['ours'][-1]['label_s']:.1f} s (wall {runs['ours'][-1]['wall_s']:.1f} s), "
                  f"baseline {runs['baseline'][-1]['pipeline_s']:.1f} s (wall {runs['baseline'][-1]['wall_s']:.1f} s), "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    n = args.n
    if any(r["images"] != n for side in runs.values() for r in side):
        raise SystemExit(f"expected {n} rows in every run: {runs}")
    o, b = best(runs["ours"], "label_s"), best(runs["baseline"], "pipeline_s")
    ours_e2e = n / best(runs["ours"], "wall_s")["wall_s"]
    base_e2e = n / best(runs["baseline"], "wall_s")["wall_s"]
    ours_ips, base_ips = n / o["label_s"], n / b["pipeline_s"]
    print(f"label throughput, {args.backbone} (RANDOM weights) at {args.image_size} px, batch {args.batch_size}, "
          f"{n} images from {source}, best of {args.repeats} run(s) per side, {os.cpu_count()} CPUs "
          f"(load {load:.1f} before, {os.getloadavg()[0]:.1f} after), {'GPU' if args.gpu else 'CPU'}; "
          f"baseline torch threads {b['threads']}, "
          f"OMP_WAIT_POLICY {b['omp_wait_policy']}")
    print(f"{'':34}{'ours':>10}{'baseline':>10}{'ratio':>8}")
    print(f"{'end to end (whole command), img/s':34}{ours_e2e:>10.2f}{base_e2e:>10.2f}{ours_e2e / base_e2e:>8.2f}")
    print(f"{'pipeline only, img/s':34}{ours_ips:>10.2f}{base_ips:>10.2f}{ours_ips / base_ips:>8.2f}")
    print("  fastest runs:")
    print(f"  ours: wall {o['wall_s']:.1f} s = ray.init {o['ray_start_s']:.1f} s + listing/setup "
          f"{o['setup_and_listing_s']:.1f} s + Ray Data {o['label_s']:.1f} s + Python start/imports/exit "
          f"{o['wall_s'] - o['total_s']:.1f} s")
    print(f"  ours, fixed cost before the first row (once per run): ray.init {o['ray_start_s']:.1f} s, then "
          f"{o['first_row_s']:.1f} s from the start of Ray Data to the first rows at the writer (actors start, "
          f"import torch and timm, load the model); model loads seen: {o['model_loads']} for "
          f"{o['actors']} inference actor(s) and {n} images (once per actor, not per block)")
    print(f"  baseline: wall {b['wall_s']:.1f} s = imports {b['import_s']:.1f} s + model load {b['load_s']:.1f} s "
          f"+ loop {b['pipeline_s'] - b['load_s']:.1f} s + Python start/exit "
          f"{b['wall_s'] - b['import_s'] - b['pipeline_s']:.1f} s")
    print(json.dumps({"ours_ips": round(ours_ips, 3), "baseline_ips": round(base_ips, 3),
                      "ratio": round(ours_ips / base_ips, 3), "ours_e2e_ips": round(ours_e2e, 3),
                      "baseline_e2e_ips": round(base_e2e, 3), "ratio_e2e": round(ours_e2e / base_e2e, 3),
                      "ours_ray_start_s": o["ray_start_s"], "ours_first_row_s": o["first_row_s"],
                      "ours_model_loads": o["model_loads"], "ours_actors": o["actors"]}))


if __name__ == "__main__":
    main()
