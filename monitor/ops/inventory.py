"""The live model inventory: every watched model and version the detect stage has read, when it was
first and last seen (event time), how many events and about how many distinct clients, which detectors
watch it and where each stands (``learning`` / ``armed`` / ``alarming``), and its last detection.

It is fed once per batch a model's detectors read (``observe``: a few numpy and ``collections`` passes
over the batch, no per-event Python beyond reading two attributes) and once per detection published
(``detected``). It is kept in the state directory as JSON (``inventory.json``, written atomically on
the checkpoint job and at stop), so a restart keeps it and ``inferwatch status -c`` reads it offline.
Memory is bounded: models by ``limits.max_models`` (the pipeline routes no more), versions per model by
``MAX_VERSIONS``, distinct clients by a 2 KiB HyperLogLog per model and per version.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from monitor.detections import Detection
from monitor.ops.hll import HyperLogLog, hashes
from monitor.ops.state import load_record, save_record

log = logging.getLogger("inferwatch.inventory")

FILE = "inventory.json"
FORMAT = 1
MAX_VERSIONS = 16  # per model; beyond it the least recently seen version leaves the inventory
NO_VERSION = ""  # the key of events that name no model_version


class VersionEntry:
    __slots__ = ("events", "first_seen", "last_seen", "clients")

    def __init__(self) -> None:
        self.events = 0
        self.first_seen = float("inf")
        self.last_seen = float("-inf")
        self.clients = HyperLogLog()

    def to_json(self) -> dict[str, Any]:
        return {"events": self.events, "first_seen": _finite(self.first_seen), "last_seen": _finite(self.last_seen),
                "clients_hll": base64.b64encode(self.clients.to_bytes()).decode()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "VersionEntry":
        entry = cls()
        entry.events = int(data["events"])
        entry.first_seen = _float(data.get("first_seen"), float("inf"))
        entry.last_seen = _float(data.get("last_seen"), float("-inf"))
        entry.clients = HyperLogLog.from_bytes(base64.b64decode(data["clients_hll"]))
        return entry


class ModelEntry:
    """One model: its totals, its versions, and per detector its phase and its detections."""

    def __init__(self, model: str):
        self.model = model
        self.totals = VersionEntry()  # every version together (evicted versions included)
        self.versions: dict[str, VersionEntry] = {}
        # detector -> {"phase", "detections", "last_detection_ts", "events_at_detection"}
        self.detectors: dict[str, dict[str, Any]] = {}
        self.live: dict[str, Any] = {}  # detector name -> the running Detector (not persisted)
        self.detections = 0
        self.last_detection: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"totals": self.totals.to_json(), "versions": {v: e.to_json() for v, e in self.versions.items()},
                "detectors": self.detectors, "detections": self.detections, "last_detection": self.last_detection}

    @classmethod
    def from_json(cls, model: str, data: dict[str, Any]) -> "ModelEntry":
        entry = cls(model)
        entry.totals = VersionEntry.from_json(data["totals"])
        entry.versions = {v: VersionEntry.from_json(e) for v, e in data.get("versions", {}).items()}
        entry.detectors = {name: dict(d) for name, d in data.get("detectors", {}).items()}
        entry.detections = int(data.get("detections", 0))
        entry.last_detection = data.get("last_detection")
        return entry

    def phase(self, name: str) -> str:
        """The detector's phase now (its running instance decides; restored state otherwise)."""
        d = self.detectors[name]
        detector = self.live.get(name)
        if detector is None:
            return d.get("phase", "unknown")
        since = d.get("events_at_detection")
        return detector.phase(None if since is None else self.totals.events - since)


class Inventory:
    """The models seen, thread-safe: fed by the detect loop, read by the HTTP API and the checkpoint.

    ``on_version``: called with (model, version, detector names) when a version enters the inventory,
    and with (model, version, None) when one leaves it (the Prometheus info metric follows)."""

    def __init__(self, on_version: Callable[[str, str, list[str] | None], None] | None = None):
        self.models: dict[str, ModelEntry] = {}
        self.lock = threading.Lock()
        self.on_version = on_version
        self.saved_at: float | None = None

    # -- feeding (the detect loop) --------------------------------------------------------------

    def observe(self, model: str, batch: Any, detectors: list[Any]) -> None:
        """A batch of ``model``'s events its ``detectors`` have read."""
        n = len(batch)
        if not n:
            return
        ts = batch.ts
        versions = [e.model_version or NO_VERSION for e in batch.events]
        clients = batch.client_ids
        per_version = Counter(versions)
        # distinct (version, client) pairs: a batch has far fewer of them than events, and only these
        # are hashed into the sketches
        pairs = set(zip(versions, clients))
        with self.lock:
            entry = self.models.get(model)
            if entry is None:
                entry = self.models[model] = ModelEntry(model)
            for d in detectors:
                entry.live[d.name] = d
                entry.detectors.setdefault(d.name, {"phase": "learning", "detections": 0, "last_detection_ts": None,
                                                    "events_at_detection": None})
            lo, hi = float(ts.min()), float(ts.max())
            _seen(entry.totals, n, lo, hi)
            if len(per_version) == 1:
                spans = {versions[0]: (lo, hi)}
            else:
                labels = np.asarray(versions, dtype=object)
                spans = {v: (float(ts[mask].min()), float(ts[mask].max()))
                         for v in per_version for mask in [labels == v]}
            clients_of: dict[str, list[str]] = {}
            for version, client in pairs:
                if client is not None:
                    clients_of.setdefault(version, []).append(client)
            hashed = {version: hashes(clients) for version, clients in clients_of.items()}
            if hashed:  # each distinct pair hashed once; the model's sketch takes them all (repeats change nothing)
                entry.totals.clients.add_hashes(np.concatenate(list(hashed.values())))
            for version, count in per_version.items():
                target = self._version(entry, version, detectors)
                _seen(target, count, *spans[version])
                if version in hashed:
                    target.clients.add_hashes(hashed[version])
            for name in entry.live:
                entry.detectors[name]["phase"] = entry.phase(name)

    def _version(self, entry: ModelEntry, version: str, detectors: list[Any]) -> VersionEntry:
        target = entry.versions.get(version)
        if target is not None:
            return target
        if len(entry.versions) >= MAX_VERSIONS:
            gone = min(entry.versions, key=lambda v: entry.versions[v].last_seen)
            del entry.versions[gone]
            log.info("%s: version %r leaves the inventory (more than %d versions; its events stay in the "
                     "model's totals)", entry.model, gone or "(none)", MAX_VERSIONS)
            if self.on_version is not None:
                self.on_version(entry.model, gone, None)
        target = entry.versions[version] = VersionEntry()
        if self.on_version is not None:
            self.on_version(entry.model, version, sorted(d.name for d in detectors))
        return target

    def detected(self, detection: Detection) -> None:
        with self.lock:
            entry = self.models.get(detection.model)
            if entry is None:
                entry = self.models[detection.model] = ModelEntry(detection.model)
            entry.detections += 1
            if entry.last_detection is None or detection.ts >= entry.last_detection["ts"]:
                entry.last_detection = {key: getattr(detection, key) for key in (
                    "detection_id", "ts", "detector", "kind", "severity", "model_version", "client_id", "summary")}
            d = entry.detectors.setdefault(detection.detector, {"phase": "armed", "detections": 0,
                                                                "last_detection_ts": None, "events_at_detection": None})
            d["detections"] += 1
            d["last_detection_ts"] = max(detection.ts, d["last_detection_ts"] or detection.ts)
            d["events_at_detection"] = entry.totals.events
            d["phase"] = entry.phase(detection.detector) if detection.detector in entry.live else "alarming"

    # -- reading ---------------------------------------------------------------------------------

    def summaries(self) -> list[dict[str, Any]]:
        """Every model as plain data (the API's and ``status``'s rows), by name."""
        with self.lock:
            return [summary(entry) for _, entry in sorted(self.models.items())]

    def clients_estimates(self) -> dict[str, float]:
        with self.lock:
            return {model: entry.totals.clients.estimate() for model, entry in self.models.items()}

    # -- persistence -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        with self.lock:
            for entry in self.models.values():
                for name in entry.live:
                    entry.detectors[name]["phase"] = entry.phase(name)
            return {"format": FORMAT, "saved_at": time.time(),
                    "models": {model: entry.to_json() for model, entry in self.models.items()}}

    def save(self, directory: str | Path) -> None:
        save_record(Path(directory) / FILE, self.to_json())

    @classmethod
    def load(cls, directory: str | Path, **kwargs: Any) -> "Inventory":
        """The inventory saved in ``directory``; an empty one when there is none. A damaged file is
        kept aside (``.broken-TIME``) and the inventory starts empty: it is a record, not a control."""
        def decode(data: dict[str, Any]) -> Inventory:
            inventory = cls(**kwargs)
            inventory.models = {model: ModelEntry.from_json(model, entry) for model, entry in data["models"].items()}
            inventory.saved_at = data.get("saved_at")
            return inventory

        loaded = load_record(Path(directory) / FILE, FORMAT, decode, "inventory")
        return cls(**kwargs) if loaded is None else loaded


def summary(entry: ModelEntry) -> dict[str, Any]:
    totals = entry.totals
    return {
        "model": entry.model,
        "events": totals.events,
        "first_seen": _finite(totals.first_seen),
        "last_seen": _finite(totals.last_seen),
        "clients_estimate": round(totals.clients.estimate()),
        "versions": [
            {"version": version or None, "events": v.events, "first_seen": _finite(v.first_seen),
             "last_seen": _finite(v.last_seen), "clients_estimate": round(v.clients.estimate())}
            for version, v in sorted(entry.versions.items(), key=lambda kv: kv[1].first_seen)
        ],
        "detectors": [
            {"detector": name, "phase": d["phase"], "detections": d["detections"],
             "last_detection_ts": d["last_detection_ts"]}
            for name, d in sorted(entry.detectors.items())
        ],
        "detections": entry.detections,
        "last_detection": entry.last_detection,
    }


def _seen(entry: VersionEntry, events: int, lo: float, hi: float) -> None:
    entry.events += events
    entry.first_seen = min(entry.first_seen, lo)
    entry.last_seen = max(entry.last_seen, hi)


def _finite(value: float) -> float | None:
    return value if np.isfinite(value) else None


def _float(value: Any, default: float) -> float:
    return default if value is None else float(value)
