"""`sempart label` and `sempart train` on a real 3-node Ray cluster (multinode.py) while
parts of it die: a worker node SIGKILLed (raylet, object store, workers), one inference
actor's process SIGKILLed, the writer actor's process SIGKILLed, each in the middle of
a label run of 600 images; a worker node SIGKILLed during a 2-worker training run.
No run may hang: each is bounded (BOUND_S, many times a clean run), and the label watchdog (--stall-timeout) turns a stalled pipeline into a
one-line exit.

Label: each run either completes or exits 1 with one line naming the files it did not
write, and then `--resume` completes it; either way the table holds every input
exactly once with decodable masks. Train: the run recovers from its newest checkpoint
(Ray Train restarts the worker group once a replacement node has joined) or fails, and
the rerun resumes; either way it reaches its last step with `resumed_from` set.

Tiny images (40 px) and the tiny RANDOM-backbone model: this checks the machinery.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from multinode import Cluster, base_env, start_cluster
from PIL import Image
from processes import command_line, descendants_titled, kill, process_tree
from s3_fault_proxy import FaultProxy, Faults

from pipeline.schema import image_id_for
from sempart_core.postprocess import rle_to_mask

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
N_IMAGES, ROWS_PER_FILE = 600, 50
# A run still going after BOUND_S seconds is taken for hung (a clean run of either kind
# takes a minute or two here, on 2 loaded cores). STALL_S is the label watchdog's timeout in
# the fault runs, longer than Ray takes to notice a lost node and restart its actors.
BOUND_S, STALL_S = 600, "60"
# Head: the driver-side work (decode, finish, writer); each worker node: one 2-CPU
# inference actor (--actors 2 on 5 CPUs gives each actor 2), so losing a worker node
# loses an actor and the tasks and objects on that node.
HEAD_CPUS, WORKER_CPUS = 1, 2
WORKER_NODES = [WORKER_CPUS, WORKER_CPUS]


@pytest.fixture(scope="module")
def nodes() -> Iterator[Cluster]:
    cluster = start_cluster(HEAD_CPUS, WORKER_NODES)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(nodes: Cluster) -> Cluster:
    """The module's cluster with its two worker nodes up: a test that loses one without a
    replacement (the three-node run) leaves starting it to the next test, if any."""
    while len(nodes.workers()) < len(WORKER_NODES):
        nodes.add_worker(WORKER_CPUS)
    return nodes


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A text file of N_IMAGES small PNG paths."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_IMAGES):
        rgb = (rng.random((40, 40, 3)) * 80).astype(np.uint8)
        rgb[10:30, 12:28] = rng.integers(150, 255, 3)
        path = folder / f"{i:05d}.png"
        Image.fromarray(rgb).save(path)
        paths.append(str(path))
    listing = folder / "uris.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


def label_command(model: str, inputs: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "label", "--model", model, "--input", str(inputs),
            "--out", str(out), "--no-gpu", "--actors", "2", "--batch-size", "16",
            "--rows-per-file", str(ROWS_PER_FILE), *extra]


def start_cli(cluster: Cluster, command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = base_env() | {"RAY_ADDRESS": cluster.address, "PYTHONPATH": str(REPO)} | (env or {})
    with log.open("w") as f:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, bound: float) -> int:
    """The run's exit code; a run that outlives `bound` seconds is a hang: killed, failed."""
    try:
        return proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        kill(process_tree(proc.pid))
        proc.wait()
        pytest.fail(f"the run took over {bound:.0f} s: hung?\n{log.read_text()[-3000:]}")


def run_cli(cluster: Cluster, command: list[str], log: Path, bound: float, env: dict[str, str] | None = None) -> int:
    return finish(start_cli(cluster, command, log, env), log, bound)


def parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def wait_for_parts(proc: subprocess.Popen, out: Path, log: Path, count: int, bound: float) -> None:
    """Until `count` part files are written: the run is under way, far from done."""
    deadline = time.monotonic() + bound
    while len(parts(out)) < count:
        assert proc.poll() is None, f"label ended before {count} files:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {count} files in {bound:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def assert_complete(out: Path, inputs: Path) -> None:
    """Every input exactly once in the readable table, and every ok mask decodes."""
    uris = inputs.read_text().split()
    rows = [row for part in parts(out) for row in pq.read_table(part).to_pylist()]
    ids = Counter(row["image_id"] for row in rows)
    assert [i for i, n in ids.items() if n > 1] == []
    assert set(ids) == {image_id_for(u) for u in uris}
    assert sorted(row["uri"] for row in rows) == sorted(uris)
    assert {row["status"] for row in rows} <= {"ok", "empty"}
    for row in rows:
        if row["status"] == "ok":
            assert rle_to_mask(row["mask_rle"]).shape == (row["height"], row["width"])


def missing_line(log: Path) -> str:
    """The one line an incomplete run ends with."""
    [line] = [ln for ln in log.read_text().splitlines() if ln.startswith("error:")]
    assert re.search(r"\d+ of \d+ files (were )?not written \(chunks \d.*\): run again with --resume$", line), line
    return line


def resume_if_incomplete(code: int, cluster: Cluster, model: str, inputs: Path, out: Path, log: Path,
                         bound: float) -> None:
    """A failed run names what is missing; `--resume` then completes it."""
    if code != 0:
        assert code == 1, log.read_text()[-3000:]
        missing_line(log)
        resumed = out.parent / "resume.log"
        code = run_cli(cluster, label_command(model, inputs, out, "--resume"), resumed, bound)
        assert code == 0, resumed.read_text()[-3000:]
    assert_complete(out, inputs)


def test_worker_node_lost_mid_run(cluster: Cluster, model: str, inputs: Path, tmp_path: Path) -> None:
    out, log, bound = tmp_path / "out", tmp_path / "label.log", BOUND_S
    proc = start_cli(cluster, label_command(model, inputs, out, "--stall-timeout", STALL_S), log)
    wait_for_parts(proc, out, log, 3, bound)
    cluster.workers()[0].kill()
    code = finish(proc, log, bound)
    cluster.add_worker(WORKER_CPUS)  # the replacement node, as an autoscaler would bring
    resume_if_incomplete(code, cluster, model, inputs, out, log, bound)


ACTOR_TITLES = {"inference": "ray::MapWorker(MapBatches(Infer))", "writer": "ray::MapWorker(MapBatches(ChunkWriter))"}


def actor_processes(cluster: Cluster, title: str) -> list[int]:
    """Processes of the cluster's live nodes whose Ray process title starts with `title`."""
    return [pid for node in cluster.nodes if node.proc.poll() is None
            for pid in descendants_titled(node.proc.pid, title)]


@pytest.mark.parametrize("victim", ["inference", "writer"])
def test_actor_killed_mid_run(victim: str, cluster: Cluster, model: str, inputs: Path, tmp_path: Path) -> None:
    """An inference actor is restarted by Ray and its batch retried. A killed writer
    loses the rows it buffered unless Ray Data sends them again to its restarted actor:
    the run either completes, or ends naming the unwritten files and --resume writes
    them; either way every input is in the table exactly once."""
    out, log, bound = tmp_path / "out", tmp_path / "label.log", BOUND_S
    proc = start_cli(cluster, label_command(model, inputs, out, "--stall-timeout", STALL_S), log)
    wait_for_parts(proc, out, log, 3, bound)
    pids = actor_processes(cluster, ACTOR_TITLES[victim])
    assert pids, f"no {victim} actor among {[command_line(p) for p in actor_processes(cluster, 'ray::')]}"
    kill(pids[:1])
    code = finish(proc, log, bound)
    resume_if_incomplete(code, cluster, model, inputs, out, log, bound)


TRAIN_STEPS, TRAIN_EVERY = 40, 5
SAMPLE = REPO / "tests" / "data" / "train_sample"


def train_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", "--data", str(SAMPLE), "--out", str(out),
            "--name", "run", "--backbone", "vit_tiny_patch16_224", "--weights", "random", "--image-size", "32",
            "--steps", str(TRAIN_STEPS), "--batch-size", "4", "--checkpoint-every", str(TRAIN_EVERY),
            "--workers", "2", "--no-gpu"]


def test_training_worker_node_lost(cluster: Cluster, tmp_path: Path) -> None:
    """A 2-worker run (one worker per worker node) that loses a worker node after its
    first complete checkpoint; a replacement node joins at once."""
    from pipeline.train import COMPLETE_FILE

    bound = BOUND_S
    out, log = tmp_path / "runs", tmp_path / "train.log"
    fast_reports = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}  # each checkpoint report waits for a poll (2 s by default)
    proc = start_cli(cluster, train_command(out), log, fast_reports)
    marker = out / "run" / f"checkpoint_{TRAIN_EVERY:08d}" / COMPLETE_FILE
    deadline = time.monotonic() + bound
    while not marker.exists():
        assert proc.poll() is None, f"training ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint in {bound:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    cluster.workers()[0].kill()
    cluster.add_worker(WORKER_CPUS)
    code = finish(proc, log, bound)
    if code != 0:  # gave up: the rerun resumes from the newest complete checkpoint
        rerun = tmp_path / "rerun.log"
        assert run_cli(cluster, train_command(out), rerun, bound, fast_reports) == 0, rerun.read_text()[-3000:]
        resuming = re.search(r"RESUMING from step (\d+)", rerun.read_text())
        assert resuming, rerun.read_text()[-3000:]
        resumed_at = int(resuming.group(1))
    meta = json.loads((out / "run" / "model" / "sempart.json").read_text())
    assert meta["steps"] == TRAIN_STEPS
    # Resumes are recorded: a restart of the worker group inside the first run (when the
    # lost node held a training worker), and the rerun's, unless the rerun restored the
    # last step (it trains nothing then; pipeline/train.py, _restore). Each is from a
    # checkpoint taken before the end.
    resumes = meta["resumed_from"]
    assert all(TRAIN_EVERY <= step < TRAIN_STEPS for step in resumes), resumes
    if code != 0:
        assert resumed_at >= TRAIN_EVERY
        if resumed_at < TRAIN_STEPS:
            assert resumes[-1] == resumed_at, resumes


PHOTOS = [*sorted((REPO / "tests" / "data" / "duts-te" / "images").glob("*.jpg")), *sorted(SAMPLE.glob("*.jpg"))]
# What a busy S3 does (issue: a 3-node run with a throttling S3 and a node kill): 10 %
# of requests 503 SlowDown, 2 % 500, 2 % reset connections, 3 % delayed 2 s; HEAD
# answers carry no body.
BUSY_S3 = Faults(slow_down=0.10, internal_error=0.02, reset=0.02, delay=0.03, delay_s=2.0)
N_PHOTOS = 240


def photo_variants(count: int) -> Iterator[bytes]:
    """`count` distinct small JPEGs: random crops of the test photos, resized to 48-96 px."""
    rng = np.random.default_rng(0)
    sources = [Image.open(p).convert("RGB") for p in PHOTOS]
    for i in range(count):
        im = sources[i % len(sources)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        side = int(rng.integers(48, 97))
        crop = im.crop((x, y, x + cw, y + ch)).resize((side, max(8, side * ch // cw)))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=85)
        yield buf.getvalue()


def s3_keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_three_nodes_throttling_s3_and_a_node_lost(cluster: Cluster, model: str, s3_endpoint: str, s3_bucket: str,
                                                   tmp_path: Path) -> None:
    """All at once, as a user meets it: the 3-node cluster (head 1 CPU, two workers of
    2 CPUs) with the default actors, 240 photos S3 -> S3 through a throttling, resetting
    S3, and one worker node SIGKILLed once the first part file exists (no replacement
    joins). The run completes, or exits 1 naming what to --resume, which completes it
    on the two nodes left; no run hangs; every photo is in the table exactly once; the
    run record counts the S3 retries."""
    import boto3

    client, bucket = boto3.client("s3", endpoint_url=s3_endpoint), s3_bucket.removeprefix("s3://")
    for path in Path(model).iterdir():
        client.put_object(Bucket=bucket, Key=f"model/{path.name}", Body=path.read_bytes())
    uris = []
    for i, data in enumerate(photo_variants(N_PHOTOS)):
        client.put_object(Bucket=bucket, Key=f"photos/{i:04d}.jpg", Body=data)
        uris.append(f"{s3_bucket}/photos/{i:04d}.jpg")
    command = [sys.executable, "-m", "pipeline.cli", "label", "--model", f"{s3_bucket}/model",
               "--input", f"{s3_bucket}/photos", "--out", f"{s3_bucket}/labels", "--no-gpu",
               "--rows-per-file", "20", "--stall-timeout", "120"]
    bound = 900  # a clean run takes about a minute here; a hang is far longer
    log = tmp_path / "label.log"
    with FaultProxy(s3_endpoint, BUSY_S3, seed=23) as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.url}
        proc = start_cli(cluster, command, log, env)
        deadline = time.monotonic() + bound
        while not s3_keys(client, bucket, "labels/part-"):
            assert proc.poll() is None, f"label ended before its first file:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no part file in {bound} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        cluster.workers()[0].kill()
        code = finish(proc, log, bound)
        if code != 0:
            assert code == 1, log.read_text()[-3000:]
            missing_line(log)
            resumed = tmp_path / "resume.log"
            code = run_cli(cluster, [*command, "--resume"], resumed, bound, env)
            assert code == 0, resumed.read_text()[-3000:]
    assert min(proxy.counts[f] for f in ("slow_down", "internal_error", "reset", "delay")) > 0, proxy.counts

    rows = [row for key in s3_keys(client, bucket, "labels/part-")
            for row in pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())).to_pylist()]
    ids = Counter(row["image_id"] for row in rows)
    assert [i for i, n in ids.items() if n > 1] == []
    assert sorted(row["uri"] for row in rows) == sorted(uris)
    assert {row["status"] for row in rows} <= {"ok", "empty"}, [r["error"] for r in rows if r["error"]][:5]
    [record] = s3_keys(client, bucket, "labels/_runs/")
    run = json.loads(client.get_object(Bucket=bucket, Key=record)["Body"].read())
    assert run["status"] == "finished" and sum(run["counts"].values()) == N_PHOTOS
    assert run["s3_retries"] > 0, run
