"""benchmarks/pipeline_ceiling.py --quick and benchmarks/gpu_check.sh --cpu run end to end
and print their JSON figures (no timing asserts: the figures are the benchmarks' job)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
STAGES = ("fetch", "decode_resize", "decode_resize_torchvision", "decode_resize_320", "decode_resize_torchvision_320",
          "jpeg_header_only", "model", "finish", "write")


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pipeline_ceiling_quick(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pipeline_ceiling.py"), "--quick",
                           "--n", "48", "--sample", "24", "--work", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    figures = last_json(proc)
    assert figures["n"] == 48 and figures["rows_per_s"] > 0 and figures["writer_rows_per_s"] > 0
    assert set(figures["cpu_ms_per_image"]) == set(STAGES)
    assert all(v > 0 for v in figures["cpu_ms_per_image"].values())
    assert figures["pipeline_cpu_ms_per_row"] > figures["cpu_stages_ms_device_decode"] > 0


def test_gpu_check_cpu_mode(tmp_path: Path) -> None:
    assert "gpu_check.py" in (REPO / "benchmarks" / "gpu_check.sh").read_text()  # the steps run there
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--work", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    figures = last_json(proc)
    assert figures["device"] == "cpu" and figures["model_forward_ips"] > 0
    assert figures["predict_ips_cpu_decode"] > 0 and figures["predict_ips_device_decode"] > 0
    assert set(figures["latency_ms"]) == {"sempart", "tokencut"} and figures["train_step_ips"] > 0
    for step in ("decode_pil_threads", "decode_resize_device", "transfer", "model", "post"):
        assert figures["ms_per_image"][step] >= 0
    assert figures["label"]["images"] == 16 and figures["label"]["ips"] > 0  # ray is in the test environment
