"""`sempart train` killed with SIGKILL (its whole process group and tree: driver, local
Ray and its workers) after Ray Train registered a checkpoint at step >= 10 of 30, then run again: it resumes from a
checkpoint, keeps counting steps, and records where it resumed in sempart.json.

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


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (Linux /proc). Ray's workers run in sessions of
    their own, so killing the process group alone leaves them alive for a few seconds,
    long enough to register one more checkpoint."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            ppid = int(rest.rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def train_command(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "pipeline.cli", "train", "--data", str(SAMPLE), "--out", str(out),
        "--name", "killed", "--backbone", "vit_tiny_patch16_224", "--weights", "random",
        "--image-size", "32", "--steps", str(STEPS), "--batch-size", "4",
        "--checkpoint-every", str(EVERY), "--workers", "1", "--no-gpu",
    ]


def test_sigkill_then_rerun_resumes(tmp_path: Path) -> None:
    out, run = tmp_path / "runs", tmp_path / "runs" / "killed"
    env = {**os.environ, "SEMPART_NUM_CPUS": "2"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, which the kill takes down too
    first_log = tmp_path / "first.log"
    with first_log.open("w") as log:
        proc = subprocess.Popen(train_command(out), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        while not [s for s in registered_steps(run) if s >= 10]:
            assert proc.poll() is None, f"training ended early:\n{first_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint at step >= 10 in 300 s"
            time.sleep(0.05)
        tree = process_tree(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)  # driver, raylet, GCS: the whole local Ray ...
        for pid in tree:  # ... and its workers, as when the machine dies
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert not (run / "model" / "sempart.json").exists(), "the run finished before it was killed"
    registered = registered_steps(run)

    # Checkpoint reports are quick with a short controller poll; the first run kept the
    # default 2 s so that the kill comes well before the end.
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    second = subprocess.run(train_command(out), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]

    meta = json.loads((run / "model" / "sempart.json").read_text())
    assert meta["steps"] == STEPS
    [resumed] = meta["resumed_from"]
    assert resumed >= 10 and resumed == max(registered)  # the newest registered checkpoint
    assert f"resuming killed from step {resumed} (of {STEPS})" in log
    logged = [int(m) for m in re.findall(rf"step (\d+)/{STEPS} loss", log)]
    assert logged == list(range(resumed + 1, STEPS + 1))  # counting went on, not from 1
    assert f"trained killed: step {STEPS} (resumed from step {resumed})" in log
