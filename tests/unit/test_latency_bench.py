"""benchmarks/latency.py runs end to end at its smallest settings (no timing asserts)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sempart_core.graph import affinity
from sempart_core.synthetic import synthetic_scene
from sempart_core.tokencut import fiedler_vector
from scripts import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "latency.py"
KEYS = {
    "ours_ms", "baseline_ms", "baseline_bs_ms", "ratio", "ratio_bs", "ours_min_ms", "baseline_min_ms",
    "baseline_bs_min_ms", "backbone", "image_size", "device", "threads", "weights", "random_weights",
    "n_images", "eigensolver", "backbone_only_ms", "heads_only_ms", "ncut_ms", "graph_ms", "eigen_ms",
    "eigen_scipy_ms", "bilateral_ms", "post_ms",
}


latency = load_script(BENCH, "latency_bench")


def test_main_ends_with_json_line_of_figures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for i in range(2):
        Image.fromarray(synthetic_scene(i, (48, 64))[0]).save(tmp_path / f"{i}.png")
    threads = torch.get_num_threads()
    try:
        code = latency.main([
            "--backbone", "vit_tiny_patch16_224", "--image-size", "32", "--n", "2",
            "--images", str(tmp_path), "--repeats", "1", "--warmup", "0", "--threads", "1",
        ])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    assert code == 0
    assert KEYS <= figures.keys()
    assert figures["backbone"] == "vit_tiny_patch16_224"
    assert (figures["image_size"], figures["n_images"], figures["device"]) == (32, 2, "cpu")
    assert figures["random_weights"] is True and "RANDOM weights" in out
    assert all(figures[k] > 0 for k in KEYS if k.endswith("_ms"))
    assert figures["ratio"] == pytest.approx(figures["baseline_ms"] / figures["ours_ms"], rel=1e-3)
    assert figures["ratio_bs"] == pytest.approx(figures["baseline_bs_ms"] / figures["ours_ms"], rel=1e-3)
    assert figures["ours_min_ms"] <= figures["ours_ms"]
    assert figures["baseline_min_ms"] <= figures["baseline_ms"]
    assert figures["baseline_bs_min_ms"] <= figures["baseline_bs_ms"]
    assert "TokenCut + BS / SEMPART" in out


def test_scipy_reference_solves_the_same_eigenproblem() -> None:
    """The timed TokenCut reference solve gives our Fiedler vector (up to sign)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 16))
    feats = centres[rng.integers(0, 2, size=40)] + 0.8 * rng.normal(size=(40, 16))
    w = affinity(torch.from_numpy(feats)[None].float())
    ours = fiedler_vector(w)[0].numpy()
    reference = latency.scipy_fiedler(w)
    cosine = ours @ reference / (np.linalg.norm(ours) * np.linalg.norm(reference))
    assert abs(cosine) == pytest.approx(1.0, abs=1e-6)


def test_default_images_are_the_shipped_photos() -> None:
    """No default points outside the repository."""
    settings = latency.parse_settings(["--quick"])
    repo = Path(__file__).resolve().parents[2]
    assert Path(settings.images).is_relative_to(repo) and Path(settings.images).is_dir()
    assert len(latency.load_images(settings.images, 2)) == 2


def test_synthetic_images_when_no_folder() -> None:
    images = latency.load_images(latency.SYNTHETIC, 2)
    assert [im.shape for im in images] == [(*latency.SYNTHETIC_SIZE, 3)] * 2
    assert not np.array_equal(images[0], images[1])
