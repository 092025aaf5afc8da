"""A Ray cluster that is not there never hangs a run.

A `ray start --head` killed without `ray stop` leaves its address recorded in Ray's temp
folder; `sempart label` without RAY_ADDRESS must start a fresh local Ray instead of
joining it, and RAY_ADDRESS (or `auto`) naming a dead cluster must fail within seconds
with one line. Each test has its own RAY_TMPDIR, given only to its own processes, so no
other Ray on this machine sees the record or the local Ray started here.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from cli_args import ONE_ACTOR
from processes import free_ports, local_ray_env

from pipeline.cluster import ClusterUnreachableError, check_reachable

pytestmark = pytest.mark.integration
SEMPART = [sys.executable, "-m", "pipeline.cli"]
HANG_BOUND_S = 600  # a hung run would be killed here and fail the test; a good one takes well under


def images(folder: Path, count: int) -> Path:
    folder.mkdir()
    for i in range(count):
        Image.fromarray((np.random.default_rng(i).random((32, 40, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def stale_record(ray_tmp: Path) -> str:
    """What a `ray start --head` killed without `ray stop` leaves: its GCS address in
    RAY_TMPDIR/ray/ray_current_cluster, where ray.init() without an address looks, and
    nothing listening there any more."""
    [port] = free_ports(1)
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    return f"127.0.0.1:{port}"


def test_stale_record_neither_hangs_a_label_run_nor_is_joined(ray_tmp: Path, model: str, tmp_path: Path) -> None:
    """Before init_ray started Ray with address="local", this run hung for minutes on
    the recorded cluster ("Failed to get cluster ID from GCS")."""
    stale_record(ray_tmp)
    out = tmp_path / "labels"
    run = subprocess.run(
        [*SEMPART, "label", "--model", model, "--input", str(images(tmp_path / "in", 3)), "--out", str(out),
         "--no-gpu", *ONE_ACTOR],
        env=local_ray_env(ray_tmp), capture_output=True, text=True, timeout=HANG_BOUND_S,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert pq.read_table(out).num_rows == 3


def test_dead_ray_address_fails_fast_with_one_line(ray_tmp: Path, model: str, tmp_path: Path) -> None:
    [port] = free_ports(1)
    run = subprocess.run(
        [*SEMPART, "label", "--model", model, "--input", str(images(tmp_path / "in", 2)),
         "--out", str(tmp_path / "labels"), "--no-gpu", *ONE_ACTOR],
        env=local_ray_env(ray_tmp, RAY_ADDRESS=f"127.0.0.1:{port}"), capture_output=True, text=True, timeout=HANG_BOUND_S,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ClusterUnreachableError: no Ray cluster answers at 127.0.0.1:") and str(port) in last


def test_auto_resolves_to_the_recorded_cluster_and_fails_when_it_is_gone(
    ray_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAY_ADDRESS=auto joins what Ray recorded last: checked like any address.

    Ray's legacy 'auto' rule prefers the one running GCS process it finds on the machine
    over the record; this suite's shared local Ray may be that process, so the scan is
    made to see none, as on a machine where only the dead cluster was ever started."""
    import ray._private.services as ray_services

    port = stale_record(ray_tmp).rsplit(":", 1)[1]
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_services, "find_gcs_addresses", lambda: [])
    with pytest.raises(ClusterUnreachableError, match=rf"answers at [0-9.]+:{port} "):
        check_reachable("auto")
