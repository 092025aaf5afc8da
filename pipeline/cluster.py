"""Where Ray work runs: the cluster at RAY_ADDRESS, or a local Ray on this machine."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

JOIN_TIMEOUT_S = 5.0  # a cluster that does not accept a connection by then is not there


class ClusterUnreachableError(ValueError):
    """The Ray address given (RAY_ADDRESS) does not answer: a setting to fix."""


def init_ray(address: str | None = None) -> None:
    """Join `address` (default RAY_ADDRESS) when set, else start a local Ray
    (SEMPART_NUM_CPUS caps its CPUs). Joining fails within seconds, with one line, when
    nothing answers there: ray.init would wait on it for minutes."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        check_reachable(address)
        ray.init(address=address)
        return
    cpus = os.environ.get("SEMPART_NUM_CPUS")
    # address="local": a fresh instance, never the cluster Ray recorded last on this
    # machine (a stale `ray start --head` would make ray.init() hang on it).
    ray.init(address="local", num_cpus=int(cpus) if cpus else None, include_dashboard=False)


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
