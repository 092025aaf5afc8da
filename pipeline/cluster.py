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
    ray.init(num_cpus=int(cpus) if cpus else None, include_dashboard=False)
