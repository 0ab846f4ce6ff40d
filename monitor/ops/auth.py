"""The bearer-token check of the authenticated endpoints (/admin/* of the respond stage, /api/* of the
operator surface): one token, from the environment variable ``respond.admin_token_env``.

Tokens are compared as HMAC-SHA256 digests under a key drawn at start: compare_digest on equal
lengths, so neither the time taken nor an early exit tells how long the token is. The variable is read
on every request, so a rotated Secret takes effect without a restart.
"""

from __future__ import annotations

import hmac
import os
from typing import Any, Callable

from monitor.ops.http import Response, json_response


def bearer_guard(token_env: str) -> Callable[[Any], Response | None]:
    """A check of a request's headers: None when it carries the token, else the answer to give (503
    while no token is configured, 401 for a missing or wrong one)."""
    key = os.urandom(32)

    def digest(text: str) -> bytes:
        return hmac.new(key, text.encode("utf-8", "surrogateescape"), "sha256").digest()

    def authorized(headers: Any) -> Response | None:
        token = os.environ.get(token_env, "")
        if not token:
            return json_response(503, {"error": f"the admin API is off: set {token_env} to a secret token"})
        scheme, _, given = headers.get("Authorization", "").strip().partition(" ")
        # The scheme is case-blind (RFC 9110 §11.1); the token is not.
        matches = hmac.compare_digest(digest(given.strip()), digest(token))
        if scheme.lower() != "bearer" or not matches:
            return json_response(401, {"error": "missing or wrong bearer token"},
                                 {"WWW-Authenticate": 'Bearer realm="inferwatch-admin"'})
        return None

    return authorized


def only(allowed: str, method: str) -> Response | None:
    """A 405 naming the allowed method, or None when ``method`` is it."""
    if method != allowed:
        return json_response(405, {"error": f"use {allowed}"}, {"Allow": allowed})
    return None
