"""The HTTP endpoints: /metrics (Prometheus text format), /healthz (the process is alive and its loop
turns) and /readyz (it reaches the broker and consumes). Other parts add routes with ``route``.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from monitor.errors import InferWatchError
from monitor.ops.metrics import Metrics

log = logging.getLogger("inferwatch.http")

Response = tuple[int, str, bytes]
Handler = Callable[[], Response]
# A handler that sees the request: method, headers, body (the admin endpoints).
RequestHandler = Callable[[str, Any, bytes], Response]
MAX_BODY = 65536


def json_response(status: int, body: object) -> Response:
    return status, "application/json", json.dumps(body, sort_keys=True, default=str).encode() + b"\n"


class HttpServer:
    def __init__(self, host: str, port: int, metrics: Metrics,
                 healthy: Callable[[], tuple[bool, dict]], ready: Callable[[], tuple[bool, dict]]):
        self.routes: dict[str, Handler] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)),
            "/healthz": lambda: _probe(healthy),
            "/readyz": lambda: _probe(ready),
        }
        self.request_routes: dict[str, RequestHandler] = {}
        routes, request_routes = self.routes, self.request_routes

        class _Handler(BaseHTTPRequestHandler):
            server_version = "inferwatch"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._answer("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._answer("POST")

            def _answer(self, method: str) -> None:
                path = self.path.split("?", 1)[0]
                try:
                    if path in request_routes:
                        length = int(self.headers.get("Content-Length") or 0)
                        if length > MAX_BODY:
                            status, ctype, body = json_response(413, {"error": "request body too large"})
                        else:
                            status, ctype, body = request_routes[path](method, self.headers, self.rfile.read(length))
                    elif path in routes and method == "GET":
                        status, ctype, body = routes[path]()
                    else:
                        status, ctype, body = json_response(
                            404, {"error": "not found", "paths": sorted([*routes, *request_routes])})
                except Exception:
                    log.exception("HTTP handler for %s failed", path)
                    status, ctype, body = json_response(500, {"error": "internal error"})
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

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
        """A route whose handler sees the method, the headers and the body (GET and POST)."""
        self.request_routes[path] = handler

    def start(self) -> "HttpServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _probe(check: Callable[[], tuple[bool, dict]]) -> Response:
    ok, details = check()
    return json_response(200 if ok else 503, {"ok": ok, **details})
