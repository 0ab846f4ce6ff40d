"""``webhook``: a JSON POST to any HTTP endpoint, signed with HMAC-SHA256 when a secret is given.

The body defaults to ``{"status": "firing", "incident": {...}, "detection": {...}}`` (``resolved``
when the incident closes). With ``secret``, two headers let the receiver check origin and freshness:
``X-InferWatch-Timestamp`` (epoch seconds) and ``X-InferWatch-Signature: sha256=<hex>``, the
HMAC-SHA256 with the secret of ``<timestamp>.<body bytes>`` (the scheme of Stripe's and Slack's own
signatures: a receiver rejects an old timestamp, so a captured request cannot be replayed later).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from monitor.respond import delivery
from monitor.respond.actions.base import Action, Incident, Params, Services, is_url

SIGNATURE_HEADER = "X-InferWatch-Signature"
TIMESTAMP_HEADER = "X-InferWatch-Timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value.

    >>> sign("s3cret", "1700000000", b'{"a":1}')[:14]
    'sha256=1698a50'
    """
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class WebhookParams(Params):
    url: str
    body: dict[str, Any] | None = None  # templates allowed in its strings; default: incident and detection
    secret: str | None = None  # HMAC key; use ${WEBHOOK_SECRET}
    headers: dict[str, str] | None = None  # e.g. {Authorization: "Bearer ${TOKEN}"}
    resolve: bool = True


class Webhook(Action):
    name = "webhook"
    Params = WebhookParams
    notifies = True

    def check(self, params: WebhookParams) -> None:
        if not is_url(params.url):
            raise ValueError("url: expected an http(s) URL")

    def _send(self, params: WebhookParams, body: dict[str, Any], services: Services) -> dict[str, Any]:
        raw = json.dumps(body, sort_keys=True, default=str).encode()
        headers = dict(params.headers or {})
        if params.secret:
            timestamp = str(int(services.now()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(params.secret, timestamp, raw)
        answer = delivery.post_json(params.url, None, raw=raw, headers=headers, timeout=services.http_timeout,
                                    what="webhook")
        return {"status": answer.status, "signed": bool(params.secret)}

    def _default(self, incident: Incident, status: str) -> dict[str, Any]:
        return {"status": status,
                "incident": {"id": incident.id, "playbook": incident.playbook, "key": incident.key,
                             "opened_at": incident.opened_at, "detections": incident.detections},
                "detection": incident.detection}

    def run(self, params: WebhookParams, incident: Incident, services: Services) -> dict[str, Any]:
        return self._send(params, params.body or self._default(incident, "firing"), services)

    def resolve(self, params: WebhookParams, incident: Incident, services: Services) -> dict[str, Any] | None:
        if not params.resolve:
            return None
        body = self._default(incident, "resolved") if params.body is None else {**params.body, "status": "resolved"}
        return self._send(params, body, services)
