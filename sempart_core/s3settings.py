"""S3 settings: read from the environment in one place, for every S3 client sempart builds.

pyarrow (`pipeline.storage`), s3fs (`sempart_core.uri`) and boto3 (manifest listing) all
take their endpoint, region, credentials, anonymous access, retries and timeouts from
`S3Settings.from_env()`. The environment is the carrier because Ray workers inherit it
(`--s3-endpoint` / `--s3-anon` are written into it before Ray starts).

Variables: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL; AWS_REGION or AWS_DEFAULT_REGION;
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN; SEMPART_S3_ANON=1 (unsigned
requests, for public buckets); SEMPART_S3_MAX_ATTEMPTS, SEMPART_S3_CONNECT_TIMEOUT_S,
SEMPART_S3_READ_TIMEOUT_S.

Retries: every client uses the AWS "standard" retry mode, which retries throttling
(503 SlowDown), 5xx answers and dropped connections with exponential backoff and full
jitter, up to 20 s between attempts. With the default 12 attempts a request that is
throttled every time waits about 75 s in all on average before it fails (botocore waits
rand(0, 1) * min(2**(k-1), 20) s before retry k; pyarrow's AWS SDK waits longer), so a
minute of throttling is ridden out.

Only botocore-based clients (boto3, s3fs) can be observed: `retries()` counts their
retries in this process. pyarrow's S3 client retries inside C++ with no hook to count.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

DEFAULT_MAX_ATTEMPTS = 12
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0

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
        }
        if self.anon:
            from botocore import UNSIGNED

            kwargs["signature_version"] = UNSIGNED
        return kwargs

    def boto3_client(self):
        """A boto3 S3 client (retries counted by `retries()`)."""
        import boto3
        from botocore.config import Config

        creds = self.credentials or {}
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=creds.get("access_key"),
            aws_secret_access_key=creds.get("secret_key"),
            aws_session_token=creds.get("session_token"),
            config=Config(**self.botocore_config_kwargs()),
        )
        count_retries(client.meta.events)
        return client

    def fsspec_options(self) -> dict[str, Any]:
        """Storage options for fsspec's s3fs (passed to `fsspec.core.url_to_fs`).

        botocore retries each call (standard mode, counted); s3fs's own retry loop (5
        tries) stays on top for what botocore does not retry, such as a body cut short.
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


# ------------------------------------------------------------------ retry counting

_lock = threading.Lock()
_retries = 0
_session = None


def _on_request(request, **_: Any) -> None:
    """botocore 'request-created' hook: attempt 2, 3, ... of one call is a retry."""
    global _retries
    if request.context.get("retries", {}).get("attempt", 1) > 1:
        with _lock:
            _retries += 1


def count_retries(events) -> None:
    """Count the retries of the botocore client or session owning `events`."""
    events.register("request-created.s3", _on_request, unique_id="sempart-count-retries")


def aiobotocore_session():
    """One aiobotocore session per process, with the retry counter attached, for s3fs
    to create its client from (set as the file system's `session` before it connects;
    not passed as an option, which would make the file system unpicklable)."""
    global _session
    with _lock:
        if _session is None:
            from aiobotocore.session import AioSession

            _session = AioSession()
            _session.register("request-created.s3", _on_request, unique_id="sempart-count-retries")
        return _session


def retries() -> int:
    """S3 retries made by boto3 and s3fs clients in this process so far."""
    return _retries
