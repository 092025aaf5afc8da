"""S3 settings read once from the environment, and what each client gets from them."""
from __future__ import annotations

import pickle

import pytest

from pipeline.storage import pyarrow_s3, s3_env
from sempart_core.s3settings import DEFAULT_MAX_ATTEMPTS, S3Settings
from sempart_core.uri import atomic_local_file, filesystem


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN",
                 "SEMPART_S3_ANON", "SEMPART_S3_MAX_ATTEMPTS", "SEMPART_S3_CONNECT_TIMEOUT_S",
                 "SEMPART_S3_READ_TIMEOUT_S", "SEMPART_S3_MAX_BACKOFF_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    return monkeypatch


def test_environment_read_the_same_way_for_every_client(env: pytest.MonkeyPatch) -> None:
    env.setenv("AWS_ENDPOINT_URL", "http://other:1")
    env.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")  # the S3-specific one wins
    env.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    env.setenv("SEMPART_S3_MAX_ATTEMPTS", "5")
    env.setenv("SEMPART_S3_MAX_BACKOFF_S", "2.5")
    s = S3Settings.from_env()
    assert (s.endpoint, s.region, s.max_attempts, s.max_backoff_s) == ("http://127.0.0.1:9000", "eu-west-1", 5, 2.5)

    arrow = s.pyarrow_kwargs()
    assert (arrow["endpoint_override"], arrow["scheme"], arrow["region"]) == ("127.0.0.1:9000", "http", "eu-west-1")
    assert (arrow["access_key"], arrow["secret_key"]) == ("AKIDEXAMPLE", "s3cr3t")
    assert s.botocore_config_kwargs()["retries"] == {"total_max_attempts": 5, "mode": "standard"}
    fs, path = filesystem("s3://bucket/key")
    assert (fs.anon, fs.key, fs.client_kwargs["endpoint_url"], path) == (False, "AKIDEXAMPLE", s.endpoint, "bucket/key")
    assert fs.config_kwargs["retries"]["total_max_attempts"] == 5
    assert {"SEMPART_S3_MAX_ATTEMPTS", "SEMPART_S3_MAX_BACKOFF_S"} <= set(s3_env())  # Ray workers build the same clients


def test_anonymous_reaches_every_client_and_drops_keys(env: pytest.MonkeyPatch) -> None:
    env.setenv("SEMPART_S3_ANON", "1")
    s = S3Settings.from_env()
    assert s.anon and s.credentials is None
    assert s.pyarrow_kwargs()["anonymous"] is True and "access_key" not in s.pyarrow_kwargs()
    from botocore import UNSIGNED

    assert s.boto3_client().meta.config.signature_version is UNSIGNED
    assert filesystem("s3://bucket/key")[0].anon is True
    assert pickle.loads(pickle.dumps(pyarrow_s3())).settings.anon


def test_bad_numbers_and_secrets(env: pytest.MonkeyPatch) -> None:
    assert S3Settings.from_env().max_attempts == DEFAULT_MAX_ATTEMPTS
    env.setenv("SEMPART_S3_READ_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="SEMPART_S3_READ_TIMEOUT_S='soon': expected a number"):
        S3Settings.from_env()
    env.setenv("SEMPART_S3_READ_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="must be positive"):
        S3Settings.from_env()
    env.delenv("SEMPART_S3_READ_TIMEOUT_S")
    assert "s3cr3t" not in repr(S3Settings.from_env())


def test_atomic_local_file_leaves_nothing_on_failure(tmp_path) -> None:
    target = tmp_path / "sub" / "f.bin"
    with atomic_local_file(str(target), tmp_dir=str(tmp_path / "_tmp")) as f:
        f.write(b"whole")
    assert target.read_bytes() == b"whole"
    with pytest.raises(RuntimeError), atomic_local_file(str(target)) as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"whole"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]
    assert list((tmp_path / "_tmp").iterdir()) == []
