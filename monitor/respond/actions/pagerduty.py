"""``pagerduty``: PagerDuty Events API v2, ``trigger`` when the step runs and ``resolve`` when the
incident closes, both with the incident's id as ``dedup_key`` so PagerDuty keeps one alert per
incident however often a retry repeats the call.

The API answers 202 with ``{"status": "success", "dedup_key": ...}``; 400 (invalid event) is final;
429 and 5xx are retried. The routing key is a secret: it is never in a message.
Severity: the detection's ``info``/``warning``/``critical`` map to PagerDuty's same names (PagerDuty
also has ``error``, reachable through ``severity:``). The detection goes into ``custom_details``.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from monitor.respond import delivery
from monitor.respond.actions.base import Action, Incident, Params, Services, is_url

EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
_SEVERITY = {"info": "info", "warning": "warning", "critical": "critical"}


class PagerDutyParams(Params):
    routing_key: str  # the integration key of an Events API v2 integration; use ${PD_ROUTING_KEY}
    url: str = EVENTS_URL
    severity: Literal["critical", "error", "warning", "info"] | None = None  # default: the detection's
    summary: str | None = None  # default: the detection's summary (PagerDuty keeps 1,024 characters)
    source: str | None = None  # default: the model
    component: str | None = None
    group: str | None = None
    class_: str | None = msgspec.field(name="class", default=None)  # default: the detection's kind
    custom_details: dict[str, Any] | None = None  # added to the detection's fields
    resolve: bool = True


class PagerDuty(Action):
    name = "pagerduty"
    Params = PagerDutyParams
    notifies = True

    def check(self, params: PagerDutyParams) -> None:
        if not is_url(params.url):
            raise ValueError("url: expected an http(s) URL")

    def run(self, params: PagerDutyParams, incident: Incident, services: Services) -> dict[str, Any]:
        detection = incident.detection
        summary = params.summary or detection.get("summary") or f"{detection.get('kind')} on {detection.get('model')}"
        payload: dict[str, Any] = {
            "summary": summary[:1024],
            "source": params.source or str(detection.get("model")),
            "severity": params.severity or _SEVERITY.get(str(detection.get("severity")), "warning"),
            "custom_details": {**{k: detection.get(k) for k in (
                "detector", "kind", "model", "model_version", "client_id", "score", "threshold", "evidence",
                "atlas", "owasp", "detection_id")}, "incident": incident.id, "playbook": incident.playbook,
                **(params.custom_details or {})},
        }
        for name in ("component", "group"):
            if getattr(params, name):
                payload[name] = getattr(params, name)
        if params.class_:
            payload["class"] = params.class_
        else:
            payload["class"] = str(detection.get("kind"))
        event = {"routing_key": params.routing_key, "event_action": "trigger", "dedup_key": incident.id,
                 "payload": payload, "client": "InferWatch"}
        return self._send(params, event, services)

    def resolve(self, params: PagerDutyParams, incident: Incident, services: Services) -> dict[str, Any] | None:
        if not params.resolve:
            return None
        event = {"routing_key": params.routing_key, "event_action": "resolve", "dedup_key": incident.id}
        return self._send(params, event, services)

    def _send(self, params: PagerDutyParams, event: dict[str, Any], services: Services) -> dict[str, Any]:
        answer = delivery.post_json(params.url, event, timeout=services.http_timeout, what="PagerDuty Events API")
        try:
            body = answer.json()
        except ValueError:
            body = {}
        return {"status": answer.status, "dedup_key": body.get("dedup_key", event["dedup_key"]),
                "event_action": event["event_action"]}
