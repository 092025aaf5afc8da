"""benchmarks/label_throughput.py and label_scale.py run end to end at tiny sizes and
print their JSON figures (no timing asserts: the figures are the benchmarks' job)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_args import ONE_ACTOR
from rounding import ratio_agrees_with_rates

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "tests" / "data" / "duts-te" / "images"


def run_bench(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_label_throughput_compares_both_sides() -> None:
    figures = run_bench("label_throughput.py", "--quick", "--n", "6", "--repeats", "1", "--images", str(IMAGES),
                        "--image-size", "32", "--label-args", " ".join(ONE_ACTOR))
    ours, base, half = figures["ours_ips"], figures["baseline_ips"], 5e-4  # the JSON rounds to 3 decimals
    assert ours > 0 and base > 0
    # Start-up is reported, and the model is loaded once per inference actor, not per block.
    assert figures["ours_first_row_s"] > 0 and figures["ours_ray_start_s"] > 0
    # (an actor still loading when the run ends may log nothing)
    assert 1 <= figures["ours_model_loads"] <= figures["ours_actors"]
    assert ratio_agrees_with_rates(figures["ratio"], ours, base, half, half)


def test_label_scale_records_memory_for_both_sizes(tmp_path: Path) -> None:
    figures = run_bench("label_scale.py", "--sizes", "20", "40", "--cache", str(tmp_path), "--", *ONE_ACTOR)
    for n in ("0.02k", "0.04k"):  # keys name the sizes in thousands
        assert 100 < figures[f"driver_peak_rss_mb_{n}"] < 10_000
        assert figures[f"workers_peak_rss_mb_{n}"] > 0 and figures[f"ips_{n}"] > 0
