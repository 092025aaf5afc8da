"""S3 settings: read from the environment in one place, for every S3 client sempart builds.

pyarrow (`pipeline.storage`), s3fs (`sempart_core.uri`) and boto3 (manifest listing) all
take their endpoint, region, credentials, anonymous access, retries and timeouts from
`S3Settings.from_env()`. The environment is the carrier because Ray workers inherit it
(`--s3-endpoint` / `--s3-anon` are written into it before Ray starts).

Variables: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL; AWS_REGION or AWS_DEFAULT_REGION;
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN; SEMPART_S3_ANON=1 (unsigned
requests, for public buckets); SEMPART_S3_MAX_ATTEMPTS, SEMPART_S3_CONNECT_TIMEOUT_S,
SEMPART_S3_READ_TIMEOUT_S, SEMPART_S3_MAX_BACKOFF_S.

Retries, on every call of every client (HEAD, GET, LIST, PUT, multipart parts): throttling
(503 SlowDown), 5xx answers (with or without a body) and dropped or reset connections
are retried up to SEMPART_S3_MAX_ATTEMPTS attempts (12 by default, the first included),
and never stop early for a retry quota. The AWS SDKs' "standard" mode keeps a quota per
client, a token bucket that each retry drains; a long-lived client under sustained
throttling empties it and then fails calls at their first error. So:

- boto3 and s3fs (botocore): the standard mode's retry conditions and backoff (full
  jitter, rand(0, 1) * min(2**(k-1), SEMPART_S3_MAX_BACKOFF_S = 20) s before retry k:
  about 75 s of throttling in all on average at 12 attempts, at most 151 s), with the
  quota switched off (`install_retries`);
- pyarrow: the AWS SDK's default strategy, which has no quota: 25 ms * 2**(k-1) before
  retry k, 51 s in all at 12 attempts (`pipeline.storage`).

`retries()` counts the retries of botocore-based clients in this process; pyarrow's
client retries inside C++ with no hook to count them.
"""
from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

DEFAULT_MAX_ATTEMPTS = 12
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0
DEFAULT_MAX_BACKOFF_S = 20.0  # botocore's cap on one retry's wait
MAX_POOL_CONNECTIONS = 32  # per botocore client: listing runs 16 requests at a time (pipeline.manifest)

# Every variable S3Settings reads: forwarded to Ray workers so they build the same clients.
ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "SEMPART_S3_ANON",
    "SEMPART_S3_MAX_ATTEMPTS",
    "SEMPART_S3_CONNECT_TIMEOUT_S",
    "SEMPART_S3_READ_TIMEOUT_S",
    "SEMPART_S3_MAX_BACKOFF_S",
)


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None = None  # full URL, e.g. http://127.0.0.1:9000; None: AWS
    region: str | None = None
    access_key: str | None = None  # None: each client's default credential chain
    secret_key: str | None = None
    session_token: str | None = None
    anon: bool = False  # unsigned requests; credentials are ignored
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # first try included
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    max_backoff_s: float = DEFAULT_MAX_BACKOFF_S  # cap on one retry's full-jitter wait

    @classmethod
    def from_env(cls) -> S3Settings:
        env = os.environ

        def number(name: str, default: float, kind: type) -> Any:
            value = env.get(name)
            try:
                parsed = kind(value) if value else default
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected a number") from None
            if parsed <= 0:
                raise ValueError(f"{name}={value!r}: must be positive")
            return parsed

        return cls(
            endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            anon=env.get("SEMPART_S3_ANON") == "1",
            max_attempts=number("SEMPART_S3_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, int),
            connect_timeout_s=number("SEMPART_S3_CONNECT_TIMEOUT_S", DEFAULT_CONNECT_TIMEOUT_S, float),
            read_timeout_s=number("SEMPART_S3_READ_TIMEOUT_S", DEFAULT_READ_TIMEOUT_S, float),
            max_backoff_s=number("SEMPART_S3_MAX_BACKOFF_S", DEFAULT_MAX_BACKOFF_S, float),
        )

    def __repr__(self) -> str:  # never print keys
        return f"S3Settings(endpoint={self.endpoint!r}, region={self.region!r}, anon={self.anon})"

    @property
    def credentials(self) -> dict[str, str] | None:
        """Explicit keys to pass, or None (anonymous, or the client's own chain)."""
        if self.anon or not (self.access_key and self.secret_key):
            return None
        creds = {"access_key": self.access_key, "secret_key": self.secret_key}
        if self.session_token:
            creds["session_token"] = self.session_token
        return creds

    def pyarrow_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for pyarrow.fs.S3FileSystem, but the retry strategy
        (an object of pyarrow's, built by pipeline.storage)."""
        kwargs: dict[str, Any] = {
            "connect_timeout": self.connect_timeout_s,
            "request_timeout": self.read_timeout_s,
        }
        if self.endpoint:
            parsed = urlparse(self.endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        if self.region:
            kwargs["region"] = self.region
        if self.anon:
            kwargs["anonymous"] = True
        elif self.credentials:
            kwargs.update(self.credentials)
        return kwargs

    def botocore_config_kwargs(self) -> dict[str, Any]:
        """botocore.config.Config arguments: retries, timeouts, unsigned when anonymous."""
        kwargs: dict[str, Any] = {
            "retries": {"total_max_attempts": self.max_attempts, "mode": "standard"},
            "connect_timeout": self.connect_timeout_s,
            "read_timeout": self.read_timeout_s,
            "max_pool_connections": MAX_POOL_CONNECTIONS,
        }
        if self.anon:
            from botocore import UNSIGNED

            kwargs["signature_version"] = UNSIGNED
        return kwargs

    def boto3_client(self):
        """A boto3 S3 client (`install_retries`: no retry quota, retries counted)."""
        import boto3
        import botocore.session
        from botocore.config import Config

        session = botocore.session.get_session()
        install_retries(session, self.max_attempts, self.max_backoff_s)
        creds = self.credentials or {}
        return boto3.Session(botocore_session=session).client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=creds.get("access_key"),
            aws_secret_access_key=creds.get("secret_key"),
            aws_session_token=creds.get("session_token"),
            config=Config(**self.botocore_config_kwargs()),
        )

    def fsspec_options(self) -> dict[str, Any]:
        """Storage options for fsspec's s3fs (passed to `fsspec.core.url_to_fs`).

        botocore retries each call (`install_retries` on the session `sempart_core.uri`
        gives s3fs); s3fs's own retry loop (5 tries) stays on top for what botocore does
        not retry, such as a body cut short.
        """
        client_kwargs: dict[str, Any] = {}
        if self.endpoint:
            client_kwargs["endpoint_url"] = self.endpoint
        if self.region:
            client_kwargs["region_name"] = self.region
        options: dict[str, Any] = {
            "anon": self.anon,
            "client_kwargs": client_kwargs,
            "config_kwargs": {k: v for k, v in self.botocore_config_kwargs().items() if k != "signature_version"},
        }
        creds = self.credentials
        if creds:
            options.update(key=creds["access_key"], secret=creds["secret_key"], token=creds.get("session_token"))
        return options


# ------------------------------------------------------------------ retries

_lock = threading.Lock()
_retries = 0


class _NoQuota:
    """A retry quota that never runs out (see the module docstring)."""

    def acquire_retry_quota(self, context: Any) -> bool:
        return True


def count_retry() -> None:
    """Count one S3 retry made in this process (`retries()`)."""
    global _retries
    with _lock:
        _retries += 1


class _Retry:
    """botocore's standard retry handler without its quota, counting each retry."""

    def __init__(self, max_attempts: int, max_backoff_s: float):
        from botocore.retries import standard

        self.handler = standard.RetryHandler(
            retry_policy=standard.RetryPolicy(
                retry_checker=standard.StandardRetryConditions(max_attempts=max_attempts),
                retry_backoff=standard.ExponentialBackoff(max_backoff=max_backoff_s),
            ),
            retry_event_adapter=standard.RetryEventAdapter(),
            retry_quota=_NoQuota(),
        )

    def __call__(self, **kwargs: Any) -> float | None:
        delay = self.handler.needs_retry(**kwargs)
        if delay is not None:
            count_retry()
        return delay


def install_retries(session: Any, max_attempts: int, max_backoff_s: float) -> None:
    """Make the S3 clients that botocore (or aiobotocore) `session` creates from now on
    retry with `_Retry`: registered under the unique id of the handler botocore would
    install, so a new client keeps this one instead."""
    session.register("needs-retry.s3", _Retry(max_attempts, max_backoff_s), unique_id="retry-config-s3")


@functools.lru_cache(maxsize=8)
def aiobotocore_session(max_attempts: int, max_backoff_s: float):
    """One aiobotocore session per process and retry budget, with `install_retries`,
    for s3fs to create its client from (set as the file system's `session` before it
    connects; not passed as an option, which would make the file system unpicklable)."""
    from aiobotocore.session import AioSession

    session = AioSession()
    install_retries(session, max_attempts, max_backoff_s)
    return session


def retries() -> int:
    """S3 retries made by boto3 and s3fs clients in this process so far."""
    return _retries
