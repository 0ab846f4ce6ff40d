"""The risk register: per model, what fired and what was done, over the whole history kept in the state
directory, for an audit.

- **Detections** are counted per model, version, UTC day (of event time), detector, kind and severity,
  with the MITRE ATLAS techniques and OWASP ML Top 10 entries each kind maps to (``detections.TAXONOMY``,
  carried by every detection). Kept as ``register.json`` in the state directory, written atomically on
  the checkpoint job and at stop, bounded to ``MAX_ROWS`` rows (the oldest days leave first).
- **Incidents** are read from the respond stage's journal (``journal.sqlite``, read-only) with the steps
  each ran and their outcome. The journal forgets closed incidents after ``respond.journal_retention``,
  so each save copies the incidents it finds into the register (at most ``MAX_INCIDENTS``, newest kept):
  an export covers incidents the journal has since dropped.

``export`` gives the register as one JSON document (rows, totals per technique and day, incidents);
``csv_text`` the same rows as one CSV table, a ``record`` column telling detection rows from incidents.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from monitor.detections import Detection
from monitor.ops.state import load_record, save_record

log = logging.getLogger("inferwatch.register")

FILE = "register.json"
JOURNAL = "journal.sqlite"  # the respond stage's journal (monitor.respond.stage)
FORMAT = 1
MAX_ROWS = 200_000
MAX_INCIDENTS = 10_000

# Names of the identifiers detections carry, for people reading an export.
TECHNIQUES = {
    "AML.T0015": "Evade AI Model",
    "AML.T0024.002": "Extract AI Model",
    "AML.T0029": "Denial of AI Service",
    "AML.T0034.000": "Cost Harvesting: Excessive Queries",
    "AML.T0034.001": "Cost Harvesting: Resource-Intensive Queries",
    "AML.T0043.001": "Craft Adversarial Data: Black-Box Optimization",
    "ML01": "Input Manipulation Attack",
    "ML05": "Model Theft",
    "ML08": "Model Skewing",
}

# key of a detection row: (model, version, day, detector, kind, severity)
RowKey = tuple[str, str, str, str, str, str]

CSV_COLUMNS = ["record", "model", "model_version", "day", "detector", "kind", "severity", "atlas", "owasp",
               "count", "first_ts", "last_ts", "incident", "playbook", "state", "dry_run", "opened_at",
               "resolved_at", "resolved_why", "detections", "client_id", "actions"]


class RiskRegister:
    def __init__(self) -> None:
        self.rows: dict[RowKey, dict[str, Any]] = {}
        self.incidents: dict[str, dict[str, Any]] = {}  # incident id -> its summary, as last read
        self.lock = threading.Lock()
        self.saved_at: float | None = None

    def record(self, detection: Detection) -> None:
        key = (detection.model, detection.model_version or "", day(detection.ts), detection.detector,
               detection.kind, detection.severity)
        with self.lock:
            row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = {"count": 0, "first_ts": detection.ts, "last_ts": detection.ts,
                                        "atlas": sorted(detection.atlas), "owasp": sorted(detection.owasp)}
            row["count"] += 1
            row["first_ts"] = min(row["first_ts"], detection.ts)
            row["last_ts"] = max(row["last_ts"], detection.ts)
            if len(self.rows) > MAX_ROWS:
                self._trim()

    def _trim(self) -> None:
        oldest = sorted(self.rows, key=lambda k: (k[2], self.rows[k]["last_ts"]))
        for key in oldest[: len(self.rows) - MAX_ROWS]:
            del self.rows[key]
        log.warning("risk register: over %d rows, the oldest days' rows dropped", MAX_ROWS)

    def archive(self, incidents: Iterable[dict[str, Any]]) -> None:
        """Keep a copy of the journal's incidents (as read by ``read_incidents``)."""
        with self.lock:
            for incident in incidents:
                self.incidents[incident["id"]] = incident
            if len(self.incidents) > MAX_INCIDENTS:
                keep = sorted(self.incidents.values(), key=lambda i: i["opened_at"])[-MAX_INCIDENTS:]
                self.incidents = {i["id"]: i for i in keep}

    # -- reading ---------------------------------------------------------------------------------

    def detection_rows(self, model: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            items = list(self.rows.items())
        return [{"model": k[0], "model_version": k[1] or None, "day": k[2], "detector": k[3], "kind": k[4],
                 "severity": k[5], **row}
                for k, row in sorted(items, key=lambda kv: (kv[0][0], kv[0][2], kv[0][1], kv[0][3:]))
                if model is None or k[0] == model]

    def all_incidents(self, journal: Path | None) -> list[dict[str, Any]]:
        """The archived incidents updated with what the journal says now, newest first."""
        with self.lock:
            merged = dict(self.incidents)
        if journal is not None:
            merged.update({i["id"]: i for i in read_incidents(journal)})
        return sorted(merged.values(), key=lambda i: (i["opened_at"], i["id"]), reverse=True)

    # -- persistence -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        with self.lock:
            return {"format": FORMAT, "saved_at": time.time(),
                    "detections": [[list(k), row] for k, row in self.rows.items()],
                    "incidents": list(self.incidents.values())}

    def save(self, directory: str | Path) -> None:
        save_record(Path(directory) / FILE, self.to_json())

    @classmethod
    def load(cls, directory: str | Path) -> "RiskRegister":
        """The register saved in ``directory``; an empty one when there is none. A damaged file is kept
        aside (``.broken-TIME``) for a post-mortem, and the register starts empty."""
        def decode(data: dict[str, Any]) -> RiskRegister:
            register = cls()
            register.rows = {tuple(k): row for k, row in data["detections"]}  # type: ignore[misc]
            register.incidents = {i["id"]: i for i in data["incidents"]}
            register.saved_at = data.get("saved_at")
            return register

        loaded = load_record(Path(directory) / FILE, FORMAT, decode, "risk register")
        return cls() if loaded is None else loaded


def day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def read_incidents(journal: Path, limit: int = MAX_INCIDENTS) -> list[dict[str, Any]]:
    """The journal's newest incidents with their steps, read-only (the daemon may be writing: WAL
    readers do not block it). [] when there is no journal (no respond stage ran with this state dir)."""
    if not journal.exists():
        return []
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM incidents ORDER BY opened_at DESC LIMIT ?", (limit,))]
        steps: dict[str, list[dict[str, Any]]] = {}
        for s in db.execute("SELECT incident_id, step_id, action, state, attempts, error, decided_by, started_at, "
                            "finished_at FROM steps ORDER BY incident_id, position"):
            steps.setdefault(s["incident_id"], []).append(
                {"step": s["step_id"], "action": s["action"], "state": s["state"], "attempts": s["attempts"],
                 "error": s["error"], "decided_by": s["decided_by"], "started_at": s["started_at"],
                 "finished_at": s["finished_at"]})
    except sqlite3.DatabaseError as exc:
        log.warning("journal %s could not be read (%s); no incidents shown", journal, exc)
        return []
    finally:
        db.close()
    return [incident_summary(row, steps.get(row["id"], [])) for row in rows]


def incident_summary(row: dict[str, Any], steps: list[dict[str, Any]]) -> dict[str, Any]:
    detection = json.loads(row["detection"]) if isinstance(row["detection"], str) else row["detection"]
    return {
        "id": row["id"], "playbook": row["playbook"], "key": row["key"], "state": row["state"],
        "dry_run": bool(row["dry_run"]), "opened_at": row["opened_at"], "resolved_at": row["resolved_at"],
        "resolved_why": row["resolved_why"], "detections": row["detections"],
        "model": detection.get("model"), "model_version": detection.get("model_version"),
        "client_id": detection.get("client_id"), "detector": detection.get("detector"),
        "kind": detection.get("kind"), "severity": detection.get("severity"),
        "atlas": detection.get("atlas") or [], "owasp": detection.get("owasp") or [],
        "summary": detection.get("summary"), "steps": steps,
    }


def by_technique(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """ATLAS technique and OWASP entry -> {"name", "total", "days": {day: count}} over detection rows.
    A detection of a kind that maps to two techniques counts under each."""
    out: dict[str, dict[str, dict[str, Any]]] = {"atlas": {}, "owasp": {}}
    for row in rows:
        for framework in ("atlas", "owasp"):
            for technique in row[framework]:
                slot = out[framework].setdefault(technique, {"name": TECHNIQUES.get(technique, ""), "total": 0,
                                                             "days": {}})
                slot["total"] += row["count"]
                slot["days"][row["day"]] = slot["days"].get(row["day"], 0) + row["count"]
    return out


def export(register: RiskRegister, journal: Path | None, model: str | None = None) -> dict[str, Any]:
    """The register as one JSON-able document: per model, detections grouped by technique and day, its
    rows, and incidents with the steps they ran."""
    rows = register.detection_rows(model)
    incidents = [i for i in register.all_incidents(journal) if model is None or i["model"] == model]
    models: dict[str, dict[str, Any]] = {}
    for row in rows:
        models.setdefault(row["model"], {"rows": []})["rows"].append(row)
    for incident in incidents:
        models.setdefault(incident["model"] or "", {"rows": []})
    for name, entry in models.items():
        entry["detections"] = sum(r["count"] for r in entry["rows"])
        entry.update(by_technique(entry["rows"]))
        mine = [i for i in incidents if (i["model"] or "") == name]
        entry["incidents"] = {"open": sum(1 for i in mine if i["state"] == "open"),
                              "closed": sum(1 for i in mine if i["state"] != "open")}
    return {"generated_at": time.time(), "techniques": TECHNIQUES, "models": models, "incidents": incidents}


def csv_text(document: dict[str, Any]) -> str:
    """An ``export`` document as CSV: one row per (model, version, day, detector, kind, severity) with
    ``record=detections``, then one per incident with ``record=incident`` and its steps in ``actions``
    (``step:action=state`` separated by ``; ``). Times are UTC, RFC 3339."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for entry in document["models"].values():
        for row in entry["rows"]:
            writer.writerow({"record": "detections", "model": row["model"], "model_version": row["model_version"] or "",
                             "day": row["day"], "detector": row["detector"], "kind": row["kind"],
                             "severity": row["severity"], "atlas": " ".join(row["atlas"]),
                             "owasp": " ".join(row["owasp"]), "count": row["count"],
                             "first_ts": iso(row["first_ts"]), "last_ts": iso(row["last_ts"])})
    for i in document["incidents"]:
        writer.writerow({"record": "incident", "model": i["model"] or "", "model_version": i["model_version"] or "",
                         "day": day(i["opened_at"]), "detector": i["detector"] or "", "kind": i["kind"] or "",
                         "severity": i["severity"] or "", "atlas": " ".join(i["atlas"]),
                         "owasp": " ".join(i["owasp"]), "incident": i["id"], "playbook": i["playbook"],
                         "state": i["state"], "dry_run": str(i["dry_run"]).lower(), "opened_at": iso(i["opened_at"]),
                         "resolved_at": iso(i["resolved_at"]), "resolved_why": i["resolved_why"] or "",
                         "detections": i["detections"], "client_id": i["client_id"] or "",
                         "actions": "; ".join(f"{s['step']}:{s['action']}={s['state']}" for s in i["steps"])})
    return out.getvalue()
