"""Where Ray work runs: the cluster at RAY_ADDRESS, or a local Ray on this machine."""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from urllib.parse import urlparse

JOIN_TIMEOUT_S = 5.0  # a cluster that does not accept a connection by then is not there
_connected_here = False  # init_ray connected this process to Ray (shutdown_quietly may end it)


class ClusterUnreachableError(ValueError):
    """The Ray address given (RAY_ADDRESS) does not answer: a setting to fix."""


def init_ray(address: str | None = None) -> None:
    """Join `address` (default RAY_ADDRESS) when set, else start a local Ray
    (SEMPART_NUM_CPUS caps its CPUs). Joining fails within seconds, with one line, when
    nothing answers there: ray.init would wait on it for minutes."""
    import ray

    global _connected_here
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        check_reachable(address)
        ray.init(address=address)
    else:
        cpus = os.environ.get("SEMPART_NUM_CPUS")
        # address="local": a fresh instance, never the cluster Ray recorded last on this
        # machine (a stale `ray start --head` would make ray.init() hang on it).
        ray.init(address="local", num_cpus=int(cpus) if cpus else None, include_dashboard=False)
    _connected_here = True


def shutdown_quietly() -> None:
    """End the Ray connection init_ray made, silencing this process from now on: for a
    process about to exit after a stalled pipeline, whose threads (Python's and Ray's C++
    core worker's, which writes to the file descriptors directly) would otherwise print
    after the run's last line, which the caller prints first. The CLI disables Ray's
    automatic reconnection (RAY_ENABLE_AUTO_CONNECT=0) before importing Ray."""
    import logging
    import threading

    import ray

    if not _connected_here:
        return
    logging.disable(logging.CRITICAL)
    threading.excepthook = lambda args: None
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    ray.shutdown()


def check_reachable(address: str, timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """Raise ClusterUnreachableError unless the cluster at `address` accepts a TCP
    connection: 'host:port' (its GCS), 'ray://host:port' (Ray Client) or 'auto' (the
    cluster Ray recorded last on this machine, as ray.init resolves it)."""
    target = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            target = canonicalize_bootstrap_address(address) or ""
        except ConnectionError as exc:
            raise ClusterUnreachableError(f"RAY_ADDRESS=auto: {exc}") from None
    parsed = urlparse(target if "://" in target else f"//{target}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ClusterUnreachableError(f"Ray address {address!r}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = f"no answer within {timeout_s:g} s" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise ClusterUnreachableError(
            f"no Ray cluster answers at {target} ({reason}): start it, fix RAY_ADDRESS, "
            "or unset RAY_ADDRESS to run on a local Ray"
        ) from None


# The step of CPU reservations when the model runs on CPUs: workers take multiples of
# it, so a node's unreserved CPUs are a multiple of it too (see `plan_workers`).
STAGE_CPUS = 0.25


class ResourcePlanError(ValueError):
    """The workers asked for cannot run on the cluster as it is: one line saying why."""


@dataclass(frozen=True)
class ResourcePlan:
    """Resources of each worker (inference actor or training worker), its torch
    threads, and what each CPU-stage task reserves beside them."""

    resources: dict[str, float]
    threads: int
    stage_cpus: float


def plan_workers(count: int, gpu: bool, node_cpus: list[float], gpus: float = 0.0) -> ResourcePlan:
    """Fit `count` workers on nodes with `node_cpus` CPUs, leaving room for the CPU
    stages on some node, or raise ResourcePlanError.

    On GPUs each worker takes one GPU and one CPU, and stage tasks one CPU each. On
    CPUs the workers share the cluster but one CPU: each takes the largest multiple of
    STAGE_CPUS that lets all of them fit on the nodes (whole CPUs, as threads, from one
    CPU up). Each node's unreserved CPUs are then a multiple of the workers' step (1,
    0.5 or 0.25 CPU) and add up to at least one CPU, so some node holds a stage task
    that reserves one step. (A plan from the cluster's total alone left every node
    0.2-0.4 CPU and a 1-CPU stage task waiting forever.)"""
    shape = ", ".join(f"{c:g}" for c in node_cpus)
    total = sum(node_cpus)
    if gpu:
        if count > gpus:
            raise ResourcePlanError(f"{count} GPU workers asked for, but the cluster has {gpus:g} GPUs: "
                                    f"ask for at most {int(gpus)} (--actors / --workers)")
        if total - count < 1:
            raise ResourcePlanError(f"{count} GPU workers take one CPU each and the cluster has {total:g} "
                                    f"(nodes: {shape}): no CPU is left for decoding; add CPUs or use fewer")
        return ResourcePlan({"CPU": 1.0, "GPU": 1.0}, 1, 1.0)

    share = _cpu_share(count, node_cpus)
    if share is None:
        most = max((n for n in range(1, count) if _cpu_share(n, node_cpus)), default=0)
        raise ResourcePlanError(
            f"{count} workers do not fit on the cluster's {total:g} CPUs (nodes: {shape}) with CPU left "
            f"for decoding: ask for at most {most} (--actors / --workers)")
    step = next(g for g in (1.0, 0.5, STAGE_CPUS) if share % g == 0)
    return ResourcePlan({"CPU": share}, max(1, int(share)), step)


def _cpu_share(count: int, node_cpus: list[float]) -> float | None:
    """CPUs per worker (see `plan_workers`), or None when `count` do not fit. One CPU
    is kept for the stages (STAGE_CPUS on a cluster of less than two)."""
    total = sum(node_cpus)
    kept = 1.0 if total >= 2 else STAGE_CPUS
    share = int((total - kept) / count / STAGE_CPUS + 1e-9) * STAGE_CPUS
    while share >= STAGE_CPUS and sum(int(c / share + 1e-9) for c in node_cpus) < count:
        share -= STAGE_CPUS
    if share < STAGE_CPUS:
        return None
    return float(int(share)) if share >= 1 else share


def cluster_plan(count: int, gpu: bool) -> ResourcePlan:
    """`plan_workers` on the live nodes of the Ray cluster this process is connected to."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return plan_workers(count, gpu, [float(n.get("CPU", 0.0)) for n in nodes if n.get("CPU")],
                        sum(float(n.get("GPU", 0.0)) for n in nodes))
