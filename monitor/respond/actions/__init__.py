"""The registry of playbook actions: a step's ``action:`` names one of these. Adding an action is one
module and one line here."""

from __future__ import annotations

import importlib

from monitor.respond.actions.base import Action

# name -> "module:Class"; modules are imported when a playbook first names them, so a set of
# playbooks without Kubernetes steps never imports the Kubernetes client.
_WHERE = {
    "slack": "monitor.respond.actions.slack:Slack",
    "pagerduty": "monitor.respond.actions.pagerduty:PagerDuty",
    "alertmanager": "monitor.respond.actions.alertmanager:Alertmanager",
    "webhook": "monitor.respond.actions.webhook:Webhook",
    "k8s_isolate": "monitor.respond.actions.kubernetes:Isolate",
    "k8s_release": "monitor.respond.actions.kubernetes:Release",
    "k8s_rollback": "monitor.respond.actions.kubernetes:Rollback",
    "block_client": "monitor.respond.actions.block:BlockClient",
    "snapshot": "monitor.respond.actions.snapshot:Snapshot",
}

NAMES = tuple(sorted(_WHERE))
_LOADED: dict[str, Action] = {}


def get(name: str) -> Action:
    """The action called ``name``; KeyError when there is none."""
    if name not in _LOADED:
        module, cls = _WHERE[name].split(":")
        _LOADED[name] = getattr(importlib.import_module(module), cls)()
    return _LOADED[name]
