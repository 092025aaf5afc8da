"""`ray job submit` of jobs/label_job.py to a Ray head and S3 started by infra/local/start.sh.

The scripts users run are the ones tested: start.sh starts a second, separate Ray
instance (its own ports and --temp-dir, so `ray.init()` elsewhere never finds it) and a
moto S3 server; stop.sh ends exactly those processes by pid. `ray stop` is never called:
it would also kill the test session's own Ray (the `ray_session` fixture), which this
test checks is still alive afterwards. The model is a tiny RANDOM backbone: this checks
the deployment path, not mask quality.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from processes import free_ports, processes_mentioning


pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "infra" / "local"
# Keep the uploaded working dir small: only the code the job imports travels.
EXCLUDES = [".git", ".venv", "demo-work", "tests", "docs", "benchmarks", "infra", "**/__pycache__", "*.egg-info"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def clean_env() -> dict[str, str]:
    """This process's environment without Ray or AWS settings (the session's own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}


class LocalStack:
    """What infra/local/start.sh started: its exported variables, state dir and pids."""

    def __init__(self, env: dict[str, str], exported: dict[str, str], state: Path):
        self.env, self.exported, self.state = env, exported, state
        self.pids = {name: int((state / f"{name}.pid").read_text()) for name in ("ray", "moto")}

    def stop(self) -> None:
        """infra/local/stop.sh; then none of this head's processes, nor moto, may remain."""
        stopped = subprocess.run([str(LOCAL / "stop.sh")], env=self.env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert not [name for name, pid in self.pids.items() if alive(pid)]
        assert not processes_mentioning(str(self.state)), "processes of the stopped head still run"


@pytest.fixture
def local_stack() -> Iterator[LocalStack]:
    """infra/local/start.sh on free ports, stopped by infra/local/stop.sh afterwards."""
    # Short: Ray puts unix sockets under it (108-byte limit), pytest's tmp_path is too long.
    state = Path(tempfile.mkdtemp(prefix="sl", dir="/tmp"))
    ray_port, dashboard, s3, agent, client = free_ports(5)
    env = clean_env() | {
        "SEMPART_LOCAL_DIR": str(state), "RAY_PORT": str(ray_port), "RAY_DASHBOARD_PORT": str(dashboard),
        "S3_PORT": str(s3), "RAY_NUM_CPUS": "2", "PYTHON": sys.executable, "SEMPART_LOCAL_BUCKET": "",
    }
    try:
        started = subprocess.run(
            [str(LOCAL / "start.sh"), "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client)],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert started.returncode == 0, started.stderr[-3000:]
        exported = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
        yield LocalStack(env, exported, state)
    finally:
        subprocess.run([str(LOCAL / "stop.sh")], env=env, capture_output=True, timeout=120)  # no-op once stopped
        shutil.rmtree(state, ignore_errors=True)


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = (rng.random((40, 56, 3)) * 80).astype(np.uint8)
    rgb[10:30, 18:38] = rng.integers(150, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def test_label_job_submitted_to_local_head(local_stack, ray_session, model: str) -> None:
    import boto3

    exported = local_stack.exported
    assert exported["RAY_API_SERVER_ADDRESS"].startswith("http://127.0.0.1:")
    assert len(processes_mentioning(str(local_stack.state))) >= 2  # gcs_server, raylet...: what stop.sh ends

    s3 = boto3.client("s3", endpoint_url=exported["AWS_ENDPOINT_URL"], region_name=exported["AWS_REGION"],
                      aws_access_key_id=exported["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=exported["AWS_SECRET_ACCESS_KEY"])
    bucket = f"jobs-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    uris = []
    for i in range(4):
        s3.put_object(Bucket=bucket, Key=f"in/{i}.png", Body=png(i))
        uris.append(f"s3://{bucket}/in/{i}.png")
    for path in Path(model).iterdir():
        s3.upload_file(str(path), bucket, f"model/{path.name}")

    # The job's `python` is whatever PATH finds in Ray's environment: start.sh puts this
    # interpreter's bin/ first, and the system python has no Ray, so success shows it.
    submitted = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit",
         "--address", exported["RAY_API_SERVER_ADDRESS"], "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
         "python", "jobs/label_job.py", "--model", f"s3://{bucket}/model", "--input", f"s3://{bucket}/in/",
         "--out", f"s3://{bucket}/labels", "--no-gpu", "--batch-size", "4", "--rows-per-file", "3"],
        env=clean_env() | exported, capture_output=True, text=True, timeout=400,
    )
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
    assert "succeeded" in submitted.stdout + submitted.stderr

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="labels/")["Contents"]]
    parts = sorted(k for k in keys if k.startswith("labels/part-") and k.endswith(".parquet"))
    assert len(parts) == 2  # 4 rows, 3 per file
    table = pa.concat_tables(pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=k)["Body"].read()))
                             for k in parts)
    assert table.num_rows == len(uris)
    assert sorted(table.column("uri").to_pylist()) == uris
    assert set(table.column("status").to_pylist()) <= {"ok", "empty"}
    assert set(table.column("width").to_pylist()) == {56}

    local_stack.stop()
    # The session's own Ray is another instance: stop.sh must leave it working.
    assert ray_session.get(ray_session.remote(lambda: 7).remote()) == 7
