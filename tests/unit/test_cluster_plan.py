"""The resource plan of inference actors and training workers (`cluster.plan_workers`):
any cluster shape runs with room for the CPU stages on some node, or the plan fails at
once with one line. Placement is checked by packing the workers onto the nodes in every
order Ray's scheduler could choose."""
from __future__ import annotations

import itertools

import pytest

from pipeline.cluster import ResourcePlanError, plan_workers


def stage_room_after_any_placement(node_cpus: list[float], count: int, share: float, stage: float) -> bool:
    """Whatever node each worker lands on (any that still has room), some node keeps
    room for one stage task, and all workers were placed."""
    for order in itertools.product(range(len(node_cpus)), repeat=count):
        free = list(node_cpus)
        for node in order:
            if free[node] + 1e-9 < share:
                break
            free[node] -= share
        else:
            if max(free) + 1e-9 < stage:
                return False
    return True


SHAPES = [[2], [1], [1, 2, 2], [1, 1, 1], [1, 2], [4, 4], [3, 1], [8], [2, 2, 2, 2]]


@pytest.mark.parametrize("node_cpus", SHAPES)
def test_default_actors_leave_room_for_a_stage_task(node_cpus: list[float]) -> None:
    count = int(sum(node_cpus))  # the label default on CPU: one actor per CPU
    plan = plan_workers(count, gpu=False, node_cpus=node_cpus)
    share = plan.resources["CPU"]
    assert 0 < share and plan.stage_cpus > 0 and plan.threads == max(1, int(share))
    assert stage_room_after_any_placement(node_cpus, min(count, 6), share, plan.stage_cpus)
    assert sum(int(c / share + 1e-9) for c in node_cpus) >= count  # every actor fits


def test_the_reported_deadlock_shape_gets_fitting_shares() -> None:
    """Head 1 CPU and two workers of 2: the default 5 actors took 0.8 CPU each, leaving
    every node 0.2-0.4 CPU and the 1-CPU decode task unschedulable."""
    plan = plan_workers(5, gpu=False, node_cpus=[1, 2, 2])
    assert plan.resources == {"CPU": 0.75} and plan.stage_cpus == 0.25
    assert stage_room_after_any_placement([1, 2, 2], 5, 0.75, 0.25)


@pytest.mark.parametrize("node_cpus,count,share,threads", [
    ([2], 1, 1.0, 1), ([1, 2, 2], 2, 2.0, 2), ([64], 4, 15.0, 15), ([2], 2, 0.5, 1),
])
def test_shares_are_whole_cpus_when_they_can_be(node_cpus, count, share, threads) -> None:
    plan = plan_workers(count, gpu=False, node_cpus=node_cpus)
    assert (plan.resources["CPU"], plan.threads) == (share, threads)
    if share >= 1:
        assert plan.stage_cpus == 1.0  # whole reservations leave whole CPUs


def test_too_many_workers_fail_at_once_with_one_line() -> None:
    with pytest.raises(ResourcePlanError) as info:
        plan_workers(30, gpu=False, node_cpus=[1, 1])
    message = str(info.value)
    assert "\n" not in message and "nodes: 1, 1" in message and "at most 4" in message
    plan_workers(4, gpu=False, node_cpus=[1, 1])  # the number it names fits


def test_gpu_plan_one_gpu_and_one_cpu_each() -> None:
    plan = plan_workers(2, gpu=True, node_cpus=[8, 8], gpus=2)
    assert plan.resources == {"CPU": 1.0, "GPU": 1.0} and plan.stage_cpus == 1.0
    with pytest.raises(ResourcePlanError, match="has 2 GPUs: ask for at most 2"):
        plan_workers(3, gpu=True, node_cpus=[8, 8], gpus=2)
    with pytest.raises(ResourcePlanError, match="no CPU is left for decoding"):
        plan_workers(1, gpu=True, node_cpus=[1], gpus=1)
