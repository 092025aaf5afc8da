"""benchmarks/gpu_figures.sh, the runner of the GPU benchmarks: without a GPU (none is
visible to these runs) each CUDA step fails at once, and the runner must log it, record
it and go on to the next step."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_figures.sh"


def run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "logs"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def test_a_failing_step_is_recorded_and_the_next_one_runs(tmp_path: Path) -> None:
    result = run("finish", "instances", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "logs" / "summary.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == ["finish", "instances"]
    assert all(line["exit"] != 0 and line["result"] is None for line in lines)
    log = (tmp_path / "logs" / "finish.log").read_text()
    assert "NVIDIA" in log or "CUDA" in log, log[-2000:]
    assert "== instances: exit" in result.stdout


def test_an_unknown_step_is_refused(tmp_path: Path) -> None:
    result = run("nonsense", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "unknown step: nonsense" in result.stderr
