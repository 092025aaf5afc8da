"""Inference actors on CPU: by default one per CPU, each computing with one thread (the
thread count that `worker_resources` returns and `build_dataset` passes to the actor)."""
from __future__ import annotations

import pytest

from pipeline.cluster import worker_resources
from pipeline.label import LabelOptions, _resources

pytestmark = pytest.mark.integration


def test_cpu_default_is_one_single_threaded_actor_per_cpu(ray_session) -> None:
    cpus = int(ray_session.cluster_resources()["CPU"])
    gpu, actors = _resources(LabelOptions(model="m", input="in", out="out", gpu=False))
    assert (gpu, actors) == (False, cpus)
    per_actor, threads = worker_resources(actors, gpu)
    assert threads == 1 and per_actor["CPU"] < 1  # one CPU is left to the decode and finish tasks
    assert worker_resources(1, gpu)[1] == max(1, cpus - 1)  # --actors 1: the reserved CPUs' threads
