"""``slack``: a message to a Slack incoming webhook (``text`` and optional Block Kit ``blocks``).

Slack answers 200 with the body ``ok``; 400 ``invalid_payload``, 403 ``invalid_token``, 404
``no_service``, 410 ``channel_is_archived`` are final; 429 comes with ``Retry-After``. What templates
insert into ``text`` and ``blocks`` is escaped (``&``, ``<``, ``>``), so a client id such as
``<!channel>`` or ``<https://evil|click>`` shows as text and neither pings nor links. The webhook URL
is a secret: messages name the host only.
"""

from __future__ import annotations

from typing import Any

from monitor.respond import delivery
from monitor.respond.actions.base import Action, Final, Incident, Params, Services, is_url


def slack_escape(text: str) -> str:
    """Slack's three control characters as entities (api.slack.com, "Escaping text").

    >>> slack_escape("<!channel> & <https://x|y>")
    '&lt;!channel&gt; &amp; &lt;https://x|y&gt;'
    """
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class SlackParams(Params):
    webhook: str  # https://hooks.slack.com/services/...; use ${SLACK_WEBHOOK_URL}
    text: str | None = None  # default: severity, kind, model, client and summary
    blocks: list[dict[str, Any]] | None = None
    resolve: bool = True  # post a message when the incident closes


class Slack(Action):
    name = "slack"
    Params = SlackParams
    notifies = True
    escaped_fields = frozenset({"text", "blocks"})
    escape = staticmethod(slack_escape)

    def check(self, params: SlackParams) -> None:
        if not is_url(params.webhook):
            raise ValueError("webhook: expected an http(s) URL (the incoming webhook), e.g. ${SLACK_WEBHOOK_URL}")

    def run(self, params: SlackParams, incident: Incident, services: Services) -> dict[str, Any]:
        detection = incident.detection
        text = params.text or slack_escape(
            f"[{detection.get('severity')}] {detection.get('kind')} on {detection.get('model')}"
            + (f" by {detection.get('client_id')}" if detection.get("client_id") else "")
            + f": {detection.get('summary', '')}")
        body: dict[str, Any] = {"text": text}
        if params.blocks:
            body["blocks"] = params.blocks
        return self._post(params, body, services)

    def resolve(self, params: SlackParams, incident: Incident, services: Services) -> dict[str, Any] | None:
        if not params.resolve:
            return None
        detection = incident.detection
        text = slack_escape(f"Resolved: {detection.get('kind')} on {detection.get('model')}"
                            + (f" by {detection.get('client_id')}" if detection.get("client_id") else "")
                            + f" (incident {incident.id}, {incident.detections} detection(s))")
        return self._post(params, {"text": text}, services)

    def _post(self, params: SlackParams, body: dict[str, Any], services: Services) -> dict[str, Any]:
        answer = delivery.post_json(params.webhook, body, timeout=services.http_timeout, what="Slack webhook")
        if answer.text.strip() not in ("ok", ""):
            raise Final(f"Slack webhook at {delivery.receiver(params.webhook)}: answered {answer.text[:100]!r}, not ok")
        return {"status": answer.status}
