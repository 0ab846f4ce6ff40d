"""The replay's JSON report (docs/replay-report.md): what was read, what was found, what the playbooks
would have done, and the figures over time that the HTML report plots.

Everything here is a function of the events and the config: no wall clock, no machine names, sorted
keys. The same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from monitor import __version__
from monitor.detectors import ModelBatch

FORMAT = 1
MAX_POINTS = 720  # buckets per model in the plots; the bucket width doubles to stay under it
MAX_CLIENTS_COUNTED = 1_000_000  # distinct clients counted exactly per model, then "at least"
MAX_PLOTTED_CLIENTS = 5
# Latency histogram per bucket: 40 log-spaced bins a decade from 0.01 ms to 10^6 ms (quantiles to ~6%).
_LATENCY_EDGES = np.logspace(-2, 6, 8 * 40 + 1)


class _Bucket:
    __slots__ = ("events", "drift", "low_conf", "low_conf_events", "latency", "risk")

    def __init__(self) -> None:
        self.events = 0
        self.drift: float | None = None
        self.low_conf = 0.0  # sum of rate x events
        self.low_conf_events = 0
        self.latency: np.ndarray | None = None
        self.risk: dict[str, float] = {}

    def merge(self, other: "_Bucket") -> None:
        self.events += other.events
        if other.drift is not None:
            self.drift = other.drift if self.drift is None else max(self.drift, other.drift)
        self.low_conf += other.low_conf
        self.low_conf_events += other.low_conf_events
        if other.latency is not None:
            self.latency = other.latency.copy() if self.latency is None else self.latency + other.latency
        for client, risk in other.risk.items():
            self.risk[client] = max(risk, self.risk.get(client, 0.0))


class ModelFigures:
    """One model's figures over event time, in buckets of ``width`` x 2^k seconds."""

    def __init__(self, width: float):
        self.width = width
        self.factor = 1
        self.buckets: dict[int, _Bucket] = {}
        self.first_ts = math.inf
        self.last_ts = -math.inf
        self.versions: Counter[str] = Counter()
        self.clients: set[str] = set()
        self.clients_overflow = False
        self.levels: dict[str, float] = {}  # thresholds and baselines: their last known value
        self.max_risk: dict[str, float] = {}

    def observe(self, batch: ModelBatch, figures: dict[str, Any]) -> None:
        ts = batch.ts
        self.first_ts = min(self.first_ts, float(ts[0]))
        self.last_ts = max(self.last_ts, float(ts[-1]))
        self.versions.update(e.model_version or "(none)" for e in batch.events)
        if not self.clients_overflow:
            self.clients.update(c for c in batch.client_ids if c is not None)
            self.clients_overflow = len(self.clients) >= MAX_CLIENTS_COUNTED
        for edge in (float(ts[0]), float(ts[-1])):  # the batch's span, so that the width fits it
            self.buckets.setdefault(self._key(edge), _Bucket())
        self._bound()
        # each event in the bucket of its own time; the detectors' figures (one per batch) in every
        # bucket the batch spans
        keys = np.floor(ts / self.width).astype(np.int64) // self.factor
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        ends = np.r_[starts[1:], len(keys)]
        latency = batch.column("latency_ms")
        drift = figures.get("drift")
        rate = figures.get("low_confidence_rate")
        risks = figures.get("client_risk") or {}
        for lo, hi in zip(starts.tolist(), ends.tolist()):
            bucket = self.buckets.setdefault(int(keys[lo]), _Bucket())
            bucket.events += hi - lo
            if drift is not None:
                bucket.drift = drift if bucket.drift is None else max(bucket.drift, drift)
            if rate is not None:
                bucket.low_conf += rate * (hi - lo)
                bucket.low_conf_events += hi - lo
            values = latency[lo:hi]
            values = values[~np.isnan(values)]
            if values.size:
                counts = np.bincount(np.searchsorted(_LATENCY_EDGES, values), minlength=len(_LATENCY_EDGES) + 1)
                bucket.latency = counts if bucket.latency is None else bucket.latency + counts
            for client, risk in risks.items():
                bucket.risk[client] = max(risk, bucket.risk.get(client, 0.0))
        for client, risk in risks.items():
            self.max_risk[client] = max(risk, self.max_risk.get(client, 0.0))
        for name in ("low_confidence_reference", "low_confidence_alarm", "latency_baseline_median",
                     "latency_threshold"):
            if figures.get(name) is not None:
                self.levels[name] = figures[name]

    def _key(self, ts: float) -> int:
        return int(math.floor(ts / self.width)) // self.factor

    def _bound(self) -> bool:
        """Double the bucket width (merging pairs) while the buckets span more than MAX_POINTS; True
        when it did."""
        doubled = False
        while max(self.buckets) - min(self.buckets) + 1 > MAX_POINTS:
            self.factor *= 2
            doubled = True
            merged: dict[int, _Bucket] = {}
            for key in sorted(self.buckets):
                merged.setdefault(key // 2, _Bucket()).merge(self.buckets[key])
            self.buckets = merged
        return doubled

    def series(self, has: set[str]) -> dict[str, Any]:
        keys = sorted(self.buckets)
        if not keys:
            return {}
        width = self.width * self.factor
        span = range(keys[0], keys[-1] + 1)
        buckets = [self.buckets.get(k) for k in span]
        out: dict[str, Any] = {"t": [round(k * width, 6) for k in span], "bucket_seconds": width,
                               "events": [b.events if b else 0 for b in buckets]}
        if "drift" in has:
            out["drift"] = {"label": "largest drift chart statistic / its threshold", "threshold": 1.0,
                            "values": [_round(b.drift) if b else None for b in buckets]}
        if "confidence" in has:
            out["low_confidence_rate"] = {
                "label": "share of predictions below the confidence bound",
                "threshold": _round(self.levels.get("low_confidence_reference")),
                "alarm_level": _round(self.levels.get("low_confidence_alarm")),
                "values": [_round(b.low_conf / b.low_conf_events) if b and b.low_conf_events else None
                           for b in buckets]}
        if any(b is not None and b.latency is not None for b in buckets):
            out["latency_ms"] = {"label": "latency (ms)",
                                 "p50": [_quantile(b.latency, 0.5) if b else None for b in buckets],
                                 "p95": [_quantile(b.latency, 0.95) if b else None for b in buckets],
                                 "baseline_median": _round(self.levels.get("latency_baseline_median")),
                                 "threshold": _round(self.levels.get("latency_threshold"))}
        if "probing" in has and self.max_risk:
            top = sorted(self.max_risk, key=lambda c: (-self.max_risk[c], c))[:MAX_PLOTTED_CLIENTS]
            out["client_risk"] = {"label": "probing risk of the riskiest clients (1 = alarm)", "threshold": 1.0,
                                  "clients": {c: [_round(b.risk.get(c)) if b else None for b in buckets] for c in top}}
        return out


def _quantile(counts: np.ndarray | None, q: float) -> float | None:
    """The upper edge of the histogram bin holding quantile ``q`` (within one bin, ~6%)."""
    if counts is None or counts.sum() == 0:
        return None
    index = int(np.searchsorted(np.cumsum(counts), q * counts.sum()))
    edges = _LATENCY_EDGES
    return _round(float(edges[min(index, len(edges) - 1)]))


def _round(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def file_digest(path: str) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"kind": "file", "path": path, "bytes": size, "sha256": digest.hexdigest()}


def playbooks_digest(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    root = Path(path)
    files = sorted(root.rglob("*.y*ml")) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(root) if root.is_dir() else file.name}\n".encode())
        digest.update(file.read_bytes())
        digest.update(b"\n")
    return {"path": path, "sha256": digest.hexdigest()}


def config_digest(config: Any) -> dict[str, Any]:
    source = config.source
    out: dict[str, Any] = {"path": source, "sha256": None}
    if source and Path(source).is_file():
        out["sha256"] = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    settings = msgspec.to_builtins(config)
    for key in ("source", "logging", "http"):  # where the file was and how the run talks: not what it finds
        settings.pop(key, None)
    effective = msgspec.json.encode(settings, order="sorted")
    out["effective_sha256"] = hashlib.sha256(effective).hexdigest()
    return out


def suspicious_clients(detections: list[dict[str, Any]], figures: dict[str, ModelFigures]) -> list[dict[str, Any]]:
    """Clients named by a detection, with the evidence: the first detection of each kind."""
    rank = {"info": 0, "warning": 1, "critical": 2}
    by_client: dict[tuple[str, str], dict[str, Any]] = {}
    for d in detections:
        client = d.get("client_id")
        if client is None:
            continue
        entry = by_client.setdefault((d["model"], client), {
            "model": d["model"], "client_id": client, "kinds": [], "detections": 0, "first_ts": d["ts"],
            "last_ts": d["ts"], "severity": d["severity"], "atlas": [], "evidence": []})
        entry["detections"] += 1
        entry["last_ts"] = d["ts"]
        if rank.get(d["severity"], 0) > rank.get(entry["severity"], 0):
            entry["severity"] = d["severity"]
        for technique in d.get("atlas") or []:
            if technique not in entry["atlas"]:
                entry["atlas"].append(technique)
        if d["kind"] not in entry["kinds"]:
            entry["kinds"].append(d["kind"])
            entry["evidence"].append({"kind": d["kind"], "ts": d["ts"], "detection_id": d["detection_id"],
                                      "summary": d["summary"], "evidence": d.get("evidence")})
    out = []
    for (model, client), entry in by_client.items():
        model_figures = figures.get(model)
        entry["max_risk"] = _round(model_figures.max_risk.get(client)) if model_figures else None
        out.append(entry)
    out.sort(key=lambda e: (-rank.get(e["severity"], 0), -e["detections"], e["model"], e["client_id"]))
    return out


def incidents(journal: Any) -> list[dict[str, Any]]:
    """The playbooks' decisions, from the replay's dry-run journal."""
    out = []
    rows = sorted(journal.incidents(limit=1_000_000), key=lambda r: (r["opened_at"], r["id"]))
    for row in rows:
        first = row["detection"]
        steps = []
        for step in journal.steps(row["id"]):
            steps.append({"id": step["step_id"], "action": step["action"], "destructive": bool(step["destructive"]),
                          "state": step["state"], "params": step["detail"], "error": step["error"]})
        out.append({"id": row["id"], "playbook": row["playbook"], "key": row["key"], "state": row["state"],
                    "opened_at": row["opened_at"], "closed_at": row["resolved_at"], "closed_why": row["resolved_why"],
                    "last_detection_at": row["last_seen"], "detections": row["detections"],
                    "detection": {k: first.get(k) for k in ("detection_id", "kind", "model", "client_id", "severity",
                                                            "summary")},
                    "steps": steps})
    return out


def clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (json.dumps would write NaN, which is not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(clean(report), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def tool() -> str:
    return f"inferwatch {__version__}"
