"""The HTTP edges of the respond stage against real local servers: delivery never follows a redirect
and keeps to its deadline, Retry-After and backoff never give a zero, NaN or overflowing wait, and the
admin endpoints check the request's framing, method and token before reading a body."""

from __future__ import annotations

import argparse
import email.utils
import json
import math
import socket
import time
from typing import Any, Callable, Iterator

import pytest

from monitor.errors import InferWatchError
from monitor.ops.http import HttpServer
from monitor.ops.metrics import Metrics
from monitor.respond import delivery
from monitor.respond.actions.base import Final, Transient
from tests.conftest import http_json
from tests.contract_servers import RecordingServer, ScriptedServer, WebhookServer
from tests.test_respond import APPROVAL, detection, wait_for, write_playbooks

TOKEN = "t0ken-of-the-admins"


@pytest.fixture
def servers() -> Iterator[Callable[..., RecordingServer]]:
    started: list[RecordingServer] = []

    def start(*args: Any, **kwargs: Any) -> RecordingServer:
        started.append(RecordingServer(*args, **kwargs).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()


# ------------------------------------------------------------------ delivery: redirects


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_final_and_nothing_reaches_the_location(status: int,
                                                              servers: Callable[..., RecordingServer]) -> None:
    elsewhere = servers()
    location = f"{elsewhere.base}/collect/s3cr3t-path?token=s3cr3t-query"
    receiver = servers(reply=(status, {"Location": location}, b""))
    with pytest.raises(Final) as refused:
        delivery.post_json(f"{receiver.base}/hook", {"a": 1}, timeout=2,
                           headers={"Authorization": "Bearer s3cr3t-bearer", "X-InferWatch-Signature": "sig"})
    message = str(refused.value)
    assert f"answered {status} redirect to another location; not followed" in message
    assert "s3cr3t" not in message and "/collect" not in message
    assert len(receiver.requests) == 1 and receiver.requests[0]["method"] == "POST"
    assert elsewhere.requests == []


def test_the_admin_client_does_not_carry_its_token_through_a_redirect(servers: Callable[..., RecordingServer],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from monitor.respond.cli import cmd_admin

    elsewhere = servers()
    daemon = servers(reply=(302, {"Location": f"{elsewhere.base}/admin/pending"}, b""))
    monkeypatch.setenv("INFERWATCH_ADMIN_TOKEN", TOKEN)
    args = argparse.Namespace(command="pending", url=daemon.base, token_env="INFERWATCH_ADMIN_TOKEN")
    with pytest.raises(InferWatchError, match="answered 302 redirect to another location; not followed"):
        cmd_admin(args)
    assert daemon.requests[0]["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert elsewhere.requests == []


# ------------------------------------------------------------------ delivery: waits


@pytest.mark.parametrize("value", ["0", "0.0", "-30", "0.001", "Wed, 21 Oct 2015 07:28:00 GMT"])  # a date past
def test_retry_after_never_asks_for_less_than_a_second(value: str) -> None:
    assert delivery.retry_after(value) == 1.0


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_a_non_finite_retry_after_is_ignored_so_the_backoff_decides(value: str) -> None:
    assert delivery.retry_after(value) is None


def test_a_429_with_retry_after_zero_waits_a_second() -> None:
    class Limited(ScriptedServer):
        def contract(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
            return 200, {}, b"{}"

    server = Limited().start()
    server.script = ["429:0", "429:nan"]
    try:
        with pytest.raises(Transient) as zero:
            delivery.post_json(f"{server.base}/hook", {}, timeout=2)
        with pytest.raises(Transient) as nan:
            delivery.post_json(f"{server.base}/hook", {}, timeout=2)
    finally:
        server.stop()
    assert zero.value.retry_after == 1.0
    assert nan.value.retry_after is None  # never NaN: the engine's backoff applies


def test_retry_after_an_http_date_counts_from_now() -> None:
    now = 1_800_000_000.0
    assert delivery.retry_after(email.utils.formatdate(now + 120, usegmt=True), now) == 120.0
    assert delivery.retry_after(email.utils.formatdate(now + 86400, usegmt=True), now) == delivery.MAX_RETRY_AFTER


@pytest.mark.parametrize("attempt", [1100, 10**6])
def test_backoff_of_a_large_attempt_stays_under_the_cap(attempt: int) -> None:
    wait = delivery.backoff(attempt)
    assert math.isfinite(wait) and 0 <= wait <= 600.0


# ------------------------------------------------------------------ delivery: the deadline


@pytest.mark.parametrize("drip", ["headers", "body"])
def test_a_dripping_receiver_is_cut_off_at_the_deadline(drip: str, servers: Callable[..., RecordingServer]) -> None:
    receiver = servers(reply=(200, {"Content-Type": "application/json"}, b" " * 200), drip=drip, interval=0.2)
    started = time.monotonic()
    with pytest.raises(Transient, match="no answer within 1 s"):
        delivery.post_json(f"{receiver.base}/hook", {"a": 1}, timeout=1.0)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.0  # 40 s of drip at 0.2 s per byte; a per-read timeout never fires


def test_a_receiver_answering_in_time_is_delivered() -> None:
    server = WebhookServer().start()
    try:
        answer = delivery.post_json(server.url, {"a": 1}, timeout=2)
    finally:
        server.stop()
    assert answer.status == 200 and answer.json() == {}


# ------------------------------------------------------------------ the HTTP server's framing


@pytest.fixture
def echo() -> Iterator[tuple[HttpServer, list[bytes]]]:
    """A bare server with one request route that records every body its handler reads."""
    bodies: list[bytes] = []
    http = HttpServer("127.0.0.1", 0, Metrics(), lambda: (True, {}), lambda: (True, {}), client_timeout=0.5)

    def handler(method: str, headers: Any, read_body: Callable[[], bytes]) -> Any:
        bodies.append(read_body())
        return 200, "text/plain", b"read\n"

    http.route_any("/echo", handler)
    http.start()
    yield http, bodies
    http.stop()


def raw_request(port: int, head: str, body: bytes = b"", wait: float = 3.0) -> bytes:
    """Send ``head`` (and ``body``) without closing our side; what the server says before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize("length", ["-1", "abc", "+5", "1, 2"])
def test_a_content_length_that_is_not_a_byte_count_is_400(length: str, echo: tuple[HttpServer, list[bytes]]) -> None:
    http, bodies = echo
    started = time.monotonic()
    answer = raw_request(http.port, f"POST /echo HTTP/1.1\nHost: x\nContent-Length: {length}\n\n")
    assert answer.startswith(b"HTTP/1.0 400 "), answer
    assert time.monotonic() - started < 0.4  # answered at once, not after the client timeout
    assert bodies == []


def test_a_body_over_the_limit_is_413_unread(echo: tuple[HttpServer, list[bytes]]) -> None:
    http, bodies = echo
    answer = raw_request(http.port, "POST /echo HTTP/1.1\nHost: x\nContent-Length: 52428800\n\n")
    assert answer.startswith(b"HTTP/1.0 413 ") and bodies == []


def test_a_client_that_stops_sending_is_dropped_after_the_timeout(echo: tuple[HttpServer, list[bytes]]) -> None:
    http, _ = echo
    started = time.monotonic()
    answer = raw_request(http.port, "GET /healthz HTTP/1.1\nHost: x\n")  # the headers never end
    assert answer == b"" and time.monotonic() - started < 2.0


def test_a_body_that_never_arrives_is_408(echo: tuple[HttpServer, list[bytes]]) -> None:
    http, bodies = echo
    answer = raw_request(http.port, "POST /echo HTTP/1.1\nHost: x\nContent-Length: 10\n\n", b"{}")
    assert answer.startswith(b"HTTP/1.0 408 ") and bodies == []


def test_post_to_a_get_route_is_405_with_allow(echo: tuple[HttpServer, list[bytes]]) -> None:
    http, _ = echo
    answer = raw_request(http.port, "POST /metrics HTTP/1.1\nHost: x\nContent-Length: 0\n\n")
    assert answer.startswith(b"HTTP/1.0 405 ") and b"\r\nAllow: GET\r\n" in answer


# ------------------------------------------------------------------ the admin endpoints


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """One respond stage behind the admin endpoints for the module (each stop costs a second of polling)."""
    from monitor.config import Config, Respond, State
    from monitor.respond.stage import RespondStage

    where = tmp_path_factory.mktemp("admin")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("INFERWATCH_ADMIN_TOKEN", TOKEN)
        hook = WebhookServer().start()
        books = write_playbooks(where / "books", APPROVAL.replace("HOOK", hook.url))
        config = Config(respond=Respond(playbooks=str(books)), state=State(dir=str(where / "st")))
        metrics = Metrics()
        stage = RespondStage(config, metrics)
        http = HttpServer("127.0.0.1", 0, metrics, lambda: (True, {}), lambda: (True, {}), client_timeout=0.5)
        stage.admin_routes(http)
        http.start()
        stage.responder.start()
        try:
            yield stage, f"http://127.0.0.1:{http.port}"
        finally:
            http.stop()
            stage.stop()
            hook.stop()


def call(url: str, method: str = "GET", authorization: str | None = f"Bearer {TOKEN}",
         body: dict | None = None) -> tuple[int, dict[str, str], dict]:
    status, answer, headers = http_json(url, method, body, authorization)
    return status, headers, answer


@pytest.mark.parametrize("path, method, allowed", [
    ("/admin/pending", "POST", "GET"), ("/admin/incidents", "POST", "GET"),
    ("/admin/approve", "GET", "POST"), ("/admin/reject", "GET", "POST"), ("/admin/reload", "GET", "POST"),
])
def test_a_wrong_method_is_405_with_allow(admin: tuple[Any, str], path: str, method: str, allowed: str) -> None:
    _, base = admin
    status, headers, _ = call(base + path, method, body={} if method == "POST" else None)
    assert status == 405 and headers["Allow"] == allowed


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_blind(admin: tuple[Any, str], scheme: str) -> None:
    _, base = admin
    status, _, answer = call(f"{base}/admin/pending", authorization=f"{scheme} {TOKEN}")
    assert status == 200 and isinstance(answer["pending"], list)


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
                                           f"Basic {TOKEN}", TOKEN, "Bearer", f"Bearer {TOKEN.upper()}"])
def test_a_wrong_or_missing_token_is_401(admin: tuple[Any, str], authorization: str | None) -> None:
    _, base = admin
    status, headers, answer = call(f"{base}/admin/pending", authorization=authorization)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert TOKEN not in json.dumps(answer)


def test_the_admin_answers_401_before_reading_the_body(admin: tuple[Any, str]) -> None:
    stage, base = admin
    port = int(base.rsplit(":", 1)[1])
    started = time.monotonic()
    # 60000 bytes announced, none sent: an answer at once shows nothing waited for them.
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(b"POST /admin/approve HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n"
                     b"Content-Length: 60000\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}\n"):  # the whole JSON answer, so the server finishes writing it
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 401 ") and time.monotonic() - started < 0.4


@pytest.mark.parametrize("path", ["/admin/approve", "/admin/reject"])
def test_deciding_an_unknown_incident_is_404(admin: tuple[Any, str], path: str) -> None:
    _, base = admin
    status, _, answer = call(base + path, "POST", body={"incident": "no-such-incident", "step": "gate"})
    assert status == 404 and not answer["ok"] and "no-such-incident" in answer["message"]


def test_deciding_an_unknown_step_of_a_real_incident_is_404(admin: tuple[Any, str]) -> None:
    stage, base = admin
    [incident] = stage.responder.handle(detection())
    wait_for(lambda: stage.journal.step(incident, "gate")["state"] == "awaiting_approval", what="gate")
    status, _, answer = call(f"{base}/admin/approve", "POST", body={"incident": incident, "step": "no-such-step"})
    assert status == 404 and "no-such-step" in answer["message"]
    assert stage.journal.step(incident, "gate")["state"] == "awaiting_approval"
