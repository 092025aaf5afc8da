"""Processes of Ray, found and killed from outside (Linux /proc), as a lost machine or a
killed worker would end them: the tests inject faults this way, not through hooks in
product code."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants. Ray's workers run in sessions of their own, so
    killing a process group alone leaves them alive for a few seconds."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            ppid = int(rest.rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants_titled(root: int, prefix: str) -> list[int]:
    """Descendants of `root` whose process title starts with `prefix` (Ray names its
    worker processes `ray::<actor class or task>`)."""
    return [pid for pid in process_tree(root)[1:] if command_line(pid).startswith(prefix)]


def kill(pids: list[int]) -> None:
    """SIGKILL each process that is still there."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def processes_mentioning(text: str) -> list[int]:
    """Pids other than this one whose command line contains `text` (e.g. a private
    temp folder that only one test's processes name)."""
    pids = [int(p.name) for p in Path("/proc").glob("[0-9]*")]
    return [pid for pid in pids if pid != os.getpid() and text in command_line(pid)]


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on now (held open together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def local_ray_env(ray_tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a `sempart` subprocess that starts its own local Ray (2 CPUs)
    under `ray_tmp`, seeing no Ray or S3 settings of this process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    repo = str(Path(__file__).resolve().parents[2])
    env.update(RAY_TMPDIR=str(ray_tmp), PYTHONPATH=repo, SEMPART_NUM_CPUS="2", **extra)
    return env
