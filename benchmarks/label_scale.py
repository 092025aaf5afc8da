"""Memory of `sempart label` as the input grows: does the driver (and do the workers)
stay flat from N1 to N2 images?

Each size runs `sempart label` in a fresh subprocess (the driver; it starts its own
local Ray, so every Ray process of the run descends from it) on a folder of N small
JPEGs, with a tiny RANDOM model (vit_tiny_patch16_224; memory does not depend on the
weights). While it runs, this process samples the RSS of the driver and of its
descendants every `--interval` s from /proc (Linux), split into Ray's worker processes
(`ray::...`: decode/finish tasks, the inference actor, the writer actor) and Ray's own
services (raylet with the object store, GCS, agents). The driver's exact peak is its
kernel high-water mark (VmHWM), read by the driver itself just before it exits.

    python benchmarks/label_scale.py --quick      # 1,000 vs 4,000 images
    python benchmarks/label_scale.py              # 5,000 vs 20,000 images

Images are generated once into `--cache`/images-<N2> (noise + a flat shape, 64x64
JPEG) and reused; each size's input folder holds hard links to the first N of them.
Prints a table, then as its last line one JSON object of the figures.
"""
from __future__ import annotations

import argparse
import atexit
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FULL_SIZES = (5_000, 20_000)
QUICK_SIZES = (1_000, 4_000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SIZES[0]:,} vs {QUICK_SIZES[1]:,} images.")
    parser.add_argument("--sizes", type=int, nargs=2, metavar=("N1", "N2"), help="The two input sizes.")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "sempart-bench",
                        help="Images, model and outputs (default: sempart-bench in the temp folder).")
    parser.add_argument("--pixels", type=int, default=64, help="Side of the generated JPEGs.")
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--image-size", type=int, default=32, help="Backbone input (shorter side).")
    parser.add_argument("--interval", type=float, default=0.5, help="Seconds between RSS samples.")
    parser.add_argument("--keep", action="store_true", help="Keep the label outputs.")
    parser.add_argument("label_args", nargs="*", help="Extra `sempart label` flags (after --).")
    args = parser.parse_args(argv)
    args.sizes = tuple(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES))
    return args


# ---------------------------------------------------------------- inputs


def scene(rng: np.random.Generator, px: int) -> bytes:
    """Noise with one flat rectangle, as a JPEG (cheap: ~0.1 ms each)."""
    rgb = rng.integers(0, 90, (px, px, 3), dtype=np.uint8)
    y0, x0 = rng.integers(0, px // 2, 2)
    h, w = rng.integers(px // 4, px // 2, 2)
    rgb[y0 : y0 + h, x0 : x0 + w] = rng.integers(120, 256, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def image_pool(cache: Path, n: int, px: int) -> list[Path]:
    """n JPEGs in cache/images-n (generated once; reused when complete)."""
    folder = cache / f"images-{n}-{px}px"
    names = [folder / f"img-{i:06d}.jpg" for i in range(n)]
    if folder.is_dir() and all(p.is_file() for p in names):
        return names
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for path in names:
        path.write_bytes(scene(rng, px))
    print(f"generated {n:,} images in {folder} ({time.perf_counter() - start:.1f} s)", flush=True)
    return names


def input_folder(cache: Path, pool: list[Path], n: int) -> Path:
    """A folder of hard links to the first n images of the pool."""
    folder = cache / f"input-{n}-of-{pool[0].parent.name}"
    if folder.is_dir() and len(os.listdir(folder)) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in pool[:n]:
        os.link(path, folder / path.name)
    return folder


def model(cache: Path, backbone: str, image_size: int) -> Path:
    """A tiny model with a RANDOM backbone and untrained heads (written once)."""
    out = cache / f"model-{backbone}-{image_size}"
    if (out / "sempart.json").is_file():
        return out
    from sempart_core.artifact import save_untrained_artifact
    from sempart_core.config import SempartConfig

    cfg = SempartConfig()
    cfg.backbone.name, cfg.backbone.weights, cfg.data.image_size = backbone, "random", image_size
    save_untrained_artifact(str(out), cfg)
    return out


# ---------------------------------------------------------------- measurement


def driver_child(result: str, label_args: list[str]) -> None:
    """Run in the driver subprocess: `sempart label`, then record this process's peak
    RSS. The hook is registered before Ray is imported, so it runs after Ray's own exit
    hooks (atexit is last in, first out) and its high-water mark covers the shutdown."""

    def record() -> None:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        Path(result).write_text(json.dumps({"driver_hwm_mb": int(fields["VmHWM"].split()[0]) / 1024}))

    atexit.register(record)
    from pipeline.cli import app

    app(args=label_args, prog_name="sempart")


@dataclass
class Mem:
    """One process's resident memory (from /proc/<pid>/status), MB."""

    rss: float
    anon: float  # RssAnon: private memory, without mapped files and shared memory


def read_mem(pid: int) -> Mem:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    kb = {k: int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon")}
    return Mem(kb["VmRSS"] / 1024, kb["RssAnon"] / 1024)


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (one scan of /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def title(pid: int) -> str:
    """argv[0] of a process: Ray's workers rename themselves `ray::<task or actor>`."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")


def role(name: str) -> str:
    """A worker's title without the method being run: `MapWorker(MapBatches(Infer))`."""
    for suffix in (".submit", ".__init__", ".on_exit"):
        name = name.removesuffix(suffix)
    return name.removeprefix("ray::")


@dataclass
class Trace:
    """One process's memory over time, and the Ray tasks/actors it ran."""

    roles: set[str] = field(default_factory=set)
    points: list[tuple[float, Mem]] = field(default_factory=list)  # (seconds since start, memory)

    @property
    def peak(self) -> float:
        return max((m.rss for _, m in self.points), default=0.0)

    @property
    def peak_anon(self) -> float:
        return max((m.anon for _, m in self.points), default=0.0)

    @property
    def name(self) -> str:
        return " & ".join(sorted(self.roles)) or "IDLE"

    def timeline(self, points: int = 8) -> str:
        """RSS at evenly spaced samples, MB@seconds."""
        if not self.points:
            return "-"
        picks = [self.points[round(i * (len(self.points) - 1) / (points - 1))] for i in range(points)]
        return " ".join(f"{m.rss:.0f}@{t:.0f}s" for t, m in picks)


@dataclass
class Samples:
    """Periodic samples of the driver and its descendants, with peaks of the sums."""

    driver: Trace = field(default_factory=Trace)
    workers: dict[int, Trace] = field(default_factory=dict)  # ray:: processes by pid
    workers_sum: float = 0.0  # peak of the sum over ray:: processes, MB
    services_sum: float = 0.0  # peak of the sum over Ray's other processes, MB
    max_workers: int = 0

    def largest_by_role(self) -> dict[str, Trace]:
        """For each set of roles, its process with the highest peak RSS."""
        best: dict[str, Trace] = {}
        for trace in self.workers.values():
            if trace.peak > best.get(trace.name, Trace()).peak:
                best[trace.name] = trace
        return best


def sample_tree(pid: int, interval: float, stop: threading.Event, out: Samples) -> None:
    """Sample the memory of `pid` and its descendants until `stop` is set."""
    start = time.perf_counter()
    while not stop.is_set():
        now = time.perf_counter() - start
        try:
            out.driver.points.append((now, read_mem(pid)))
        except (OSError, KeyError):
            break  # the driver exited (a zombie has no VmRSS)
        workers, services = [], []
        for child in descendants(pid):
            try:
                mem, name = read_mem(child), title(child)
            except (OSError, KeyError):
                continue  # exited (or a zombie) between listing and reading
            if not name.startswith("ray::"):
                services.append(mem)
                continue
            workers.append(mem)
            trace = out.workers.setdefault(child, Trace())
            trace.points.append((now, mem))
            if role(name) != "IDLE":
                trace.roles.add(role(name))
        out.workers_sum = max(out.workers_sum, sum(m.rss for m in workers))
        out.services_sum = max(out.services_sum, sum(m.rss for m in services))
        out.max_workers = max(out.max_workers, len(workers))
        stop.wait(interval)


@dataclass
class Result:
    n: int
    seconds: float
    ips: float  # images/s of the labelling stage (from the run record)
    driver_peak_mb: float
    samples: Samples


def label_once(args: argparse.Namespace, folder: Path, model_dir: Path, n: int) -> Result:
    """One `sempart label` subprocess over `folder`, sampled."""
    out = args.cache / f"out-{n}-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    result = args.cache / f"driver-{n}-{os.getpid()}.json"
    label_args = ["label", "--model", str(model_dir), "--input", str(folder), "--out", str(out), *args.label_args]
    cmd = [sys.executable, __file__, "--driver-child", str(result), "--", *label_args]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples, stop = Samples(), threading.Event()
    sampler = threading.Thread(target=sample_tree, args=(proc.pid, args.interval, stop, samples), daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not result.is_file():
        sys.stderr.write(output[-4000:])
        raise SystemExit(f"sempart label on {n} images failed (exit {proc.returncode})")
    driver = json.loads(result.read_text())
    result.unlink()
    run = json.loads(next((out / "_runs").glob("*.json")).read_text())
    if sum(run["counts"].values()) != n:
        raise SystemExit(f"expected {n} rows, the run record says {run['counts']}")
    if not args.keep:
        shutil.rmtree(out)
    peak = max(driver["driver_hwm_mb"], samples.driver.peak)  # HWM can lag RSS
    return Result(n, seconds, run["images_per_s"], peak, samples)


# ---------------------------------------------------------------- report


def report(results: list[Result], args: argparse.Namespace) -> dict:
    small, large = results
    print(f"\nsempart label memory, {args.backbone} (RANDOM weights) at {args.image_size} px, "
          f"{args.pixels}x{args.pixels} JPEGs, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'images':>8} {'wall s':>7} {'img/s':>7} {'driver peak':>11} {'workers sum':>11} "
          f"{'max worker':>10} {'#workers':>8} {'ray services':>12}")
    for r in results:
        s = r.samples
        max_worker = max((t.peak for t in s.workers.values()), default=0.0)
        print(f"{r.n:>8,} {r.seconds:>7.1f} {r.ips:>7.1f} {r.driver_peak_mb:>8.0f} MB {s.workers_sum:>8.0f} MB "
              f"{max_worker:>7.0f} MB {s.max_workers:>8} {s.services_sum:>9.0f} MB")
    print("RSS over the run (MB@s):")
    roles = [r.samples.largest_by_role() for r in results]
    for r in results:
        print(f"  driver, {r.n:,} images: {r.samples.driver.timeline()}")
    for name in sorted(set(roles[0]) | set(roles[1])):
        for r, by_role in zip(results, roles):
            if name in by_role and "MapBatches" in name:  # the pipeline's own stages
                print(f"  {name[:60]}, {r.n:,} images: {by_role[name].timeline()}")
    print(f"peak RSS / private (RssAnon) MB of the largest process per role, {small.n:,} vs {large.n:,} images:")
    for name in sorted(set(roles[0]) | set(roles[1])):
        a, b = (by_role.get(name, Trace()) for by_role in roles)
        print(f"  {name[:70]:70} {a.peak:6.0f} / {a.peak_anon:5.0f}  vs {b.peak:6.0f} / {b.peak_anon:5.0f}")
    ratio = large.driver_peak_mb / small.driver_peak_mb
    workers_ratio = large.samples.workers_sum / small.samples.workers_sum
    print(f"driver peak {large.n:,}/{small.n:,}: {ratio:.3f} for {large.n / small.n:.0f}x the images; "
          f"workers (sum) {workers_ratio:.3f}")
    k1, k2 = (f"{n / 1000:g}k" for n in args.sizes)
    max_worker = [max(t.peak for t in r.samples.workers.values()) for r in results]
    return {
        f"driver_peak_rss_mb_{k1}": round(small.driver_peak_mb, 1),
        f"driver_peak_rss_mb_{k2}": round(large.driver_peak_mb, 1),
        f"workers_peak_rss_mb_{k1}": round(small.samples.workers_sum, 1),
        f"workers_peak_rss_mb_{k2}": round(large.samples.workers_sum, 1),
        f"max_worker_rss_mb_{k1}": round(max_worker[0], 1),
        f"max_worker_rss_mb_{k2}": round(max_worker[1], 1),
        "ratio": round(ratio, 3),
        "workers_ratio": round(workers_ratio, 3),
        f"ips_{k1}": round(small.ips, 1),
        f"ips_{k2}": round(large.ips, 1),
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--driver-child"]:
        driver_child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return
    args = parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    pool = image_pool(args.cache, max(args.sizes), args.pixels)
    model_dir = model(args.cache, args.backbone, args.image_size)
    results = []
    for n in args.sizes:
        folder = input_folder(args.cache, pool, n)
        print(f"labelling {n:,} images ...", flush=True)
        r = label_once(args, folder, model_dir, n)
        results.append(r)  # printed now too, so a long second size never hides the first
        print(f"  {n:,} images: {r.seconds:.1f} s, {r.ips:.1f} img/s, driver peak {r.driver_peak_mb:.0f} MB, "
              f"workers (sum) {r.samples.workers_sum:.0f} MB, load {os.getloadavg()[0]:.1f}", flush=True)
    print(json.dumps(report(results, args)))


if __name__ == "__main__":
    main()
