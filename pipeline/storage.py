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

Retries (sempart_core/s3settings.py says why none stops for a quota): pyarrow's client
retries inside the AWS SDK, where they cannot be counted. The reads of whole objects
and byte ranges, nearly all of a labelling run's requests (one image each: a HEAD and
a GET), are retried here instead (`read_object`, `read_range`): each read up to
SEMPART_S3_MAX_ATTEMPTS times with botocore's full-jitter backoff, every retry counted
by `retries()`, so that a run can say how much S3 throttled it; within a read, the SDK
tries each request READ_REQUEST_ATTEMPTS times at once, so that a read of two requests
is not twice as likely to fail as one.
"""
from __future__ import annotations

import functools
import os
import random
import re
import time
from collections.abc import Callable
from urllib.parse import urlparse

import pyarrow.fs as pafs

from sempart_core.s3settings import ENV_VARS as S3_ENV_VARS
from sempart_core.s3settings import S3Settings, count_retry, retries  # noqa: F401  (retries: re-export)
from sempart_core.uri import atomic_local_file  # noqa: F401  (re-export)
from sempart_core.uri import redact

S3_SCHEMES = ("s3", "s3a")
# A failed S3 request worth trying again, as pyarrow words it (the AWS SDK's error type
# or the HTTP status): throttling, 5xx answers with or without a body, dropped or reset
# connections, and "Failed to flush response stream" (INTERNAL_FAILURE: an error body
# longer than the few bytes a GET asked for). A missing object or a refusal is final.
READ_REQUEST_ATTEMPTS = 2  # per request within one read_object / read_range attempt
TRANSIENT_S3_ERROR = re.compile(
    r"HTTP status (5\d\d|429)|SLOW_DOWN|SERVICE_UNAVAILABLE|THROTTLING|INTERNAL_FAILURE|NETWORK_CONNECTION"
    r"|REQUEST_TIMEOUT|curlCode|Connection reset|timed out"
)


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
    under sustained throttling), and that keeps its settings when pickled. It tries each
    request `attempts` times (default: the settings' budget; fewer for callers that
    retry themselves).

    pyarrow pickles an S3FileSystem without its retry strategy, so a copy sent to a Ray
    worker (Ray Train's storage_filesystem, a read task's file system) would fall back
    to 3 attempts; this one is rebuilt from its S3Settings on the other side.
    """

    def __init__(self, settings: S3Settings, attempts: int | None = None):
        self.attempts = attempts or settings.max_attempts
        super().__init__(
            **settings.pyarrow_kwargs(),
            # the SDK's count is of retries: the first attempt comes on top
            retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=self.attempts - 1),
        )
        self.settings = settings

    def __reduce__(self):
        return RetryingS3FileSystem, (self.settings, self.attempts)


@functools.lru_cache(maxsize=8)
def _pyarrow_s3_for(settings: S3Settings, attempts: int | None = None) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(settings, attempts)


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




def read_object(uri: str) -> bytes:
    """The object's bytes (local path, file:// or s3://), retried as the module says."""
    return _read_retrying(uri, lambda fs, path: _read_all(fs, path))


def read_range(uri: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of the object: one ranged read, retried as the module says."""
    return _read_retrying(uri, lambda fs, path: _read_at(fs, path, offset, size))


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _read_at(fs: pafs.FileSystem, path: str, offset: int, size: int) -> bytes:
    with fs.open_input_file(path) as f:
        return f.read_at(size, offset)


def _read_retrying(uri: str, read: Callable[[pafs.FileSystem, str], bytes]) -> bytes:
    """`read(fs, path)`; on S3 through a client that tries each request
    READ_REQUEST_ATTEMPTS times, each transient failure of the read retried here
    (botocore's attempts and backoff) and counted."""
    fs, path = pyarrow_filesystem(uri)
    if not is_s3(uri):
        return read(fs, path)
    settings = S3Settings.from_env()
    fs = _pyarrow_s3_for(settings, min(READ_REQUEST_ATTEMPTS, settings.max_attempts))
    for attempt in range(1, settings.max_attempts + 1):
        try:
            return read(fs, path)
        except OSError as exc:
            if not TRANSIENT_S3_ERROR.search(str(exc)) or attempt == settings.max_attempts:
                raise
        count_retry()
        time.sleep(random.random() * min(2 ** (attempt - 1), settings.max_backoff_s))
    raise AssertionError("unreachable")
