"""`sempart label --resume --retry-errors`: the error rows of a run are labelled again in
place. Images missing when the run read them are put back; the retry turns their rows
ok, rewrites only the part files that held errors, keeps one row per image, and a row
that fails again keeps error status with its new reason. Killed midway, a rerun
retries what is still an error. The model is a tiny RANDOM backbone."""
from __future__ import annotations

import io
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from cli_args import ONE_ACTOR
from test_label_resume import LocalStore, S3Store, kill_session, label_process
from instance_rows import check_instances
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.outdir import ATTEMPTS_KEY
from pipeline.manifest import build_manifest
from sempart_core.postprocess import rle_to_mask

pytestmark = pytest.mark.integration


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path):
    if request.param == "s3":
        return S3Store(request.getfixturevalue("s3_bucket"))
    return LocalStore(tmp_path / "store")


def remove(store, key: str) -> None:
    if isinstance(store, S3Store):
        store.client.delete_object(Bucket=store.bucket, Key=key)
    else:
        Path(store.uri(key)).unlink()


def raw(store, part: str) -> bytes:
    if isinstance(store, S3Store):
        bucket, key = part.split("/", 1)
        return store.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(part).read_bytes()


def attempts(store, part: str) -> dict[str, int]:
    meta = pq.read_metadata(part, filesystem=getattr(store, "fs", None)).metadata
    return json.loads(meta.get(ATTEMPTS_KEY, b"{}"))


def table(store) -> list[dict]:
    return [row for part in store.parts("out") for row in store.read(part).to_pylist()]


def check_table(rows: list[dict], expected_uris: list[str]) -> None:
    """One row per input image; every ok mask decodes at the image's size."""
    assert sorted(r["uri"] for r in rows) == sorted(expected_uris)
    for r in rows:
        if r["status"] != "error":
            assert rle_to_mask(r["mask_rle"]).shape == (r["height"], r["width"])


def label(store, manifest: str, model: str, *extra: str):
    args = ["label", "--model", model, "--input", manifest, "--out", store.uri("out"), "--rows-per-file", "3",
            "--batch-size", "4", "--no-gpu", *ONE_ACTOR, *extra]
    return CliRunner().invoke(app, args)


def test_retry_errors_relabels_error_rows_in_place(store, model: str, tmp_path: Path, ray_session) -> None:
    ray_session.data.DataContext.get_current().enable_progress_bars = False
    uris = [store.put(f"in/img_{i:02d}.png", png(i)) for i in range(10)]
    manifest = str(tmp_path / "manifest.parquet")
    assert build_manifest(store.uri("in"), manifest) == 10
    missing = {1: "FileNotFoundError", 4: "FileNotFoundError", 9: "FileNotFoundError"}  # files 0, 1 and 3 of 4
    for i in missing:
        remove(store, f"in/img_{i:02d}.png")

    first = label(store, manifest, model, "--instances", "2")
    assert first.exit_code == 1 and "error 3" in first.output, first.output
    parts = store.parts("out")
    assert len(parts) == 4
    before = {p: raw(store, p) for p in parts}

    store.put("in/img_01.png", png(1))
    store.put("in/img_04.png", png(4))
    store.put("in/img_09.png", b"still not an image\n")  # fails again, for a new reason
    second = label(store, manifest, model, "--resume", "--retry-errors")
    assert second.exit_code == 1, second.output
    assert "retried 3 error rows, 1 still errors" in second.output and "error 1" in second.output
    assert store.parts("out") == parts
    assert raw(store, parts[2]) == before[parts[2]]  # the file without errors is not rewritten
    assert all(raw(store, p) != before[p] for p in (parts[0], parts[1], parts[3]))
    rows = table(store)
    check_table(rows, uris)
    by_uri = {r["uri"]: r for r in rows}
    for i, uri in enumerate(uris):
        if i == 9:
            assert by_uri[uri]["status"] == "error" and by_uri[uri]["error"].startswith("NotAnImageError")
        else:
            assert by_uri[uri]["status"] in ("ok", "empty") and by_uri[uri]["error"] is None, by_uri[uri]["error"]
            check_instances(by_uri[uri], 2)  # relabelled rows get the run's instances too
    assert len({r["run_id"] for r in rows}) == 1
    retried_ids = {by_uri[uris[i]]["image_id"] for i in missing}
    assert {k: v for p in parts for k, v in attempts(store, p).items()} == dict.fromkeys(retried_ids, 2)
    record = store_run_record(store)
    assert record["invocations"] == 2 and record["counts"]["error"] == 1
    (retry,) = record["retries"]
    assert (retry["files"], retry["rows"], retry["error"], retry["ok"] + retry["empty"]) == (3, 3, 1, 2)

    store.put("in/img_09.png", png(9))
    third = label(store, manifest, model, "--resume", "--retry-errors")
    assert third.exit_code == 0, third.output
    assert "retried 1 error rows, 0 still errors" in third.output
    rows = table(store)
    check_table(rows, uris)
    assert all(r["status"] in ("ok", "empty") for r in rows)
    assert attempts(store, parts[3]) == {by_uri[uris[9]]["image_id"]: 3}
    assert len(store_run_record(store)["retries"]) == 2


def store_run_record(store) -> dict:
    if isinstance(store, S3Store):
        listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix="out/_runs/")["Contents"]
        (key,) = [o["Key"] for o in listing]
        return json.loads(store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read())
    (path,) = Path(store.uri("out/_runs")).glob("*.json")
    return json.loads(path.read_text())


def test_retry_killed_midway_then_rerun(model: str, tmp_path: Path, ray_session) -> None:
    """SIGKILL the retrying CLI (and its own Ray) once it has replaced its first part
    file: every file is then either as before or replaced whole, and a rerun retries
    the rows that are still errors."""
    ray_session.data.DataContext.get_current().enable_progress_bars = False
    n, per_file = 40, 2
    store = LocalStore(tmp_path / "store")
    uris = [store.put(f"in/img_{i:02d}.png", png(i)) for i in range(n)]
    manifest = str(tmp_path / "manifest.parquet")
    build_manifest(store.uri("in"), manifest)
    for i in range(0, n, per_file):  # one error in every file
        remove(store, f"in/img_{i:02d}.png")
    args = ["label", "--model", model, "--input", manifest, "--out", store.uri("out"), "--rows-per-file",
            str(per_file), "--batch-size", "2", "--no-gpu", *ONE_ACTOR]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 1 and f"error {n // per_file}" in first.output, first.output
    for i in range(0, n, per_file):
        store.put(f"in/img_{i:02d}.png", png(i))
    parts = store.parts("out")
    mtimes = {p: Path(p).stat().st_mtime_ns for p in parts}

    log = tmp_path / "retry.log"
    proc = label_process([*args, "--resume", "--retry-errors"], log)
    try:
        deadline = time.monotonic() + 600
        while not any(Path(p).stat().st_mtime_ns != m for p, m in mtimes.items()):
            assert proc.poll() is None, f"exited ({proc.returncode}) before rewriting a part:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no part file rewritten in time"
            time.sleep(0.02)
    finally:
        kill_session(proc.pid)
        proc.wait()

    rows = table(store)
    check_table(rows, uris)  # one row per image at the kill
    assert max(Counter(r["uri"] for r in rows).values()) == 1
    still = sum(r["status"] == "error" for r in rows)
    assert 0 < still < n // per_file, "the kill should land before the retry finishes"
    rewritten = [p for p in parts if Path(p).stat().st_mtime_ns != mtimes[p]]
    assert all(attempts(store, p) for p in rewritten)

    rerun = CliRunner().invoke(app, [*args, "--resume", "--retry-errors"])
    assert rerun.exit_code == 0, rerun.output
    assert f"retried {still} error rows, 0 still errors" in rerun.output
    rows = table(store)
    check_table(rows, uris)
    assert all(r["status"] in ("ok", "empty") for r in rows)
    assert all(set(attempts(store, p).values()) == {2} for p in parts)  # the killed attempt left no count
