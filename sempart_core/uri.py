"""Read and write small objects (weights, artifacts) by URI: local paths, file:// and s3://.

`sempart_core` must work without Ray or pyarrow, so this is a thin layer over fsspec.
S3 settings come from the standard environment variables. botocore honours
`AWS_ENDPOINT_URL` but only `AWS_DEFAULT_REGION` (not `AWS_REGION`), and fsspec caches
file-system instances by their arguments; so both values are passed explicitly, which
also gives a fresh client when a test points the variables at another endpoint.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def redact(uri: str) -> str:
    """The URI without any `user:secret@` part, safe for logs and error messages."""
    return _USERINFO.sub(r"\1***@", uri)


def _storage_options(protocol: str) -> dict[str, Any]:
    """S3 endpoint and region from the environment; nothing for other protocols."""
    if protocol not in ("s3", "s3a"):
        return {}
    client_kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    return {"client_kwargs": client_kwargs} if client_kwargs else {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system that serves `uri`, and the path inside it."""
    protocol = fsspec.utils.get_protocol(uri)
    return fsspec.core.url_to_fs(uri, **_storage_options(protocol))


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
        _write_local_atomic(path, data)
    else:
        fs.pipe_file(path, data)
    log.debug("wrote %d bytes to %s", len(data), redact(uri))


def _write_local_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the result should read like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
