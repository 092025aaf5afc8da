"""Exactly once: SIGKILL `sempart label` (a subprocess with its own local Ray: its
process group and the rest of its session) once its first part file appears, then
`sempart label --resume` (in this process, on the shared test Ray to save a Ray start):
every input is in the readable table exactly once. Locally and with input and output
on S3 (moto server). The killed run has the default actors (one per CPU, labelling
concurrently when the kill comes); the resume, which only finishes the rest, has one."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_args import ONE_ACTOR
from instance_rows import check_instances
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from scripts import load_script

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
N_IMAGES, ROWS_PER_FILE = 40, 2
# How often the output is listed while waiting to kill: on S3 each listing costs ~4 ms of
# this process's CPU (client and moto), which the run under test would otherwise share.
POLL_S = 0.1


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((240, 320, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


class LocalStore:
    def __init__(self, root: Path):
        self.root = root

    def put(self, key: str, data: bytes) -> str:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    def uri(self, key: str) -> str:
        return str(self.root / key)

    def parts(self, prefix: str) -> list[str]:
        return sorted(str(p) for p in (self.root / prefix).glob("part-*.parquet"))

    def read(self, part: str):
        return pq.read_table(part)


class S3Store:
    def __init__(self, bucket_uri: str):
        import boto3

        from pipeline.storage import pyarrow_s3

        self.bucket = bucket_uri.removeprefix("s3://")
        self.client, self.fs = boto3.client("s3"), pyarrow_s3()

    def put(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return self.uri(key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def parts(self, prefix: str) -> list[str]:
        listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{prefix}/part-")
        return sorted(f"{self.bucket}/{o['Key']}" for o in listing.get("Contents", []))

    def read(self, part: str):
        return pq.read_table(part, filesystem=self.fs)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path):
    if request.param == "s3":
        return S3Store(request.getfixturevalue("s3_bucket"))
    return LocalStore(tmp_path / "store")


def label_args(model: str, store) -> list[str]:
    return ["label", "--model", model, "--input", store.uri("in"), "--out", store.uri("out"),
            "--rows-per-file", str(ROWS_PER_FILE), "--batch-size", "2", "--no-gpu", "--instances", "2"]


def label_process(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "SEMPART_NUM_CPUS": "2"}  # carries AWS_* of the s3 fixture
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_at_first_part(proc: subprocess.Popen, store, log: Path, timeout: float = 240) -> list[str]:
    """SIGKILL the CLI's process group (the CLI, the Ray it started) and then the rest of
    its session as soon as a part file is readable; returns the parts there once the
    listing has settled (a PUT already sent when the client died still lands)."""
    deadline = time.monotonic() + timeout
    while not store.parts("out"):
        assert proc.poll() is None, f"exited ({proc.returncode}) before writing a part:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no part file in time"
        time.sleep(POLL_S)
    os.killpg(proc.pid, signal.SIGKILL)
    kill_session(proc.pid)
    proc.wait()
    return settled_parts(store)


def settled_parts(store, quiet_s: float = 2.0) -> list[str]:
    """The listing once it has not changed for quiet_s."""
    parts = store.parts("out")
    while True:
        time.sleep(quiet_s)
        if (again := store.parts("out")) == parts:
            return parts
        parts = again


def kill_session(sid: int) -> None:
    """SIGKILL what is left of the session: Ray workers run in process groups of their
    own, and one that outlives its driver finishes the call it is in (the writer then
    writes more complete chunks under their final names, so no duplicates, but also
    little left for --resume to do). Killing them too is a crash of the whole machine."""
    for _ in range(2):
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and os.getsid(int(entry)) == sid:
                    os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_sigkill_then_resume_labels_each_input_once(store, model: str, tmp_path: Path, ray_session) -> None:
    ray_session.data.DataContext.get_current().enable_progress_bars = False
    expected = sorted(store.put(f"in/img_{i:03d}.jpg", jpeg(i)) for i in range(N_IMAGES))
    n_chunks = N_IMAGES // ROWS_PER_FILE
    log = tmp_path / "label.log"

    proc = label_process(label_args(model, store), log)
    interrupted = kill_at_first_part(proc, store, log)
    assert 1 <= len(interrupted) < n_chunks, "the kill should land before the run finishes"
    seen = Counter()
    for part in interrupted:  # what a reader sees now: complete chunks only
        uris = store.read(part).column("uri").to_pylist()
        assert len(uris) == ROWS_PER_FILE
        seen.update(uris)
    assert max(seen.values()) == 1

    result = CliRunner().invoke(app, label_args(model, store) + ["--resume", *ONE_ACTOR])
    assert result.exit_code == 0, result.output
    assert f"this run {N_IMAGES - ROWS_PER_FILE * len(interrupted)} in" in result.output  # the rest, only
    parts = store.parts("out")
    assert len(parts) == n_chunks and set(interrupted) <= set(parts)
    tables = [store.read(p) for p in parts]
    uris = sorted(u for t in tables for u in t.column("uri").to_pylist())
    assert uris == expected  # every input exactly once
    assert len({r for t in tables for r in t.column("run_id").to_pylist()}) == 1  # run kept across resume
    for row in (r for t in tables for r in t.to_pylist() if r["status"] != "error"):
        check_instances(row, 2)  # the resume labelled instances too: the run's setting


def tar_shard(samples: list[tuple[str, bytes]]) -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, data in samples:
            for name, body in ((f"{key}.jpg", data), (f"{key}.txt", key.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def parquet_file(rows: list[tuple[str, bytes]]) -> bytes:
    import pyarrow as pa

    buf = io.BytesIO()
    pq.write_table(pa.table({"key": [k for k, _ in rows], "jpg": [d for _, d in rows]}), buf, row_group_size=3)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["shards", "parquet"])
def test_sigkill_then_resume_shards_and_parquet_on_s3(kind: str, s3_bucket: str, model: str, tmp_path: Path,
                                                      ray_session) -> None:
    """The same on S3 for WebDataset shards (one file per shard) and Parquet files of image
    bytes (read by row groups; ROWS_PER_FILE rows per file); the resume runs through
    jobs/label_job.py."""
    ray_session.data.DataContext.get_current().enable_progress_bars = False
    store = S3Store(s3_bucket)
    samples = [(f"{i:05d}", jpeg(i)) for i in range(N_IMAGES // 2)]
    per_file = 2 if kind == "shards" else 8  # samples per shard or per Parquet file
    groups = [samples[i : i + per_file] for i in range(0, len(samples), per_file)]
    for g, group in enumerate(groups):
        body = tar_shard(group) if kind == "shards" else parquet_file(group)
        store.put(f"in/{g:05d}.{'tar' if kind == 'shards' else 'parquet'}", body)
    args = ["label", "--model", model, "--input", store.uri("in"), "--out", store.uri("out"), "--batch-size", "2",
            "--no-gpu"]
    if kind == "parquet":
        args += ["--id-column", "key", "--rows-per-file", str(ROWS_PER_FILE)]
    n_chunks = len(groups) if kind == "shards" else len(samples) // ROWS_PER_FILE
    log = tmp_path / "label.log"

    interrupted = kill_at_first_part(label_process(args, log), store, log, timeout=600)
    assert 1 <= len(interrupted) < n_chunks, "the kill should land before the run finishes"
    job = load_script(REPO / "jobs" / "label_job.py", "label_job")
    with pytest.raises(SystemExit) as exit_info:
        job.main(args[1:] + ["--resume", *ONE_ACTOR])
    assert exit_info.value.code == 0
    parts = store.parts("out")
    assert len(parts) == n_chunks and set(interrupted) <= set(parts)
    ids = sorted(i for p in parts for i in store.read(p).column("image_id").to_pylist())
    assert ids == [key for key, _ in samples]  # every sample exactly once, id = its key
