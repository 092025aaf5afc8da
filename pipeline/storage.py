"""URI -> file system, for pyarrow (Ray Data, Ray Train) and boto3 (listing).

Every S3 client is built from one `S3Settings` (sempart_core/s3settings.py: endpoint,
region, credentials, anonymous access, retries, timeouts), read from the environment.
`--s3-endpoint` / `--s3-anon` are written into the environment by `configure_s3`, so
that Ray workers started later, and `s3_env()` forwarded to them, build the same
clients. pyarrow ignores AWS_ENDPOINT_URL, so its S3FileSystem is built here
explicitly and passed to every Ray read/write and to Ray Train.

Helpers resolve the URIs they are given with `pyarrow_filesystem`; clients are cached
per process and settings, so resolving is a parse, and each process opens one S3 client
(and its connection pool) per configuration.
"""
from __future__ import annotations

import functools
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from sempart_core.s3settings import ENV_VARS as S3_ENV_VARS
from sempart_core.s3settings import S3Settings, count_retry, retries  # noqa: F401  (retries: re-export)
from sempart_core.uri import atomic_local_file  # noqa: F401  (re-export)
from sempart_core.uri import filesystem as fsspec_filesystem  # noqa: F401  (re-export)
from sempart_core.uri import redact

S3_SCHEMES = ("s3", "s3a")
# The AWS SDK writes an error answer's body into the buffer of a GET; when the body is
# longer than the bytes asked for (a throttled read of an object or range of a few
# hundred bytes), the call fails at once with this message, which the SDK never retries.
UNRETRIED_READ_ERROR = "Failed to flush response stream"
T = TypeVar("T")


def is_s3(uri: str) -> bool:
    return urlparse(str(uri)).scheme in S3_SCHEMES


def configure_s3(endpoint: str | None = None, anon: bool = False) -> None:
    """Apply `--s3-endpoint` / `--s3-anon` to this process (and Ray workers it starts)."""
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    if anon:
        os.environ["SEMPART_S3_ANON"] = "1"


def s3_env() -> dict[str, str]:
    """The S3 variables set here, to forward to Ray workers (runtime_env env_vars)."""
    return {k: os.environ[k] for k in S3_ENV_VARS if k in os.environ}


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with the AWS SDK's default retry strategy, which has no
    retry quota (sempart_core/s3settings.py: the "standard" strategy's quota runs out
    under sustained throttling), and that keeps its settings when pickled.

    pyarrow pickles an S3FileSystem without its retry strategy, so a copy sent to a Ray
    worker (Ray Train's storage_filesystem, a read task's file system) would fall back
    to 3 attempts; this one is rebuilt from its S3Settings on the other side.
    """

    def __init__(self, settings: S3Settings):
        super().__init__(
            **settings.pyarrow_kwargs(),
            # the SDK's count is of retries: the first attempt comes on top
            retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=settings.max_attempts - 1),
        )
        self.settings = settings

    def __reduce__(self):
        return RetryingS3FileSystem, (self.settings,)


@functools.lru_cache(maxsize=8)
def _pyarrow_s3_for(settings: S3Settings) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(settings)


def pyarrow_s3() -> pafs.S3FileSystem:
    """pyarrow's S3 file system for the current settings (one per process and settings)."""
    return _pyarrow_s3_for(S3Settings.from_env())


@functools.lru_cache(maxsize=8)
def _s3_client_for(settings: S3Settings):
    return settings.boto3_client()


def s3_client():
    """boto3 S3 client for the current settings (one per process and settings; boto3
    clients are thread-safe)."""
    return _s3_client_for(S3Settings.from_env())


def pyarrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow file system, path inside it) for a local path, file:// or s3:// URI."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme in S3_SCHEMES:
        return pyarrow_s3(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(path)
    raise ValueError(f"unsupported URI scheme {parsed.scheme!r} in {redact(uri)}: use a path, file:// or s3://")




def read_retrying(read: Callable[[], T]) -> T:
    """`read()`, retried when pyarrow fails it with UNRETRIED_READ_ERROR, with the
    attempts and full-jitter backoff of the other S3 retries (counted as they are)."""
    attempts = S3Settings.from_env().max_attempts
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except OSError as exc:
            if UNRETRIED_READ_ERROR not in str(exc) or attempt == attempts:
                raise
        count_retry()
        time.sleep(random.random() * min(2 ** (attempt - 1), 20))
    raise AssertionError("unreachable")
