"""benchmarks/instances.py runs end to end at its smallest settings (no timing asserts),
and its reference's rounding check flags what it should."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "instances.py"
KEYS = {"ratio", "ratio_cpu", "mean_iou", "ours_ips", "baseline_ips", "ours_ms", "baseline_ms", "backbone_ms",
        "baseline_stage_ms", "ours_stage_ms", "exact_images", "sign_decided_cuts", "ambiguous_cuts"}

bench = load_script(BENCH, "instances_bench_script")


def test_quick_run_ends_with_json_line_of_figures(capsys: pytest.CaptureFixture) -> None:
    threads = torch.get_num_threads()
    try:
        code = bench.main(["--quick", "--n", "3", "--batch-size", "2"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and KEYS <= figures.keys()
    assert (figures["backbone"], figures["image_size"], figures["n_images"]) == ("vit_tiny_patch16_224", 128, 3)
    assert figures["random_weights"] is True and "RANDOM weights" in out
    assert figures["ratio"] == pytest.approx(figures["baseline_ms"] / figures["ours_ms"], rel=0.01)
    assert set(figures["baseline_stage_ms"]) == {"graph", "solve", "post"}
    # the published procedure's masks on every image none of whose cuts is a rounding call
    assert figures["exact_images"] >= max(1, 3 - figures["ambiguous_cuts"])
    assert 0.0 < figures["mean_iou"] <= 1.0


def test_default_photos_are_the_shipped_ones() -> None:
    settings = bench.parse_settings(["--quick"])
    repo = Path(__file__).resolve().parents[2]
    assert Path(settings.images).is_relative_to(repo)
    assert bench.load_photos(settings.images, 2, 64).shape == (2, 64, 64, 3)


def test_ambiguous_cut_flags_only_decisions_rounding_can_change() -> None:
    labels = np.array([1, 1, 2, 2, 0, 0])
    x = np.array([3.0, 1.0, 2.0, -1.0, -2.0, -3.0 + 1e-3])
    assert not bench.ambiguous_cut(x, x, labels)
    at_mean = x.copy()
    at_mean[1] = (at_mean.sum() - at_mean[1]) / 5  # a node on the split: x_1 = mean(x)
    assert bench.ambiguous_cut(at_mean, at_mean, labels)
    signs = x.copy()
    signs[5] = -3.0  # |x| ties between a positive and a negative entry: the sign fix is rounding's
    assert bench.ambiguous_cut(signs, signs, labels)
    seeds = x.copy()
    seeds[2] = 3.0 - 1e-12  # the seed ties across two components
    assert bench.ambiguous_cut(seeds, seeds, labels)
    same_component = x.copy()
    same_component[1] = 3.0 - 1e-12  # a tie inside the seed's component changes nothing
    assert not bench.ambiguous_cut(same_component, same_component, labels)
