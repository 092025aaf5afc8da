"""URI -> file system, for pyarrow (Ray Data, Ray Train) and fsspec (small objects).

S3 settings come from the standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION) or from `--s3-endpoint` /
`--s3-anon`, which `configure_s3` writes into the environment so that Ray workers
started later inherit them. pyarrow ignores AWS_ENDPOINT_URL, so its S3FileSystem is
built here explicitly and passed to every Ray read/write and to Ray Train.
"""
from __future__ import annotations

import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

from sempart_core.uri import filesystem as fsspec_filesystem  # noqa: F401  (re-export)
from sempart_core.uri import redact  # noqa: F401  (re-export)

S3_SCHEMES = ("s3", "s3a")
S3_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "SEMPART_S3_ANON",
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


def pyarrow_s3() -> pafs.S3FileSystem:
    """pyarrow's S3 file system configured from the environment."""
    kwargs: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if os.environ.get("SEMPART_S3_ANON") == "1":
        kwargs["anonymous"] = True
    elif os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


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
