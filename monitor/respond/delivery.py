"""HTTP delivery shared by every notifying action, and the one retry policy of the respond stage.

``post_json`` sends a JSON body and classifies the answer the way Alertmanager's notifiers do:
2xx is delivered; 429 and 5xx, timeouts and refused connections are ``Transient`` (``Retry-After``
honoured when the receiver sends it); any other 4xx is ``Final`` (the payload or the credentials are
wrong, and repeating it cannot help). A 3xx is ``Final`` too and never followed: urllib would turn
the POST into a GET to the new location, carry the Authorization and signature headers there
(possibly to another host) and count that GET's 200 as delivered. Messages name the receiver by
scheme and host only: a Slack webhook URL or a token in a query string is a secret, and so may be a
redirect's Location.

The ``timeout`` bounds the whole request, not each socket read: a receiver dripping its answer one
byte at a time would otherwise hold the single outbox thread for as long as it likes.

``backoff`` is the wait before retry ``attempt``: exponential with full jitter, capped.
"""

from __future__ import annotations

import email.utils
import http.client
import io
import json
import math
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import timezone
from typing import Any

from monitor.respond.actions.base import Final, Transient

USER_AGENT = "inferwatch/0.1"
MAX_RETRY_AFTER = 3600.0  # a receiver asking for more than an hour is asked again in an hour
MIN_RETRY_AFTER = 1.0  # "Retry-After: 0" (or a date already past) once made the outbox send 347 POSTs in 2 s
MAX_ANSWER = 65536  # bytes of a 2xx answer kept; the actions read a status or a dedup key from it


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def receiver(url: str) -> str:
    """What messages may say of a URL: scheme and host, never its path, query or credentials."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), between 1 s and an hour;
    None when absent or unreadable (``nan`` and ``inf`` included: the caller's backoff decides then).

    >>> retry_after("0"), retry_after("7"), retry_after("nan"), retry_after("86400")
    (1.0, 7.0, None, 3600.0)
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if moment.tzinfo is None:  # "-0000" and missing zones: HTTP dates are GMT
            moment = moment.replace(tzinfo=timezone.utc)
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, MIN_RETRY_AFTER), MAX_RETRY_AFTER)


class RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Turns every redirect into the 3xx HTTPError it is, so nothing is re-sent to the Location."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


def post_json(url: str, body: Any, *, timeout: float, headers: dict[str, str] | None = None,
              what: str = "receiver", raw: bytes | None = None) -> Response:
    """POST ``body`` as JSON (or ``raw`` bytes) within ``timeout`` seconds in all; the Response on 2xx,
    else Transient or Final."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": USER_AGENT, **(headers or {})})
    where = f"{what} at {receiver(url)}"
    late = f"{where}: no answer within {timeout:g} s"
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(RefuseRedirects, _DeadlineHTTPHandler(deadline),
                                         _DeadlineHTTPSHandler(deadline))
    try:
        with opener.open(request, timeout=timeout) as answer:
            return Response(answer.status, dict(answer.headers.items()),
                            answer.read(MAX_ANSWER).decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        status = exc.code
        if 300 <= status < 400:
            exc.close()
            # Never the Location: it may carry the same kind of secret as the URL itself.
            raise Final(f"{where}: answered {status} redirect to another location; not followed") from None
        hint = _short(_error_text(exc))
        wait = retry_after(exc.headers.get("Retry-After")) if exc.headers else None
        if status == 429:
            raise Transient(f"{where}: 429 too many requests{hint}", retry_after=wait) from None
        if status >= 500:
            raise Transient(f"{where}: {status}{hint}", retry_after=wait) from None
        raise Final(f"{where}: {status} (not retried){hint}") from None
    except (socket.timeout, TimeoutError):
        raise Transient(late) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise Transient(late) from None
        raise Transient(f"{where}: cannot connect ({type(reason).__name__}: {_reason(reason)})") from None
    except (ConnectionError, OSError) as exc:
        raise Transient(f"{where}: connection failed ({type(exc).__name__})") from None
    except http.client.HTTPException as exc:  # a malformed or cut-off answer (IncompleteRead, bad status line)
        raise Transient(f"{where}: unreadable answer ({type(exc).__name__})") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    # The error's body is read under the same deadline; a receiver that stalls here has still answered.
    try:
        return exc.read(2048).decode("utf-8", "replace") if exc.fp else ""
    except (OSError, http.client.HTTPException):
        return ""
    finally:
        exc.close()


def _reason(reason: Any) -> str:
    # URLError reasons are socket errors ("[Errno 111] Connection refused"); they do not carry the URL.
    return getattr(reason, "strerror", None) or str(reason)[:200]


def _short(text: str) -> str:
    text = " ".join(text.split())[:200]
    return f": {text}" if text else ""


# ------------------------------------------------------------ the request's deadline
#
# A socket timeout bounds one operation, so each phase is given what remains of the deadline: the
# TCP connect, the TLS handshake (one call: CPython's ssl bounds it as a whole), sending the request
# (sendall is bounded as a whole since 3.5) and every single recv of the status line, the headers and
# the body, which all go through the response's file object. DNS resolution (getaddrinfo) takes no
# timeout and is not bounded.


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the request's deadline passed")
    return left


class _DeadlineReader(io.RawIOBase):
    """The socket's raw reader, each recv bounded by what remains of the deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # counts as a reference: the connection may close first
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(_remaining(self._deadline))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """What HTTPResponse sees of the socket: it only asks for a file to read from."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args: Any, deadline: float, **kwargs: Any):
        super().__init__(_DeadlineSocket(sock, deadline), *args, **kwargs)


class _DeadlineConnection:
    """Mixed into HTTPConnection and HTTPSConnection: connect, send and read within the deadline."""

    def __init__(self, *args: Any, deadline: float, **kwargs: Any):
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._deadline = deadline
        self.response_class = lambda sock, *a, **k: _DeadlineResponse(sock, *a, deadline=deadline, **k)
        self._create_connection = self._connect_in_time

    def _connect_in_time(self, address: Any, timeout: Any = None, source_address: Any = None) -> socket.socket:
        sock = socket.create_connection(address, _remaining(self._deadline), source_address)
        sock.settimeout(_remaining(self._deadline))  # what the TLS handshake, if any, may take
        return sock

    def send(self, data: Any) -> None:
        sock = getattr(self, "sock", None)
        if sock is not None:
            sock.settimeout(_remaining(self._deadline))
        super().send(data)  # type: ignore[misc]


class _DeadlineHTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: float):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: Any) -> Any:
        return self.do_open(_DeadlineHTTPConnection, req, deadline=self.deadline)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: float):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: Any) -> Any:
        return self.do_open(_DeadlineHTTPSConnection, req, context=self._context, deadline=self.deadline)


def backoff(attempt: int, *, base: float = 2.0, cap: float = 600.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (1 for the first retry): full jitter on base * 2^(attempt-1).

    The exponent stops at 30 (base * 2^30 is far past any cap): 2.0 ** 1100 overflows a float.

    >>> backoff(1, rng=random.Random(0)) <= 2.0
    True
    >>> backoff(30, rng=random.Random(0)) <= 600.0
    True
    >>> backoff(1100, rng=random.Random(0)) <= 600.0
    True
    """
    rng = rng or random
    exponent = min(max(attempt, 1), 31) - 1
    return rng.uniform(0, min(cap, base * 2 ** exponent))
