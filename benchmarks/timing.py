"""The benchmarks' one way to time a call on a device.

A CUDA call returns before the GPU has done its work, so the device is synchronised
before the clock starts (work queued earlier is not counted) and before it stops (the
call's own work is). On the CPU there is nothing to wait for. torch is imported only
for a CUDA device, so scripts that time CPU work need not load it.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Timed:
    result: Any
    wall_s: float
    cpu_s: float  # this process's CPU time, all threads


def synchronizer(device: Any) -> Callable[[], None]:
    """What waits for `device`'s queued work ("cuda", "cuda:1", a torch.device, or "cpu")."""
    if str(device).startswith("cuda"):
        import torch

        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed(call: Callable[[], Any], device: Any = "cpu") -> Timed:
    """call()'s result with its wall and CPU seconds, the device synchronised at both ends."""
    sync = synchronizer(device)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    sync()
    return Timed(result, time.perf_counter() - wall, time.process_time() - cpu)
