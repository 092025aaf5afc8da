"""benchmarks/train_throughput.py runs end to end at a tiny size and prints its JSON
figures (no timing asserts: the figures are the benchmark's job)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_train_throughput_compares_ray_train_with_a_plain_loop() -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--quick", "--steps", "3",
           "--warmup", "1", "--n-images", "4", "--image-size", "32", "--batch-size", "2", "--no-gpu"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["ours_ips"] > 0 and figures["baseline_ips"] > 0
    assert figures["ratio"] == pytest.approx(figures["ours_ips"] / figures["baseline_ips"], rel=0.01)
    assert figures["workers"] == 1 and figures["device"].startswith("CPU")
    assert "4 images" in proc.stdout  # the shipped sample, as the default
