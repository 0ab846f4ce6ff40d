"""Local HTTP servers that enforce the receivers' contracts, for the respond stage's tests.

- ``PagerDutyServer``: Events API v2 at ``/v2/enqueue``: checks the event (routing_key of 32
  characters, event_action trigger/acknowledge/resolve, dedup_key, payload summary/source/severity on
  trigger, severity one of critical/error/warning/info) and answers 202 ``{"status": "success",
  "message": "Event processed", "dedup_key": ...}``, or 400 ``{"status": "invalid event", ...}``.
- ``SlackServer``: an incoming webhook at ``/services/T000/B000/<secret>``: JSON with ``text`` or
  ``blocks``; 200 ``ok``, 400 ``invalid_payload``, 403 ``invalid_token`` on another path, 404
  ``no_service``.
- ``ScriptedServer`` behaviour shared by both: ``script`` is a list of what the next requests meet
  (``"429:3"`` = 429 with Retry-After 3, ``"500"``, ``"hang:2"`` = answer after 2 s, ``"ok"`` = the
  contract's own answer); every request is recorded with its arrival time.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ScriptedServer:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[str] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with outer._lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers.items()), "body": body,
                                           "at": time.time()})
                    step = outer.script.pop(0) if outer.script else "ok"
                status, headers, payload = outer._scripted(step, self.path, body)
                if status is None:
                    return
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "ScriptedServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def bodies(self) -> list[Any]:
        return [json.loads(r["body"]) for r in self.requests]

    def _scripted(self, step: str, path: str, body: bytes) -> tuple[int | None, dict[str, str], bytes]:
        name, _, arg = step.partition(":")
        if name == "429":
            return 429, {"Retry-After": arg or "1", "Content-Type": "text/plain"}, b"rate_limited"
        if name in ("500", "502", "503"):
            return int(name), {"Content-Type": "text/plain"}, b"internal error"
        if name == "hang":
            time.sleep(float(arg or 5))
            return self.contract(path, body)
        return self.contract(path, body)

    def contract(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError


class PagerDutyServer(ScriptedServer):
    SEVERITIES = ("critical", "error", "warning", "info")

    @property
    def url(self) -> str:
        return f"{self.base}/v2/enqueue"

    def contract(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        def invalid(*errors: str) -> tuple[int, dict[str, str], bytes]:
            return 400, {"Content-Type": "application/json"}, json.dumps(
                {"status": "invalid event", "message": "Event object is invalid", "errors": list(errors)}).encode()

        if path != "/v2/enqueue":
            return 404, {}, b""
        try:
            event = json.loads(body)
        except ValueError:
            return invalid("Event object is not valid JSON")
        if not isinstance(event.get("routing_key"), str) or len(event["routing_key"]) != 32:
            return invalid("'routing_key' is invalid")
        action = event.get("event_action")
        if action not in ("trigger", "acknowledge", "resolve"):
            return invalid("'event_action' is invalid")
        if action != "trigger" and not event.get("dedup_key"):
            return invalid("'dedup_key' is required for acknowledge and resolve")
        if action == "trigger":
            payload = event.get("payload") or {}
            for field in ("summary", "source", "severity"):
                if not payload.get(field):
                    return invalid(f"'payload.{field}' is missing or blank")
            if payload["severity"] not in self.SEVERITIES:
                return invalid("'payload.severity' is invalid")
            if len(payload["summary"]) > 1024:
                return invalid("'payload.summary' is too long")
        answer = {"status": "success", "message": "Event processed", "dedup_key": event.get("dedup_key") or "generated"}
        return 202, {"Content-Type": "application/json"}, json.dumps(answer).encode()


class SlackServer(ScriptedServer):
    SECRET = "XXXXsecretXXXXslackXXXX"

    @property
    def url(self) -> str:
        return f"{self.base}/services/T000/B000/{self.SECRET}"

    def contract(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        text = {"Content-Type": "text/html"}
        if not path.startswith("/services/"):
            return 404, text, b"no_service"
        if path != f"/services/T000/B000/{self.SECRET}":
            return 403, text, b"invalid_token"
        try:
            message = json.loads(body)
        except ValueError:
            return 400, text, b"invalid_payload"
        if not isinstance(message, dict) or not (message.get("text") or message.get("blocks")):
            return 400, text, b"no_text"
        if "blocks" in message and not isinstance(message["blocks"], list):
            return 400, text, b"invalid_blocks"
        return 200, text, b"ok"


class WebhookServer(ScriptedServer):
    """Any JSON receiver: 200 ``{}`` on ``/hook``, 404 elsewhere."""

    @property
    def url(self) -> str:
        return f"{self.base}/hook"

    def contract(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if path != "/hook":
            return 404, {}, b""
        try:
            json.loads(body)
        except ValueError:
            return 400, {}, b"not json"
        return 200, {"Content-Type": "application/json"}, b"{}"


class RecordingServer:
    """Any method on any path: records the request, then answers ``reply`` (status, headers, body) or,
    with ``drip`` set to "headers" or "body", sends that part one byte every ``interval`` seconds
    until ``stop`` (a receiver that answers, but slowly enough to hold a per-read timeout forever).
    A redirect's Location target is one of these that must receive nothing."""

    def __init__(self, reply: tuple[int, dict[str, str], bytes] = (200, {}, b"{}"), drip: str = "",
                 interval: float = 0.2) -> None:
        self.requests: list[dict[str, Any]] = []
        self.reply, self.drip, self.interval = reply, drip, interval
        self.stopping = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                outer.requests.append({"method": self.command, "path": self.path,
                                       "headers": dict(self.headers.items()), "body": self.rfile.read(length)})
                status, headers, body = outer.reply
                head = f"HTTP/1.1 {status} Whatever\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                try:
                    if outer.drip == "headers":
                        outer._drip(self.wfile, head.encode() + body)
                    elif outer.drip == "body":
                        self.wfile.write(head.encode())
                        self.wfile.flush()
                        outer._drip(self.wfile, body)
                    else:
                        self.wfile.write(head.encode() + body)
                except OSError:
                    pass  # the client gave up, as it should
                self.close_connection = True

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _any  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _drip(self, out: Any, data: bytes) -> None:
        for i in range(len(data)):
            if self.stopping.wait(self.interval):
                return
            out.write(data[i:i + 1])
            out.flush()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "RecordingServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
