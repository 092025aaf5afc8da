"""benchmarks/device_finish.py runs end to end at its quick size (no timing asserts)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from scripts import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "device_finish.py"

device_finish_bench = load_script(BENCH, "device_finish_bench")


def test_quick_run_ends_with_json_line_of_figures(capsys: pytest.CaptureFixture) -> None:
    figures = device_finish_bench.main(["--quick", "--threads", "1", "--batch-size", "2"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(asdict(figures)))
    assert last["n_images"] == 4 and last["device"] == "cpu" and last["batch_size"] == 2
    assert min(last["cpu_finish_ms"], last["device_finish_ms"], last["rle_from_runs_ms"]) > 0
    assert 1 <= last["rounds_per_image_median"] <= last["rounds_per_image_max"] <= last["rounds_per_batch_max"]
    assert last["min_iou"] >= 0.999 and last["max_box_diff"] <= 1 and last["max_score_diff"] < 1e-3


def test_maps_are_at_the_models_input_size() -> None:
    maps = device_finish_bench.model_like_maps(device_finish_bench.REPO_MASKS, 3, 64)
    assert len(maps) == 3
    for prob, (height, width) in maps:
        assert min(prob.shape) == 64 and prob.dtype.name == "float32" and 0 <= prob.min() <= prob.max() <= 1
        assert abs(prob.shape[1] / prob.shape[0] - width / height) < 0.2
