"""Where Ray work runs: the cluster at RAY_ADDRESS, or a local Ray on this machine."""
from __future__ import annotations

import os


def init_ray() -> None:
    """Join RAY_ADDRESS when set, else start a local Ray (SEMPART_NUM_CPUS caps its CPUs)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    cpus = os.environ.get("SEMPART_NUM_CPUS")
    # address="local": a fresh instance, never the cluster Ray recorded last on this
    # machine (a stale `ray start --head` would make ray.init() hang on it).
    ray.init(address="local", num_cpus=int(cpus) if cpus else None, include_dashboard=False)


def worker_resources(workers: int, gpu: bool) -> tuple[dict[str, float], int]:
    """(resources per worker, torch threads per worker).

    Training workers and inference actors alike: a GPU worker takes one CPU and one GPU.
    CPU workers share the cluster's CPUs but leave one (half of a lone CPU) to Ray Data's
    decode tasks, which would otherwise never be scheduled; they take whole CPUs when
    there are enough, and fit on one node.
    """
    import ray

    if gpu:
        return {"CPU": 1.0, "GPU": 1.0}, 1
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    largest_node = max(float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n["Alive"])
    for_data = 1.0 if cpus >= 2 else cpus / 2
    share = min((cpus - for_data) / workers, largest_node)
    per_worker = float(int(share)) if share >= 1 else share
    return {"CPU": per_worker}, max(1, int(per_worker))
