"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto), for tests.

Clients point AWS_ENDPOINT_URL at the proxy; it reads each request whole, then, drawing
from a seeded random generator, answers 503 SlowDown or 500 InternalError with S3's XML
error body, resets the connection (RST, no answer), waits before forwarding, or just
forwards to the real endpoint and relays the answer. Request bodies are forwarded byte
for byte (a chunked upload is de-chunked and sent with its Content-Length).

It also notes whether each request was signed (Authorization header or a presigned
query), so that a test can check that anonymous access sent no credentials.
"""
from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect",
              "proxy-connection", "content-length"}
ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message>"
    "<RequestId>{request_id}</RequestId><HostId>fault-proxy</HostId></Error>"
)


@dataclass(frozen=True)
class Faults:
    """Shares of requests that meet each fault (the rest are forwarded untouched)."""

    slow_down: float = 0.10  # 503 SlowDown
    internal_error: float = 0.02  # 500 InternalError
    reset: float = 0.02  # connection reset without an answer
    delay: float = 0.05  # forwarded after `delay_s`
    delay_s: float = 2.0
    only: str | None = None  # faults only for requests whose path contains this (the rest are forwarded)


NO_FAULTS = Faults(0.0, 0.0, 0.0, 0.0)


class FaultProxy:
    """`with FaultProxy(upstream, Faults(), seed=0) as proxy:` ... `proxy.url`."""

    def __init__(self, upstream: str, faults: Faults = Faults(), seed: int = 0):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.faults = faults
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # requests, slow_down, internal_error, reset, delay, signed
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def draw(self, path: str) -> str | None:
        """The fault for the next request, or None: one seeded draw per request."""
        f = self.faults
        if f.only is not None and f.only not in path:
            return None
        with self.lock:
            x = self.random.random()
        for name, share in (("slow_down", f.slow_down), ("internal_error", f.internal_error),
                            ("reset", f.reset), ("delay", f.delay)):
            if x < share:
                return name
            x -= share
        return None

    def count(self, *names: str) -> None:
        with self.lock:
            self.counts.update(names)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like S3

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_request(self) -> None:
                body = self.read_body()
                signed = "authorization" in {k.lower() for k in self.headers} or "X-Amz-Credential" in self.path
                fault = proxy.draw(self.path)
                proxy.count("requests", *(["signed"] if signed else []), *([fault] if fault else []))
                if fault == "slow_down":
                    self.error(503, "SlowDown", "Please reduce your request rate.")
                elif fault == "internal_error":
                    self.error(500, "InternalError", "We encountered an internal error. Please try again.")
                elif fault == "reset":
                    self.reset()
                else:
                    if fault == "delay":
                        time.sleep(proxy.faults.delay_s)
                    self.forward(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_request

            def read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline().strip():  # trailers, up to the blank line
                                pass
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()  # the CRLF after each chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def error(self, status: int, code: str, message: str) -> None:
                body = b"" if self.command == "HEAD" else ERROR_BODY.format(
                    code=code, message=message, request_id=uuid.uuid4().hex[:16].upper()
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def reset(self) -> None:
                """Close with RST: the client sees 'connection reset by peer'."""
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def forward(self, body: bytes) -> None:
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in HOP_BY_HOP:
                            upstream.putheader(name, value)
                    if body or self.command in ("PUT", "POST"):
                        upstream.putheader("Content-Length", str(len(body)))
                    upstream.endheaders(body or None)
                    answer = upstream.getresponse()
                    data = answer.read()
                    self.send_response_only(answer.status, answer.reason)
                    for name, value in answer.getheaders():
                        if name.lower() not in HOP_BY_HOP:
                            self.send_header(name, value)
                    length = answer.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    if length is not None:
                        self.send_header("Content-Length", length)
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

        return Handler
