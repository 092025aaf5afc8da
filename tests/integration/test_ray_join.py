"""A Ray cluster that is not there never hangs a run.

A `ray start --head` killed without `ray stop` leaves its address recorded in Ray's temp
folder; `sempart label` without RAY_ADDRESS must start a fresh local Ray instead of
joining it, and RAY_ADDRESS (or `auto`) naming a dead cluster must fail within seconds
with one line. The head here has its own --temp-dir (under a RAY_TMPDIR given only to
the processes of this test) and ports, so no other Ray on this machine ever sees it.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cluster import ClusterUnreachableError, check_reachable

pytestmark = pytest.mark.integration
SEMPART = [sys.executable, "-m", "pipeline.cli"]
HANG_BOUND_S = 600  # a hung run would be killed here and fail the test; a good one takes well under


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def processes_under(text: str) -> set[int]:
    """Pids whose command line mentions `text` (our unique temp folder), and their
    descendants (Linux /proc)."""
    parents, found = {}, set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if text in cmdline:
            found.add(int(proc.name))
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found - {os.getpid()}


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short private RAY_TMPDIR (Ray puts unix sockets under it: paths must stay short)."""
    folder = Path(tempfile.mkdtemp(prefix="sj", dir="/tmp"))
    try:
        yield folder
    finally:
        kill_all(processes_under(str(folder)))
        shutil.rmtree(folder, ignore_errors=True)


def env_for(ray_tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    repo = str(Path(__file__).resolve().parents[2])
    env.update(RAY_TMPDIR=str(ray_tmp), PYTHONPATH=repo, SEMPART_NUM_CPUS="1", **extra)
    return env


def images(folder: Path, count: int) -> Path:
    folder.mkdir()
    for i in range(count):
        Image.fromarray((np.random.default_rng(i).random((32, 40, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def start_stale_head(ray_tmp: Path) -> str:
    """`ray start --head`, then SIGKILL of all its processes: its recorded address stays."""
    port, *others = free_ports(9)
    temp_dir = ray_tmp / "ray"  # where ray.init() without an address looks (RAY_TMPDIR/ray)
    head = subprocess.Popen(
        [shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray", "start", "--head", "--block",
         f"--temp-dir={temp_dir}", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
         "--disable-usage-stats", f"--node-manager-port={others[0]}", f"--object-manager-port={others[1]}",
         f"--ray-client-server-port={others[2]}", f"--dashboard-agent-listen-port={others[3]}",
         f"--dashboard-agent-grpc-port={others[4]}", f"--metrics-export-port={others[5]}",
         f"--runtime-env-agent-port={others[6]}", f"--min-worker-port={others[7]}",
         f"--max-worker-port={others[7] + 20}"],
        env=env_for(ray_tmp), stdout=(ray_tmp / "head.log").open("wb"), stderr=subprocess.STDOUT,
    )
    recorded = temp_dir / "ray_current_cluster"
    deadline = time.monotonic() + HANG_BOUND_S
    while not recorded.exists():
        assert head.poll() is None, (ray_tmp / "head.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "ray start --head did not come up"
        time.sleep(0.5)
    kill_all(processes_under(str(ray_tmp)) | {head.pid})  # the head's command line names ray_tmp too
    head.wait()
    address = recorded.read_text().strip()
    assert address.endswith(f":{port}")
    return address


def test_stale_head_neither_hangs_a_label_run_nor_is_joined(ray_tmp: Path, model: str, tmp_path: Path) -> None:
    address = start_stale_head(ray_tmp)
    deadline = time.monotonic() + 60
    while True:  # the killed GCS stops answering as soon as the kernel has closed its socket
        try:
            check_reachable(address, timeout_s=1)
        except ClusterUnreachableError:
            break
        assert time.monotonic() < deadline, f"{address} still answers after SIGKILL"
        time.sleep(0.2)

    out = tmp_path / "labels"
    run = subprocess.run(
        [*SEMPART, "label", "--model", model, "--input", str(images(tmp_path / "in", 3)), "--out", str(out),
         "--no-gpu"],
        env=env_for(ray_tmp), capture_output=True, text=True, timeout=HANG_BOUND_S,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert pq.read_table(out).num_rows == 3


def test_dead_ray_address_fails_fast_with_one_line(ray_tmp: Path, model: str, tmp_path: Path) -> None:
    [port] = free_ports(1)
    run = subprocess.run(
        [*SEMPART, "label", "--model", model, "--input", str(images(tmp_path / "in", 2)),
         "--out", str(tmp_path / "labels"), "--no-gpu"],
        env=env_for(ray_tmp, RAY_ADDRESS=f"127.0.0.1:{port}"), capture_output=True, text=True, timeout=HANG_BOUND_S,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ClusterUnreachableError: no Ray cluster answers at 127.0.0.1:") and str(port) in last


def test_auto_resolves_to_the_recorded_cluster_and_fails_when_it_is_gone(
    ray_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAY_ADDRESS=auto joins what Ray recorded last: checked like any address."""
    (ray_tmp / "ray").mkdir()
    [port] = free_ports(1)
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterUnreachableError, match=rf"answers at [0-9.]+:{port} "):
        check_reachable("auto")
