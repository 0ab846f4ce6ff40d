"""HTTP delivery shared by every notifying action, and the one retry policy of the respond stage.

``post_json`` sends a JSON body and classifies the answer the way Alertmanager's notifiers do:
2xx is delivered; 429 and 5xx, timeouts and refused connections are ``Transient`` (``Retry-After``
honoured when the receiver sends it); any other 4xx is ``Final`` (the payload or the credentials are
wrong, and repeating it cannot help). Messages name the receiver by scheme and host only: a Slack
webhook URL or a token in a query string is a secret.

``backoff`` is the wait before retry ``attempt``: exponential with full jitter, capped.
"""

from __future__ import annotations

import email.utils
import json
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from monitor.respond.actions.base import Final, Transient

USER_AGENT = "inferwatch/0.1"
MAX_RETRY_AFTER = 3600.0  # a receiver asking for more than an hour is asked again in an hour


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
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return min(max(when - (time.time() if now is None else now), 0.0), MAX_RETRY_AFTER)


def post_json(url: str, body: Any, *, timeout: float, headers: dict[str, str] | None = None,
              what: str = "receiver", raw: bytes | None = None) -> Response:
    """POST ``body`` as JSON (or ``raw`` bytes); the Response on 2xx, else Transient or Final."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": USER_AGENT, **(headers or {})})
    where = f"{what} at {receiver(url)}"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return Response(answer.status, dict(answer.headers.items()), answer.read(65536).decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        text = exc.read(2048).decode("utf-8", "replace") if exc.fp else ""
        status = exc.code
        hint = _short(text)
        if status == 429:
            wait = retry_after(exc.headers.get("Retry-After"))
            raise Transient(f"{where}: 429 too many requests{hint}", retry_after=wait) from None
        if status >= 500:
            raise Transient(f"{where}: {status}{hint}", retry_after=retry_after(exc.headers.get("Retry-After"))) from None
        raise Final(f"{where}: {status} (not retried){hint}") from None
    except (socket.timeout, TimeoutError):
        raise Transient(f"{where}: no answer within {timeout:g} s") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise Transient(f"{where}: no answer within {timeout:g} s") from None
        raise Transient(f"{where}: cannot connect ({type(reason).__name__}: {_reason(reason)})") from None
    except (ConnectionError, OSError) as exc:
        raise Transient(f"{where}: connection failed ({type(exc).__name__})") from None


def _reason(reason: Any) -> str:
    # URLError reasons are socket errors ("[Errno 111] Connection refused"); they do not carry the URL.
    return getattr(reason, "strerror", None) or str(reason)[:200]


def _short(text: str) -> str:
    text = " ".join(text.split())[:200]
    return f": {text}" if text else ""


def backoff(attempt: int, *, base: float = 2.0, cap: float = 600.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (1 for the first retry): full jitter on base * 2^(attempt-1).

    >>> backoff(1, rng=random.Random(0)) <= 2.0
    True
    >>> backoff(30, rng=random.Random(0)) <= 600.0
    True
    """
    rng = rng or random
    return rng.uniform(0, min(cap, base * 2 ** (attempt - 1)))
