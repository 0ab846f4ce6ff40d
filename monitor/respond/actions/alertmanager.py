"""``alertmanager``: an alert posted to Alertmanager's ``/api/v2/alerts``, resolved by posting it
again with ``endsAt`` set to now.

Alertmanager considers an alert resolved once its ``endsAt`` passes, and gives one without
``endsAt`` only its ``resolve_timeout`` (5 minutes by default). Prometheus re-sends firing alerts to
keep them alive; here ``endsAt`` is set ``ttl`` (default 24 h) ahead and the alert is sent again
(``refresh``) once less than half the ttl is left while the incident is open; the all-clear sets
``endsAt`` to now. Labels identify the alert (Alertmanager's fingerprint): the
incident id is one, so a retry or the all-clear addresses the same alert.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from monitor.config import parse_duration
from monitor.respond import delivery
from monitor.respond.actions.base import Action, Incident, Params, Services, is_url


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AlertmanagerParams(Params):
    url: str  # Alertmanager's base URL, e.g. http://alertmanager.monitoring:9093
    alertname: str = "InferWatchIncident"
    labels: dict[str, str] | None = None  # added to alertname, incident, playbook, model, kind, severity, client_id
    annotations: dict[str, str] | None = None  # added to summary and description
    ttl: str = "24h"
    resolve: bool = True


class Alertmanager(Action):
    name = "alertmanager"
    Params = AlertmanagerParams
    notifies = True

    def check(self, params: AlertmanagerParams) -> None:
        if not is_url(params.url):
            raise ValueError("url: expected Alertmanager's http(s) base URL")
        if "{{" not in params.ttl:
            parse_duration(params.ttl)

    def _alert(self, params: AlertmanagerParams, incident: Incident, ends_at: float) -> dict[str, Any]:
        detection = incident.detection
        labels = {"alertname": params.alertname, "incident": incident.id, "playbook": incident.playbook,
                  "model": str(detection.get("model")), "kind": str(detection.get("kind")),
                  "severity": str(detection.get("severity"))}
        if detection.get("client_id"):
            labels["client_id"] = str(detection["client_id"])
        labels.update(params.labels or {})
        annotations = {"summary": str(detection.get("summary") or ""),
                       "description": f"{detection.get('detector')} detection {detection.get('detection_id')}"
                                      f" (score {detection.get('score')}, threshold {detection.get('threshold')})"}
        annotations.update(params.annotations or {})
        return {"labels": labels, "annotations": annotations, "startsAt": _rfc3339(incident.opened_at),
                "endsAt": _rfc3339(ends_at)}

    def _post(self, params: AlertmanagerParams, alert: dict[str, Any], services: Services) -> dict[str, Any]:
        url = params.url.rstrip("/") + "/api/v2/alerts"
        answer = delivery.post_json(url, [alert], timeout=services.http_timeout, what="Alertmanager")
        return {"status": answer.status, "endsAt": alert["endsAt"]}

    def run(self, params: AlertmanagerParams, incident: Incident, services: Services) -> dict[str, Any]:
        now = services.now() if services.now else time.time()
        return self._post(params, self._alert(params, incident, now + parse_duration(params.ttl)), services)

    def refresh(self, params: AlertmanagerParams, incident: Incident, services: Services,
                detail: dict[str, Any]) -> dict[str, Any] | None:
        ttl = parse_duration(params.ttl)
        try:
            ends = datetime.fromisoformat(str(detail.get("endsAt")).replace("Z", "+00:00")).timestamp()
        except ValueError:
            ends = 0.0
        if ends - services.now() > ttl / 2:
            return None
        return self.run(params, incident, services)

    def resolve(self, params: AlertmanagerParams, incident: Incident, services: Services) -> dict[str, Any] | None:
        if not params.resolve:
            return None
        return self._post(params, self._alert(params, incident, services.now()), services)
