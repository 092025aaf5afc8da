"""benchmarks/gpu_figures.sh, the runner of the GPU benchmarks: a step that fails must be
logged and recorded, and the next step must still run. The steps' Python is `false`
here, so each fails at once (the benchmarks themselves have their own tests)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_figures.sh"


def run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "logs"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHON": "false"})


def test_a_failing_step_is_recorded_and_the_next_one_runs(tmp_path: Path) -> None:
    result = run("finish", "instances", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "logs" / "summary.jsonl").read_text().splitlines()]
    assert [(line["step"], line["exit"], line["result"]) for line in lines] == [("finish", 1, None),
                                                                                ("instances", 1, None)]
    assert (tmp_path / "logs" / "finish.log").is_file() and (tmp_path / "logs" / "instances.log").is_file()
    assert "== instances: exit 1" in result.stdout


def test_an_unknown_step_is_refused(tmp_path: Path) -> None:
    result = run("nonsense", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "unknown step: nonsense" in result.stderr
