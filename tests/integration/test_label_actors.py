"""Inference actors on CPU: by default one per CPU, each computing with one thread (the
thread count of the resource plan that `build_dataset` passes to the actor)."""
from __future__ import annotations

import pytest

from pipeline.cluster import cluster_plan
from pipeline.label import LabelOptions, _resources

pytestmark = pytest.mark.integration


def test_cpu_default_is_one_single_threaded_actor_per_cpu(ray_session) -> None:
    cpus = int(ray_session.cluster_resources()["CPU"])
    gpu, plan, actors = _resources(LabelOptions(model="m", input="in", out="out", gpu=False))
    assert (gpu, actors) == (False, cpus)
    assert plan.threads == 1 and plan.resources["CPU"] < 1  # one CPU is left to the decode and finish tasks
    assert cpus - actors * plan.resources["CPU"] >= plan.stage_cpus
    assert cluster_plan(1, gpu).threads == max(1, cpus - 1)  # --actors 1: the reserved CPUs' threads
