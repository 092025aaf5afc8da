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
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pipeline_ceiling.py"), "--quick", "--decode", "gpu",
                           "--n", "120", "--sample", "24", "--idle-s", "2", "--settle", "1", "--work", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    figures = last_json(proc)
    assert figures["n"] == 120 and (figures["decode"], figures["finish"]) == ("gpu", "device")
    assert figures["rows_per_s"] > 0
    assert figures["writer_rows_per_s"] > 0
    assert set(figures["cpu_ms_per_image"]) == set(STAGES)
    assert all(v > 0 for v in figures["cpu_ms_per_image"].values())
    # The device stages ran (on the CPU, timed apart); an idle Ray costs some CPU per second.
    assert figures["device_ms_per_row"] > 0 and figures["fixed_cpu_ms_per_s"] > 0
    # (Not cpu_s > base_cpu_s: at this size the 88 extra rows cost a few CPU-s, about what
    # the two runs' start-ups differ by on a loaded machine; it failed once that way.)
    assert figures["base_n"] == 32 and figures["base_cpu_s"] > 0
    assert figures["cpu_s"] > figures["startup_cpu_s"] > 0
    # cpu_ms_per_row is what is left of the labelling's CPU: no figure may exceed the whole.
    assert figures["cpu_ms_per_row"] < figures["cpu_ms_per_row_with_startup"]
    rate, fixed = figures["gpu_rate"], figures["fixed_cpu_ms_per_s"]
    assert figures["cores_per_gpu"] == pytest.approx(figures["cpu_ms_per_row"] * rate / 1000 + fixed / 1000, abs=0.02)


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
