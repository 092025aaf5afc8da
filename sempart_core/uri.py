"""Read and write small objects (weights, artifacts) by URI: local paths, file:// and s3://.

`sempart_core` must work without Ray or pyarrow, so this is a thin layer over fsspec.
S3 settings (endpoint, region, credentials, anonymous access, retries, timeouts) come
from `sempart_core.s3settings`, as for every other S3 client; they are passed to s3fs
explicitly, and fsspec caches file systems by their arguments, so pointing the
variables at another endpoint gives a fresh client.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from sempart_core import s3settings
from sempart_core.s3settings import S3Settings

log = logging.getLogger(__name__)

_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def redact(uri: str) -> str:
    """The URI without any `user:secret@` part, safe for logs and error messages."""
    return _USERINFO.sub(r"\1***@", uri)


def _storage_options(protocol: str) -> dict[str, Any]:
    """The S3 settings for s3fs; nothing for other protocols."""
    if protocol not in ("s3", "s3a"):
        return {}
    return S3Settings.from_env().fsspec_options()


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system that serves `uri`, and the path inside it."""
    protocol = fsspec.utils.get_protocol(uri)
    fs, path = fsspec.core.url_to_fs(uri, **_storage_options(protocol))
    if protocol in ("s3", "s3a") and fs.session is None:  # not connected yet
        # retries without a quota, counted by s3settings.retries()
        settings = S3Settings.from_env()
        fs.session = s3settings.aiobotocore_session(settings.max_attempts, settings.max_backoff_s)
    return fs, path


def join(uri: str, *parts: str) -> str:
    """Append path parts with '/', keeping the scheme (os.path.join would drop s3://)."""
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if not tail:
        return uri
    return f"{uri.rstrip('/')}/{tail}"


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    """The whole object; raises FileNotFoundError naming the (redacted) URI if absent."""
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no such file or object: {redact(uri)}") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old object or the new one, never a partial file.

    Object stores publish an object only when its upload completes; on a local disk we
    write a temporary file in the same folder and rename it over the target.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        with atomic_local_file(path) as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)
    log.debug("wrote %d bytes to %s", len(data), redact(uri))


@contextmanager
def atomic_local_file(path: str, tmp_dir: str | None = None) -> Iterator[IO[bytes]]:
    """A binary file that appears at `path` whole or not at all.

    Written under a temporary name (in `tmp_dir`, default `path`'s folder, which must
    be on the same file system), flushed to disk and renamed over `path` when the
    block ends; removed if the block raises. The temporary name starts with '.', so
    readers that skip hidden names never see it.
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    if tmp_dir:
        os.makedirs(tmp_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the result should read like any file
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
