"""`sempart train` killed with SIGKILL (its whole process group and tree: driver, local
Ray and its workers), then run again: it resumes from the newest COMPLETE checkpoint on
storage (registered by Ray Train or not), says so with the step, keeps counting steps,
and records where it resumed in sempart.json. Locally after Ray Train registered a
checkpoint at step >= 10 of 30; on S3 (moto) with 2 workers right after the first
checkpoint was complete in the bucket, before Ray Train's registration caught up.

Tiny RANDOM backbone (vit_tiny_patch16_224 at 32 px): this checks the resume machinery.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import kill, process_tree

from pipeline.train import COMPLETE_FILE, checkpoint_step, newest_complete_checkpoint

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "data" / "train_sample"
STEPS, EVERY = 30, 5


def registered_steps(run: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered, from its run snapshot (Ray's
    own file; a checkpoint folder uploaded but not yet registered when the process dies
    is not used on resume)."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not there yet, or being written
        return []
    names = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    return sorted(int(n.removeprefix("checkpoint_")) for n in names)


def train_command(out: str, steps: int = STEPS, workers: int = 1) -> list[str]:
    return [
        sys.executable, "-m", "pipeline.cli", "train", "--data", str(SAMPLE), "--out", out,
        "--name", "killed", "--backbone", "vit_tiny_patch16_224", "--weights", "random",
        "--image-size", "32", "--steps", str(steps), "--batch-size", "4",
        "--checkpoint-every", str(EVERY), "--workers", str(workers), "--no-gpu",
    ]


def kill_tree(proc: subprocess.Popen) -> None:
    """The driver's process group, the local Ray it started and all their workers."""
    tree = process_tree(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    kill(tree)
    proc.wait()


def local_env() -> dict[str, str]:
    env = {**os.environ, "SEMPART_NUM_CPUS": "2"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, which the kill takes down too
    return env


def test_sigkill_then_rerun_resumes(tmp_path: Path) -> None:
    out, run = tmp_path / "runs", tmp_path / "runs" / "killed"
    env = local_env()
    first_log = tmp_path / "first.log"
    with first_log.open("w") as log:
        proc = subprocess.Popen(train_command(str(out)), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        while not [s for s in registered_steps(run) if s >= 10]:
            assert proc.poll() is None, f"training ended early:\n{first_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint at step >= 10 in 300 s"
            time.sleep(0.05)
        kill_tree(proc)
    assert not (run / "model" / "sempart.json").exists(), "the run finished before it was killed"
    registered = registered_steps(run)
    newest = checkpoint_step(newest_complete_checkpoint(str(run)))
    assert newest >= max(registered)

    # Checkpoint reports are quick with a short controller poll; the first run kept the
    # default 2 s so that the kill comes well before the end.
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    second = subprocess.run(train_command(str(out)), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]

    meta = json.loads((run / "model" / "sempart.json").read_text())
    assert meta["steps"] == STEPS
    [resumed] = meta["resumed_from"]
    assert resumed == newest  # the newest complete checkpoint, registered or not
    assert f"RESUMING from step {resumed}, its newest complete checkpoint" in log
    assert f"resuming killed from step {resumed} (of {STEPS})" in log
    logged = [int(m) for m in re.findall(rf"step (\d+)/{STEPS} loss", log)]
    assert logged == list(range(resumed + 1, STEPS + 1))  # counting went on, not from 1
    assert f"trained killed: step {STEPS} (resumed from step {resumed})" in log


def test_sigkill_on_s3_before_registration_then_rerun_resumes(s3_bucket: str, tmp_path: Path) -> None:
    """2 workers, checkpoints on S3: killed as soon as the first checkpoint is complete
    in the bucket (Ray Train registers it at its next poll, 2 s later by default); the
    rerun resumes from the newest complete checkpoint in the bucket, not from step 0."""
    import boto3

    # 20 steps: the kill comes at the first complete checkpoint (step 5), polled every 50 ms.
    steps, bucket = 20, s3_bucket.removeprefix("s3://")
    client = boto3.client("s3")
    marker = f"runs/killed/checkpoint_{EVERY:08d}/{COMPLETE_FILE}"
    env = local_env()
    first_log = tmp_path / "first.log"
    with first_log.open("w") as log:
        proc = subprocess.Popen(train_command(f"{s3_bucket}/runs", steps, workers=2), cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not client.list_objects_v2(Bucket=bucket, Prefix=marker).get("KeyCount"):
            assert proc.poll() is None, f"training ended early:\n{first_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no complete checkpoint in 300 s"
            time.sleep(0.1)  # well inside the 2 s before registration; a listing costs ~4 ms of CPU
        kill_tree(proc)
    newest = newest_complete_checkpoint(f"{s3_bucket}/runs/killed")
    resumed = checkpoint_step(newest)
    assert EVERY <= resumed < steps

    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    second = subprocess.run(train_command(f"{s3_bucket}/runs", steps, workers=2), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert f"RESUMING from step {resumed}, its newest complete checkpoint" in log
    meta = json.loads(client.get_object(Bucket=bucket, Key="runs/killed/model/sempart.json")["Body"].read())
    assert (meta["steps"], meta["resumed_from"]) == (steps, [resumed])
    logged = [int(m) for m in re.findall(rf"step (\d+)/{steps} loss", log)]
    assert logged == list(range(resumed + 1, steps + 1))
