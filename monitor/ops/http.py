"""The HTTP endpoints: /metrics (Prometheus text format), /healthz (the process is alive and its loop
turns) and /readyz (it reaches the broker and consumes). Other parts add routes with ``route`` (GET, no
body) and ``route_any`` (the handler sees the method and the headers, and reads the body only when it
wants it: the admin endpoints authenticate first, so an anonymous client cannot make it read anything).

The request's framing is checked before any handler runs: a Content-Length that is not a number is a
400, one over ``MAX_BODY`` a 413. Every connection has a socket timeout, so a client that stops sending
gives its thread back.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Union

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from monitor.errors import InferWatchError
from monitor.ops.metrics import Metrics

log = logging.getLogger("inferwatch.http")

# Status, content type, body, and optionally headers to add (Allow on a 405, WWW-Authenticate on a 401).
Response = Union[tuple[int, str, bytes], tuple[int, str, bytes, dict[str, str]]]
Handler = Callable[[], Response]
# A handler that sees the request: method, headers, and a callable returning the body (read on first call).
RequestHandler = Callable[[str, Any, Callable[[], bytes]], Response]
# A handler of every path under a prefix: as RequestHandler, and the rest of the path after the prefix.
PrefixHandler = Callable[[str, Any, Callable[[], bytes], str], Response]
MAX_BODY = 65536
CLIENT_TIMEOUT = 10.0  # seconds one socket read or write of a connection may take


def json_response(status: int, body: object, headers: dict[str, str] | None = None) -> Response:
    payload = json.dumps(body, sort_keys=True, default=str).encode() + b"\n"
    if headers:
        return status, "application/json", payload, headers
    return status, "application/json", payload


class HttpServer:
    def __init__(self, host: str, port: int, metrics: Metrics,
                 healthy: Callable[[], tuple[bool, dict]], ready: Callable[[], tuple[bool, dict]],
                 client_timeout: float = CLIENT_TIMEOUT):
        self.routes: dict[str, Handler] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)),
            "/healthz": lambda: _probe(healthy),
            "/readyz": lambda: _probe(ready),
        }
        self.request_routes: dict[str, RequestHandler] = {}
        routes, request_routes = self.routes, self.request_routes
        self.prefix_routes: dict[str, PrefixHandler] = {}
        prefix_routes = self.prefix_routes

        class _Handler(BaseHTTPRequestHandler):
            server_version = "inferwatch"
            timeout = client_timeout  # StreamRequestHandler sets it on the connection's socket

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._answer("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._answer("POST")

            def _answer(self, method: str) -> None:
                path = self.path.split("?", 1)[0]
                body = _Body(self.rfile)
                try:
                    if path in request_routes:
                        framing = body.frame(self.headers)
                        if framing is not None:
                            self.close_connection = True
                            answer = framing
                        else:
                            answer = request_routes[path](method, self.headers, body.read)
                    elif path in routes:
                        answer = routes[path]() if method == "GET" else json_response(
                            405, {"error": f"{path} answers GET only"}, {"Allow": "GET"})
                    elif prefix := next((p for p in prefix_routes if path.startswith(p) and path != p), None):
                        framing = body.frame(self.headers)
                        if framing is not None:
                            self.close_connection = True
                            answer = framing
                        else:
                            answer = prefix_routes[prefix](method, self.headers, body.read, path[len(prefix):])
                    else:
                        answer = json_response(404, {"error": "not found",
                                                     "paths": sorted([*routes, *request_routes])})
                except TimeoutError:
                    self.close_connection = True
                    answer = json_response(408, {"error": "the request was not received in time"})
                except Exception:
                    log.exception("HTTP handler for %s failed", path)
                    self.close_connection = True
                    answer = json_response(500, {"error": "internal error"})
                status, ctype, payload, *rest = answer
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in (rest[0] if rest else {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                    self.wfile.flush()
                except OSError as exc:  # the client hung up or stalled: its loss, not a bug here
                    log.debug("%s left before the answer to %s %s (%s)", self.address_string(), method, path,
                              type(exc).__name__)
                    self.close_connection = True
                    return
                body.discard()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                log.debug("%s %s", self.address_string(), format % args)

        try:
            self.server = ThreadingHTTPServer((host, port), _Handler)
        except OSError as exc:
            raise InferWatchError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror}") from None
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    def route_any(self, path: str, handler: RequestHandler) -> None:
        """A route whose handler sees the method and the headers (GET and POST), and is given a callable
        that reads the body: call it after authenticating, never before."""
        self.request_routes[path] = handler

    def route_prefix(self, prefix: str, handler: PrefixHandler) -> None:
        """A route for every path under ``prefix`` (``/api/models/`` answers ``/api/models/fraud``), its
        handler given the rest of the path as well; exact routes come first."""
        self.prefix_routes[prefix] = handler

    def start(self) -> "HttpServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Body:
    """The request body, read only when the handler asks for it, and at most once."""

    def __init__(self, rfile: Any):
        self.rfile = rfile
        self.length = 0
        self.framed = False
        self.data: bytes | None = None

    def frame(self, headers: Any) -> Response | None:
        """A 400 or 413 when the Content-Length cannot be honoured; None when the body can be read."""
        values = {value.strip() for value in headers.get_all("Content-Length") or []}
        if len(values) > 1:
            return json_response(400, {"error": "conflicting Content-Length headers"})
        value = values.pop() if values else "0"
        # RFC 9110: 1*DIGIT. int() would take "-1" (read to EOF), "+5", " 5" or "٥".
        if not (value.isascii() and value.isdigit()):
            return json_response(400, {"error": "Content-Length is not a number of bytes"})
        if int(value) > MAX_BODY:
            return json_response(413, {"error": f"request body too large (at most {MAX_BODY} bytes)"})
        self.length, self.framed = int(value), True
        return None

    def read(self) -> bytes:
        if self.data is None:
            self.data = self.rfile.read(self.length)
        return self.data

    def discard(self) -> None:
        """After the answer, read what the handler left (at most MAX_BODY bytes, under the socket
        timeout): closing a socket with unread data makes the kernel send a reset, and the client may
        lose the answer to it."""
        if self.framed and self.data is None and self.length:
            self.data = b""
            try:
                self.rfile.read(self.length)
            except OSError:
                pass


def _probe(check: Callable[[], tuple[bool, dict]]) -> Response:
    ok, details = check()
    return json_response(200 if ok else 503, {"ok": ok, **details})
