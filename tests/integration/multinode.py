"""A real multi-node Ray cluster on this machine, for fault tests: a head and worker
nodes, each its own `ray start --block` process (raylet, object store and workers of
its own) on 127.0.0.1 with its own ports and --temp-dir, so that nobody else's
`ray.init` joins it and killing a node's process tree is a real node loss.

Never `ray stop`: it would end every Ray on the machine. Each node's processes are
SIGKILLed by process tree (and by their temp dir) when the cluster stops.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from processes import command_line, free_ports, kill, process_tree

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def base_env() -> dict[str, str]:
    """This process's environment without Ray settings (AWS_* stays: S3 for the nodes),
    without token authentication (Ray would otherwise switch it on for some processes
    and not others when a ~/.ray/auth_token appears on the machine), and with time for
    a node's agents to start on a busy machine (a raylet gives up after ~15 s)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "RAY_AUTH_MODE": "disabled", "RAY_agent_register_timeout_ms": "120000"}


class NodesNotUp(RuntimeError):
    """A node did not join in time (Ray gives a raylet 30 s to register: a busy machine)."""


class Node:
    def __init__(self, name: str, proc: subprocess.Popen, temp_dir: Path):
        self.name, self.proc, self.temp_dir = name, proc, temp_dir
        self.killed = False

    def processes(self) -> list[int]:
        """`ray start` and its raylet, object store, GCS (head) and workers."""
        return process_tree(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the whole node at once, as when its machine disappears."""
        self.killed = True
        kill(self.processes())
        self.proc.wait()


class Cluster:
    """Head with `head_cpus`, then worker nodes added with `add_worker`."""

    def __init__(self, head_cpus: int):
        # Short: Ray puts unix sockets under it (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="mn", dir="/tmp"))
        self.port, client = free_ports(2)
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Node] = []
        self.head = self._start("head", head_cpus, ["--head", "--port", str(self.port), "--include-dashboard", "false",
                                                    "--ray-client-server-port", str(client)])

    def _start(self, name: str, cpus: int, args: list[str]) -> Node:
        temp_dir = self.root / name
        agent, grpc, metrics, env_agent = free_ports(4)
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [*RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
             "--num-cpus", str(cpus), "--num-gpus", "0", "--temp-dir", str(temp_dir),
             "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(grpc),
             "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(env_agent), *args],
            env=base_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        node = Node(name, proc, temp_dir)
        self.nodes.append(node)
        return node

    def workers(self) -> list[Node]:
        """The worker nodes still running."""
        return [n for n in self.nodes if n is not self.head and n.proc.poll() is None]

    def add_worker(self, cpus: int, attempts: int = 3) -> Node:
        """Start a worker node and wait until the cluster counts it."""
        for attempt in range(attempts):
            alive = 1 + len(self.workers())
            node = self._start(f"worker{len(self.nodes)}", cpus, ["--address", self.address])
            try:
                self.wait_for_nodes(alive + 1)
                return node
            except NodesNotUp:
                node.kill()
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def wait_for_nodes(self, count: int, timeout: float = 240) -> None:
        """Until the cluster counts `count` live nodes (asked by one short-lived driver)."""
        probe = (
            "import ray, sys, time\n"
            "deadline = time.monotonic() + float(sys.argv[3])\n"
            "while True:  # the head may not listen yet\n"
            "    try:\n"
            "        ray.init(address=sys.argv[1], log_to_driver=False)\n"
            "        break\n"
            "    except Exception:\n"
            "        if time.monotonic() > deadline: raise\n"
            "        time.sleep(1)\n"
            "while sum(n['Alive'] for n in ray.nodes()) != int(sys.argv[2]) and time.monotonic() < deadline:\n"
            "    time.sleep(0.5)\n"
            "print(sum(n['Alive'] for n in ray.nodes()))\n"
        )
        # A node that exits now will not join: stop waiting. One that had exited before
        # (its raylet gave up on a busy machine; `workers()` no longer counts it) is
        # ignored, or no replacement could ever join.
        gone = {n.name for n in self.nodes if n.proc.poll() is not None}
        probe_proc = subprocess.Popen([sys.executable, "-c", probe, self.address, str(count), str(timeout)],
                                      env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            while probe_proc.poll() is None:
                if any(n.proc.poll() is not None and not n.killed and n.name not in gone for n in self.nodes):
                    break
                time.sleep(1)
        finally:
            if probe_proc.poll() is None:
                probe_proc.kill()
            out = probe_proc.communicate()[0]
        if out.split()[-1:] != [str(count)]:
            raise NodesNotUp(f"{count} nodes not up\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join((self.root / f"{n.name}.log").read_text()[-1500:] for n in self.nodes)

    def stop(self) -> None:
        """Kill every node's processes (workers first), then anything left under the temp dir."""
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.kill()
        kill([int(p.name) for p in Path("/proc").glob("[0-9]*")
              if p.name != str(os.getpid()) and str(self.root) in command_line(int(p.name))])
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(head_cpus: int, worker_cpus: list[int], attempts: int = 3) -> Cluster:
    """A head and one worker node per entry of `worker_cpus`, all joined. On a busy
    machine a node can miss Ray's startup deadline (its agents must start within
    ~15 s): nodes start one at a time, and a node that fails is started again."""
    for attempt in range(attempts):
        cluster = Cluster(head_cpus)
        try:
            cluster.wait_for_nodes(1)
            break
        except BaseException as exc:  # an interrupt too: never leave a node behind
            cluster.stop()
            if not isinstance(exc, NodesNotUp) or attempt == attempts - 1:
                raise
    try:
        for cpus in worker_cpus:
            cluster.add_worker(cpus, attempts)
        return cluster
    except BaseException:
        cluster.stop()
        raise
