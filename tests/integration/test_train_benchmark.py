"""benchmarks/train_throughput.py runs end to end at a tiny size and prints its JSON
figures (no timing asserts: the figures are the benchmark's job). It runs in this
process on the session's Ray, which the script uses when one is running."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rounding import ratio_agrees_with_rates
from scripts import load_script

pytestmark = pytest.mark.integration
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"


def test_train_throughput_compares_ray_train_with_a_plain_loop(ray_session, capsys) -> None:
    threads = torch.get_num_threads()
    try:
        load_script(BENCH, "train_throughput_bench").main(["--quick", "--steps", "3", "--warmup", "1", "--n-images", "4", "--image-size", "32",
                           "--batch-size", "2", "--no-gpu"])
    finally:
        torch.set_num_threads(threads)  # the baseline sets the Ray worker's thread count
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["ours_ips"] > 0 and figures["baseline_ips"] > 0
    # The JSON rounds the rates to 2 decimals and the ratio to 3.
    assert ratio_agrees_with_rates(figures["ratio"], figures["ours_ips"], figures["baseline_ips"], 5e-3, 5e-4)
    assert figures["workers"] == 1 and figures["device"].startswith("CPU")
    assert ", 4 images," in out  # from the repository's sample, the default
    assert ray_session.is_initialized()  # the caller's Ray is left running
