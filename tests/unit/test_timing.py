"""benchmarks/timing.py, the benchmarks' one way to time a call on a device."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scripts import load_script

timing = load_script(Path(__file__).resolve().parents[2] / "benchmarks" / "timing.py", "timing")


def test_timed_returns_the_result_with_wall_and_cpu_seconds() -> None:
    t = timing.timed(lambda: sum(i * i for i in range(300_000)))
    assert t.result == sum(i * i for i in range(300_000))
    assert t.cpu_s > 0 and t.wall_s > 0


def test_a_cuda_device_is_synchronised_before_and_after(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", waits.append)  # no GPU here: record the waits
    assert timing.timed(lambda: waits.append("call") or 7, "cuda:0").result == 7
    assert waits == ["cuda:0", "call", "cuda:0"]
    waits.clear()
    timing.timed(lambda: None, torch.device("cpu"))
    assert waits == []  # nothing to wait for on the CPU
