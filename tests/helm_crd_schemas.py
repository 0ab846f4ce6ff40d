"""JSON schemas of the Prometheus Operator's monitoring.coreos.com/v1 ServiceMonitor and PrometheusRule,
for the fields the chart writes.

kubernetes-validate ships the schemas of Kubernetes' own kinds only. These are transcribed from the
operator's CRDs (``example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml`` and
``..._prometheusrules.yaml``): the same types, patterns and required keys, but only the properties the
chart uses, and ``additionalProperties: false`` wherever the CRD has a fixed set of fields, so a
misspelt or misplaced key fails here as the API server would prune or reject it. A field the chart
starts using must be added here from the CRD.
"""

from __future__ import annotations

# The CRDs' Duration and NonEmptyDuration patterns.
DURATION = "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
NON_EMPTY_DURATION = "^(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?$"

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 253,
                 "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}

_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"], "additionalProperties": False,
            "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}


def _top(kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


SERVICE_MONITOR = _top("ServiceMonitor", {
    "type": "object",
    "required": ["selector"],
    "additionalProperties": False,
    "properties": {
        "selector": _LABEL_SELECTOR,
        "namespaceSelector": {
            "type": "object", "additionalProperties": False,
            "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
        },
        "jobLabel": {"type": "string"},
        "endpoints": {"type": "array", "items": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "port": {"type": "string"},
                "path": {"type": "string"},
                "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                "interval": {"type": "string", "pattern": DURATION},
                "scrapeTimeout": {"type": "string", "pattern": DURATION},
                "honorLabels": {"type": "boolean"},
            },
        }},
    },
})

PROMETHEUS_RULE = _top("PrometheusRule", {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "groups": {"type": "array", "items": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "interval": {"type": "string", "pattern": DURATION},
                "rules": {"type": "array", "items": {
                    "type": "object",
                    "required": ["expr"],
                    "additionalProperties": False,
                    "properties": {
                        "alert": {"type": "string"},
                        "record": {"type": "string"},
                        "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}]},  # x-kubernetes-int-or-string
                        "for": {"type": "string", "pattern": DURATION},
                        "keep_firing_for": {"type": "string", "minLength": 1, "pattern": NON_EMPTY_DURATION},
                        "labels": _STRING_MAP,
                        "annotations": _STRING_MAP,
                    },
                }},
            },
        }},
    },
})

BY_KIND = {"ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}
