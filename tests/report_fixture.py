"""Replay reports in the documented format (docs/replay-report.md), built by hand for the HTML renderer's
tests: a forensic one (two models, an extraction attack, drift, incidents), a sparse one and an empty one.

The client ``HOSTILE`` and a detection summary carry markup, as an attacker who picks the client id and
the query payloads can make them."""

from __future__ import annotations

import hashlib
import math
from typing import Any

from monitor.detections import TAXONOMY, detection_id

T0 = 1764230400.0  # 2025-11-27T08:00:00Z
TICK = 5.0
BUCKETS = 120
HOSTILE = '<img src=x onerror="alert(2)">'
HOSTILE_SUMMARY = "queries walk the decision boundary </script><script>alert(1)</script>"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def detection(ts: float, detector: str, kind: str, model: str, severity: str, summary: str,
              client_id: str | None = None, score: float = 2.0, threshold: float = 1.0) -> dict[str, Any]:
    atlas, owasp = TAXONOMY[kind]
    return {"detection_id": detection_id(detector, kind, model, client_id, ts), "ts": ts, "detector": detector,
            "kind": kind, "model": model, "model_version": "v3", "client_id": client_id, "severity": severity,
            "score": score, "threshold": threshold, "summary": summary,
            "evidence": {"window": [ts - 30.0, ts]}, "atlas": list(atlas), "owasp": list(owasp),
            "source": {"file": "logs/day1.jsonl.gz", "line": int(ts - T0) * 100}, "labels": {}}


def _curve(i: int, start: int, base: float, rise: float) -> float | None:
    """None while the detector learns (before ``start``), then a slow wave that rises past the threshold."""
    if i < start:
        return None
    return round(base + rise * max(0, i - 70) / 50 + 0.6 * base * math.sin(i / 3), 4)


def forensic_report() -> dict[str, Any]:
    t = [T0 + i * TICK for i in range(BUCKETS)]
    detections = sorted([
        detection(T0 + 380.0, "drift", "feature_drift", "digits", "warning", "pixel_12 drifted: 3.1 over 1.0"),
        detection(T0 + 420.5, "probing", "model_extraction", "digits", "critical",
                  "client mallory: 240 queries near the boundary, PRADA and neighbour tests", "mallory", 3.2),
        detection(T0 + 431.0, "confidence", "low_confidence_spike", "digits", "warning",
                  "client mallory: 38% low-confidence predictions over 5%", "mallory"),
        detection(T0 + 455.0, "probing", "adversarial_probing", "digits", "critical", HOSTILE_SUMMARY, HOSTILE),
        detection(T0 + 300.0, "resource", "latency_anomaly", "fraud", "info", "p95 latency 31 ms over 26 ms"),
        detection(T0 + 510.0, "drift", "prediction_drift", "fraud", "warning", "score distribution drifted"),
    ], key=lambda d: (d["ts"], d["detection_id"]))
    mallory = [d for d in detections if d["client_id"] == "mallory"]
    return {
        "format": 1,
        "tool": "inferwatch 0.1.0",
        "config": {"path": "configs/inferwatch.yaml", "sha256": sha("config"), "effective_sha256": sha("effective")},
        "playbooks": {"path": "playbooks", "sha256": sha("playbooks"), "loaded": ["drift", "probing"]},
        "inputs": [
            {"kind": "file", "path": "logs/day1.jsonl.gz", "bytes": 1234567, "sha256": sha("day1")},
            {"kind": "kafka", "topic": "inference-logs", "bootstrap": "kafka-0:9092",
             "partitions": {"0": {"first_offset": 0, "last_offset": 999, "records": 1000}},
             "records": 1000, "sha256": sha("kafka")},
        ],
        "filters": {"from": None, "to": None, "models": [], "clients": []},
        "events": {"read": 120279, "in_range": 120279, "filtered_out": 0, "processed": 120000,
                   "dead_lettered": 279, "dead_letter_reasons": {"invalid_json": 50, "missing_field": 229}},
        "time_range": {"first": T0, "last": t[-1] + 4.95},
        "models": {
            "digits": {"events": 80000, "first_ts": T0, "last_ts": t[-1] + 4.95, "versions": {"v3": 80000},
                       "clients": 42, "detections": {"adversarial_probing": 1, "feature_drift": 1,
                                                     "low_confidence_spike": 1, "model_extraction": 1},
                       "detectors": {"confidence": "armed", "drift": "armed", "probing": "armed",
                                     "resource": "armed"}},
            "fraud": {"events": 40000, "first_ts": T0 + 0.2, "last_ts": t[-1] + 4.9, "versions": {"v7": 40000},
                      "clients": 9, "detections": {"latency_anomaly": 1, "prediction_drift": 1},
                      "detectors": {"drift": "armed", "resource": "armed"}},
        },
        "detections": detections,
        "incidents": [
            {"id": "inc-" + sha("probing")[:12], "playbook": "probing", "key": "probing:digits:mallory",
             "opened_at": T0 + 420.5, "closed_at": T0 + 480.5, "state": "resolved", "detections": 2,
             "detection": {k: mallory[0][k] for k in ("detection_id", "kind", "model", "client_id")},
             "steps": [
                 {"id": "page", "action": "pagerduty", "destructive": False, "state": "dry_run",
                  "params": {"summary": mallory[0]["summary"], "routing_key": "***"}},
                 {"id": "block", "action": "block_client", "destructive": True, "state": "skipped", "params": None},
             ]},
            {"id": "inc-" + sha("hostile")[:12], "playbook": "probing", "key": f"probing:digits:{HOSTILE}",
             "opened_at": T0 + 455.0, "closed_at": None, "state": "open", "detections": 1,
             "detection": {"detection_id": detections[-2]["detection_id"], "kind": "adversarial_probing",
                           "model": "digits", "client_id": HOSTILE},
             "steps": [{"id": "page", "action": "pagerduty", "destructive": False, "state": "dry_run",
                        "params": {"summary": HOSTILE_SUMMARY, "routing_key": "***"}}]},
        ],
        "series": {
            "digits": {
                "t": t,
                "events": [667] * BUCKETS,
                "drift": {"label": "largest drift chart statistic / its threshold", "threshold": 1.0,
                          "values": [_curve(i, 20, 0.3, 1.2) for i in range(BUCKETS)]},
                "low_confidence_rate": {"label": "share of predictions below the confidence bound",
                                        "threshold": 0.05, "alarm_level": 0.15,
                                        "values": [_curve(i, 10, 0.03, 0.12) for i in range(BUCKETS)]},
                "latency_ms": {"label": "latency (ms)", "baseline_median": 12.0, "threshold": 13.2,
                               "p50": [None if i % 40 == 39 else 12.0 + 0.2 * math.sin(i) for i in range(BUCKETS)],
                               "p95": [None if i % 40 == 39 else 17.9 + 0.6 * math.sin(i / 2) for i in range(BUCKETS)]},
                "client_risk": {"label": "probing risk of the riskiest clients (1 = alarm)", "threshold": 1.0,
                                "clients": {"mallory": [round(max(0.0, (i - 60) / 12), 3) for i in range(BUCKETS)],
                                            HOSTILE: [None if i < 80 else round((i - 80) / 30, 3) for i in range(BUCKETS)],
                                            "client-003": [0.1 + 0.05 * math.sin(i / 5) for i in range(BUCKETS)]}},
            },
            "fraud": {
                "t": t,
                "events": [333] * BUCKETS,
                "drift": {"label": "largest drift chart statistic / its threshold", "threshold": 1.0,
                          "values": [_curve(i, 30, 0.5, 0.9) for i in range(BUCKETS)]},
                "latency_ms": {"label": "latency (ms)", "baseline_median": 20.0, "threshold": 26.0,
                               "p50": [20.0 + math.sin(i / 4) for i in range(BUCKETS)],
                               "p95": [24.0 + (8.0 if 55 < i < 62 else 0.0) for i in range(BUCKETS)]},
            },
        },
        "suspicious_clients": [
            {"model": "digits", "client_id": HOSTILE, "kinds": ["adversarial_probing"], "detections": 1,
             "first_ts": T0 + 455.0, "last_ts": T0 + 455.0, "severity": "critical",
             "atlas": ["AML.T0015", "AML.T0043.001"], "max_risk": 1.3,
             "evidence": [{"kind": "adversarial_probing", "ts": T0 + 455.0, "summary": HOSTILE_SUMMARY,
                           "evidence": {"steps": 14}}]},
            {"model": "digits", "client_id": "mallory", "kinds": ["low_confidence_spike", "model_extraction"],
             "detections": 2, "first_ts": T0 + 420.5, "last_ts": T0 + 431.0, "severity": "critical",
             "atlas": ["AML.T0015", "AML.T0024.002", "AML.T0043.001"], "max_risk": 4.9,
             "evidence": [{"kind": d["kind"], "ts": d["ts"], "summary": d["summary"], "evidence": d["evidence"]}
                          for d in mallory]},
        ],
    }


def sparse_report() -> dict[str, Any]:
    """One model whose whole replay fits one bucket: one point of drift, latency and confidence all null."""
    report = empty_report()
    report["models"] = {"ranker": {"events": 12, "first_ts": T0, "last_ts": T0 + 3.0, "versions": {"v1": 12},
                                   "clients": 2, "detections": {}, "detectors": {"drift": "learning"}}}
    report["series"] = {"ranker": {
        "t": [T0], "events": [12],
        "drift": {"label": "largest drift chart statistic / its threshold", "threshold": None, "values": [0.4]},
        "low_confidence_rate": {"label": "share of predictions below the confidence bound", "threshold": None,
                                "alarm_level": None, "values": [None]},
        "latency_ms": {"label": "latency (ms)", "baseline_median": None, "threshold": None,
                       "p50": [None], "p95": [None]},
    }}
    report["time_range"] = {"first": T0, "last": T0 + 3.0}
    return report


def empty_report() -> dict[str, Any]:
    """A replay that read only dead letters: no model, no detection, no series, no incident."""
    return {
        "format": 1, "tool": "inferwatch 0.1.0",
        "config": {"path": "configs/inferwatch.yaml", "sha256": sha("config"), "effective_sha256": sha("effective")},
        "playbooks": {"path": "playbooks", "sha256": sha(""), "loaded": []},
        "inputs": [{"kind": "file", "path": "logs/empty.jsonl", "bytes": 40, "sha256": sha("empty")}],
        "filters": {"from": T0, "to": T0 + 3600.0, "models": ["digits"], "clients": []},
        "events": {"read": 2, "in_range": 2, "filtered_out": 0, "processed": 0, "dead_lettered": 2,
                   "dead_letter_reasons": {"invalid_json": 2}},
        "time_range": {"first": None, "last": None},
        "models": {}, "detections": [], "incidents": [], "series": {}, "suspicious_clients": [],
    }


def huge_report(count: int) -> dict[str, Any]:
    """The forensic report with ``count`` detections spread over its ten minutes, in four models."""
    report = forensic_report()
    kinds = [("probing", "query_flood", "critical"), ("confidence", "low_confidence_spike", "warning"),
             ("resource", "latency_anomaly", "info")]
    models = ["digits", "fraud", "ranker", "search"]
    report["detections"] = sorted((detection(T0 + i * 600.0 / count, *kinds[i % 3][:2], models[i % 4], kinds[i % 3][2],
                                             f"flood number {i}", f"client-{i % 97:03d}") for i in range(count)),
                                  key=lambda d: (d["ts"], d["detection_id"]))
    return report
