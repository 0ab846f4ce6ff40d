"""The detection (finding) format of DESIGN §3, its stable id, and the kinds' MITRE ATLAS / OWASP mapping."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

SEVERITIES = ("info", "warning", "critical")

# kind -> (MITRE ATLAS v5 technique ids, OWASP Machine Learning Security Top 10 (2023) entries).
# Drift is not always an attack; the ids name what it can be evidence of.
TAXONOMY: dict[str, tuple[list[str], list[str]]] = {
    "feature_drift": (["AML.T0015"], ["ML01", "ML08"]),
    "prediction_drift": (["AML.T0015"], ["ML08"]),
    "performance_drift": ([], ["ML08"]),
    "low_confidence_spike": (["AML.T0015", "AML.T0043.001"], ["ML01"]),
    "model_extraction": (["AML.T0024.002"], ["ML05"]),
    "adversarial_probing": (["AML.T0043.001", "AML.T0015"], ["ML01"]),
    "query_flood": (["AML.T0034.000", "AML.T0029"], ["ML05"]),
    "latency_anomaly": (["AML.T0029"], []),
    "resource_anomaly": (["AML.T0034.001", "AML.T0029"], []),
    "payload_anomaly": (["AML.T0029", "AML.T0034.001"], ["ML01"]),
    "error_spike": (["AML.T0029"], []),
}


class Detection(msgspec.Struct, kw_only=True, omit_defaults=False):
    detection_id: str
    ts: float
    detector: str
    kind: str
    model: str
    model_version: str | None = None
    client_id: str | None = None
    severity: str = "warning"
    score: float = 0.0
    threshold: float = 0.0
    summary: str = ""
    evidence: dict[str, Any] = msgspec.field(default_factory=dict)
    atlas: list[str] = msgspec.field(default_factory=list)
    owasp: list[str] = msgspec.field(default_factory=list)
    source: dict[str, Any] | None = None
    # The model's labels from the config (models.overrides[].labels: team, tier, ...), for routing
    # detections to playbooks (match.labels).
    labels: dict[str, str] = msgspec.field(default_factory=dict)


def detection_id(detector: str, kind: str, model: str, client_id: str | None, window_start: float,
                 subject: str = "") -> str:
    """Same inputs, same id: a replay or a redelivered batch yields the same id, so repeats are harmless.

    ``subject`` separates findings of one detector that share a kind (two streams, two features).
    """
    text = f"{detector}\x1f{kind}\x1f{model}\x1f{client_id or ''}\x1f{window_start:.6f}\x1f{subject}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def make_detection(*, detector: str, kind: str, model: str, window_start: float, ts: float,
                   subject: str = "", **fields: Any) -> Detection:
    """A Detection with its id and taxonomy filled in from the kind."""
    atlas, owasp = TAXONOMY.get(kind, ([], []))
    return Detection(
        detection_id=detection_id(detector, kind, model, fields.get("client_id"), window_start, subject),
        ts=ts,
        detector=detector,
        kind=kind,
        model=model,
        atlas=list(atlas),
        owasp=list(owasp),
        **fields,
    )


_encoder = msgspec.json.Encoder()


def encode(detection: Detection) -> bytes:
    return _encoder.encode(detection)


def decode(raw: bytes) -> Detection:
    return msgspec.json.decode(raw, type=Detection)
