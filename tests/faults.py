"""A fault-injecting reverse proxy for S3 on loopback: the product's own boto3 client talks to a real S3 API
(moto server) through it, and it breaks chosen requests the way S3 and networks do.

Why a proxy and not a test double: nothing in the product path is replaced. The requests are botocore's, signed
and retried by it, the answers are moto's, and the faults arrive where they arrive in production, on the wire:

- `error_5xx`: a 500 InternalError (or `status=503` ServiceUnavailable) with S3's XML error body, instead of
  forwarding (`after=True`: forwarded first, so the store applied it, and only the answer is lost);
- `throttle`: a 503 SlowDown, S3's answer to too many requests;
- `cut_get`: the upstream answer's headers (its full Content-Length), half of its body (`fraction` of it), then
  the connection closed: a GET cut mid-body;
- `slow_get`: the upstream answer's headers, `fraction` of its body, then a pause of `delay` seconds before the
  rest: a response that stalls (past the client's read timeout, when `delay` is longer);
- `slow_put`: the PUT held for `delay` seconds before it is forwarded.

A rule fires on every `every`-th request it matches and/or on the listed `at` indices (1-based, counted over
the requests it matches), at most `limit` times: deterministic for a given request sequence. Rules are set at
construction or at run time (`proxy.faults = [...]`, `proxy.healthy()`), which resets their counts.
`proxy.injected[kind]` counts the faults injected, `proxy.requests[method]` the requests seen and
`proxy.received` holds (method, target, headers) of each, in arrival order. Thread safe.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field

from helpers import free_port

KINDS = ("error_5xx", "throttle", "cut_get", "slow_get", "slow_put")
# Not forwarded in either direction: they describe one connection, not the request (RFC 9110 7.6.1); Expect is
# answered by this proxy (100 Continue), and bodies are forwarded whole, with their length.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "expect"}


@dataclass
class Fault:
    kind: str
    method: str | None = None  # None: any method
    path: str | None = None  # a substring of the request target (path and query); None: any
    every: int | None = None
    at: tuple[int, ...] = ()
    limit: int | None = None
    status: int = 500  # error_5xx: 500 InternalError or 503 ServiceUnavailable
    after: bool = False  # error_5xx: forward first, then answer the error
    delay: float = 1.0  # slow_put, slow_get: seconds
    fraction: float = 0.5  # cut_get, slow_get: the share of the body sent before the cut or the pause
    seen: int = field(default=0, compare=False)
    fired: int = field(default=0, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r} (one of {KINDS})")
        if self.kind in ("cut_get", "slow_get") and self.method not in (None, "GET"):
            raise ValueError(f"{self.kind} acts on GET bodies")
        if not 0 <= self.fraction < 1:
            raise ValueError("fraction is the share of a body sent before the fault: 0 <= fraction < 1")

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method == method) and (self.path is None or self.path in target)

    def due(self) -> bool:
        """Counts one matching request; whether the fault is due on it."""
        self.seen += 1
        hit = bool(self.every and self.seen % self.every == 0) or self.seen in self.at
        return hit and (self.limit is None or self.fired < self.limit)


def s3_error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>{uuid.uuid4().hex[:16]}</RequestId><HostId>fault-proxy</HostId></Error>").encode()


ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("ServiceUnavailable", "Please reduce your request rate."),
    "throttle": ("SlowDown", "Please reduce your request rate."),
}


class FaultProxy:
    def __init__(self, upstream: str, faults: list[Fault] | None = None):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self._lock = threading.Lock()
        self._faults: list[Fault] = list(faults or [])
        self.injected: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, str, str]] = []  # (kind, method, target) of every injected fault
        self.received: list[tuple[str, str, dict[str, str]]] = []  # (method, target, headers) of every request
        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="fault-proxy")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def faults(self) -> list[Fault]:
        return self._faults

    @faults.setter
    def faults(self, faults: list[Fault]) -> None:
        with self._lock:
            self._faults = list(faults)
            for fault in self._faults:
                fault.seen = fault.fired = 0

    def healthy(self) -> None:
        """No faults from now on: every request is forwarded as it came."""
        self.faults = []

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _decide(self, method: str, target: str, headers: dict[str, str] | None = None) -> Fault | None:
        """The first matching rule due on this request fires (every matching rule counts the request)."""
        with self._lock:
            self.requests[method] += 1
            self.received.append((method, target, dict(headers or {})))
            due = [fault for fault in self._faults if fault.matches(method, target) and fault.due()]
            if due:
                due[0].fired += 1
            return due[0] if due else None

    def _count(self, fault: Fault, method: str, target: str) -> None:
        with self._lock:
            self.injected[fault.kind] += 1
            self.log.append((fault.kind, method, target))


def _handler(proxy: FaultProxy):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

        def log_message(self, *args) -> None:
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                answer = connection.getresponse()
                data = answer.read()
                return answer.status, answer.reason, answer.getheaders(), data
            finally:
                connection.close()

        def _reply(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes,
                   fault: Fault | None = None) -> None:
            self.send_response_only(status, reason)
            has_length = False
            for key, value in headers:
                if key.lower() in HOP_BY_HOP:
                    continue
                has_length |= key.lower() == "content-length"
                self.send_header(key, value)
            if not has_length and self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if fault is not None:  # cut_get or slow_get: part of the body first
                self.wfile.write(data[:int(len(data) * fault.fraction)])
                self.wfile.flush()
                if fault.kind == "cut_get":
                    self.close_connection = True
                    return
                time.sleep(fault.delay)
                data = data[int(len(data) * fault.fraction):]
            self.wfile.write(data)

        def _error(self, status: int, code: str, message: str) -> None:
            body = s3_error(code, message)
            self._reply(status, {500: "Internal Server Error", 503: "Slow Down"}.get(status, "Error"),
                        [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))], body)

        def _handle(self) -> None:
            body = self._body()
            fault = proxy._decide(self.command, self.path, dict(self.headers.items()))
            try:
                if fault is not None and fault.kind == "throttle":
                    proxy._count(fault, self.command, self.path)
                    return self._error(503, *ERRORS["throttle"])
                if fault is not None and fault.kind == "error_5xx" and not fault.after:
                    proxy._count(fault, self.command, self.path)
                    return self._error(fault.status, *ERRORS[fault.status])
                if fault is not None and fault.kind == "slow_put" and self.command == "PUT":
                    proxy._count(fault, self.command, self.path)
                    time.sleep(fault.delay)
                try:
                    answer = self._forward(body)
                except OSError:
                    return self._error(502, "BadGateway", "The upstream did not answer.")
                if fault is not None and fault.kind == "error_5xx":  # after=True: the store applied it
                    proxy._count(fault, self.command, self.path)
                    return self._error(fault.status, *ERRORS[fault.status])
                cut = (fault is not None and fault.kind == "cut_get" and self.command == "GET"
                       and 200 <= answer[0] < 300 and len(answer[3]) >= 2)
                slow = (fault is not None and fault.kind == "slow_get" and self.command == "GET"
                        and 200 <= answer[0] < 300)
                if cut or slow:
                    proxy._count(fault, self.command, self.path)
                self._reply(*answer, fault=fault if cut or slow else None)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (its read timed out): nothing to answer

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
