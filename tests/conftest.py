"""Shared fixtures: a local S3 endpoint (moto's standalone server) and fresh buckets."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

# A raylet may take longer than Ray's default 30 s to register on a busy 2-core machine;
# local Ray instances of the tests (and their `sempart` subprocesses) wait longer.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
# Ray's bookkeeping services poll all the time, and a test session keeps its Ray for
# minutes while hundreds of worker log files pile up: the log monitor lists them every
# 0.5 s instead of every loop (0.1 s), and the dashboard agent's node statistics, which
# no test reads, are gathered every minute instead of every 5 s. Measured on 12 label
# runs in one session (~95 s): log monitor 1.6 -> 1.0 CPU-s, dashboard agent 1.9 -> 1.5.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", "60000")

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",  # botocore reads only this one for the region
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API on 127.0.0.1 for this test session; the AWS_* variables point at it.

    A server (not moto's in-process mock) so that other processes, such as Ray workers,
    reach it too. The previous environment is restored afterwards.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
                mp.setenv(name, value)
            yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket; returns its URI, s3://name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (Ray takes seconds to start).

    Started after the S3 fixture when both are used, so workers inherit AWS_* settings.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> str:
    """A model artifact with a tiny RANDOM backbone (vit_tiny_patch16_224 at 32 px), for
    pipeline tests that need a model but not a good one; returns its folder."""
    from sempart_core.artifact import save_untrained_artifact
    from sempart_core.config import SempartConfig

    cfg = SempartConfig()
    cfg.backbone.name, cfg.backbone.weights, cfg.data.image_size = "vit_tiny_patch16_224", "random", 32
    out = tmp_path_factory.mktemp("model") / "m"
    save_untrained_artifact(str(out), cfg)
    return str(out)


# The slowest files first (seconds in a `make test` run, all of a file's tests, 2026-12-05):
# `make test` runs two processes that take whole files in this order, so the long files
# start early and the short ones fill the end, and the two finish together instead of one
# running the last long file alone (files not listed follow, the short ones).
SLOWEST_FIRST = (
    "integration/test_multinode.py",  # 277
    "integration/test_train_kill.py",  # 199
    "integration/test_label_resume.py",  # 158
    "integration/test_s3_faults.py",  # 132
    "integration/test_perf_benchmarks.py",  # 118
    "unit/test_learning.py",  # 114
    "integration/test_label_retry.py",  # 97
    "integration/test_demo.py",  # 87
    "integration/test_label_benchmarks.py",  # 85
    "integration/test_train.py",  # 85
    "integration/test_label_inputs.py",  # 62
    "integration/test_label_watchdog.py",  # 47
    "integration/test_ray_job_submit.py",  # 38
    "integration/test_label_instances.py",  # 31
    "integration/test_label.py",  # 31
    "integration/test_train_benchmark.py",  # 25
    "integration/test_ray_join.py",  # 19
    "integration/test_label_decode.py",  # 17
    "unit/test_instances.py",  # 16
    "integration/test_label_streaming.py",  # 13
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.as_posix()
        return next((i for i, name in enumerate(SLOWEST_FIRST) if path.endswith(name)), len(SLOWEST_FIRST))

    items.sort(key=rank)  # stable: the other files keep their order
