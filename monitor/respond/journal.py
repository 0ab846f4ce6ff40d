"""The respond stage's journal: one SQLite file (WAL) in the state directory holding every incident,
every step run with its state, the outbox of notifications and the detections already handled.

The journal is written before and after each step, so a crash loses nothing and repeats nothing:
a detection seen twice (Kafka redelivers after a crash) joins nothing twice; a finished step never
runs again; a step found ``running`` at start was interrupted and is reconciled; an outbox entry is
retried until delivered or finally refused. Nothing secret is stored: parameters are rendered again
from the playbook whenever a step runs (see ``playbooks``).

Step states: ``pending`` (not reached yet), ``awaiting_approval``, ``running``, ``done``,
``failed``, ``skipped`` (its ``when`` did not hold), ``dry_run`` (shown, not run), ``refused``
(over the destructive budget), ``aborted`` (an earlier step failed with ``on_failure: abort``),
``rejected`` (an operator said no), ``expired`` (the incident closed before approval), ``queued``
(a notification in the outbox), ``delivered``, ``undelivered`` (refused for good, or too old).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS incidents (
    id TEXT PRIMARY KEY,
    playbook TEXT NOT NULL,
    key TEXT NOT NULL,
    state TEXT NOT NULL,              -- open, resolved, limited
    dry_run INTEGER NOT NULL,
    opened_at REAL NOT NULL,
    last_seen REAL NOT NULL,          -- event time of the newest detection joined
    touched_at REAL NOT NULL,         -- wall clock of the newest detection joined (quiet period)
    resolved_at REAL,
    resolved_why TEXT,
    detections INTEGER NOT NULL,
    detection TEXT NOT NULL           -- the first detection, JSON
);
CREATE INDEX IF NOT EXISTS incidents_key ON incidents (key, state);
CREATE INDEX IF NOT EXISTS incidents_playbook ON incidents (playbook, opened_at);
CREATE TABLE IF NOT EXISTS steps (
    incident_id TEXT NOT NULL REFERENCES incidents (id),
    step_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    action TEXT NOT NULL,
    destructive INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    detail TEXT,                      -- JSON: what the action reported, or the shown parameters
    error TEXT,
    started_at REAL,
    finished_at REAL,
    decided_by TEXT,                  -- who approved or rejected
    spec_hash TEXT,                   -- the step's definition when the incident opened
    PRIMARY KEY (incident_id, step_id)
);
CREATE INDEX IF NOT EXISTS steps_state ON steps (state);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    purpose TEXT NOT NULL,            -- run or resolve
    state TEXT NOT NULL,              -- queued, delivered, failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    created_at REAL NOT NULL,
    delivered_at REAL,
    error TEXT,
    UNIQUE (incident_id, step_id, purpose)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_at);
CREATE TABLE IF NOT EXISTS seen (
    detection_id TEXT NOT NULL,
    playbook TEXT NOT NULL,
    incident_id TEXT,
    at REAL NOT NULL,
    PRIMARY KEY (detection_id, playbook)
);
CREATE TABLE IF NOT EXISTS destructive_runs (at REAL NOT NULL);
"""


class Journal:
    """Thread-safe access to the journal file; every method is one transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged step survives a power cut
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(steps)")}
        if "spec_hash" not in columns:  # a journal written before step definitions were pinned
            self._db.execute("ALTER TABLE steps ADD COLUMN spec_hash TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ transactions

    def _tx(self) -> "_Transaction":
        return _Transaction(self)

    def _all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(row) for row in self._db.execute(sql, args).fetchall()]

    def _one(self, sql: str, args: tuple = ()) -> dict[str, Any] | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    # ------------------------------------------------------------ detections and incidents

    def seen(self, detection_id: str, playbook: str) -> bool:
        return self._one("SELECT 1 AS x FROM seen WHERE detection_id = ? AND playbook = ?",
                         (detection_id, playbook)) is not None

    def open_incident_for(self, key: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM incidents WHERE key = ? AND state = 'open' ORDER BY opened_at DESC LIMIT 1",
                         (key,))

    def last_resolved_for(self, key: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM incidents WHERE key = ? AND state = 'resolved' "
                         "ORDER BY resolved_at DESC LIMIT 1", (key,))

    def runs_since(self, playbook: str, since: float) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM incidents WHERE playbook = ? AND state != 'limited' "
                        "AND opened_at >= ?", (playbook, since))
        return int(row["n"]) if row else 0

    def join(self, incident_id: str, detection_id: str, playbook: str, ts: float, now: float) -> bool:
        """A detection joins an incident still open (same dedup key); False when it closed meanwhile."""
        with self._tx() as db:
            joined = db.execute("UPDATE incidents SET detections = detections + 1, last_seen = MAX(last_seen, ?), "
                                "touched_at = ? WHERE id = ? AND state = 'open'", (ts, now, incident_id)).rowcount
            if joined:
                db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?)", (detection_id, playbook, incident_id, now))
        return bool(joined)

    def mark_seen(self, detection_id: str, playbook: str, now: float, incident_id: str | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?)", (detection_id, playbook, incident_id, now))

    def open(self, incident_id: str, playbook: str, key: str, detection: dict[str, Any], dry_run: bool,
             steps: list[tuple[str, str, bool, str]], now: float, state: str = "open") -> None:
        """A new incident with its steps (id, action, destructive, spec hash) all ``pending``, in one
        transaction."""
        with self._tx() as db:
            db.execute("INSERT INTO incidents (id, playbook, key, state, dry_run, opened_at, last_seen, touched_at, "
                       "detections, detection) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
                       (incident_id, playbook, key, state, int(dry_run), now, float(detection.get("ts") or now), now,
                        json.dumps(detection)))
            db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?)",
                       (detection["detection_id"], playbook, incident_id, now))
            for position, (step_id, action, destructive, spec_hash) in enumerate(steps):
                db.execute("INSERT INTO steps (incident_id, step_id, position, action, destructive, state, spec_hash) "
                           "VALUES (?, ?, ?, ?, ?, 'pending', ?)", (incident_id, step_id, position, action,
                                                                    int(destructive), spec_hash))

    def incident(self, incident_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM incidents WHERE id = ?", (incident_id,))
        if row:
            row["detection"] = json.loads(row["detection"])
        return row

    def incidents(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = "SELECT * FROM incidents" + (" WHERE state = ?" if state else "") + " ORDER BY opened_at DESC LIMIT ?"
        rows = self._all(sql, ((state,) if state else ()) + (limit,))
        for row in rows:
            row["detection"] = json.loads(row["detection"])
        return rows

    def quiet_incidents(self, playbook: str, touched_before: float) -> list[dict[str, Any]]:
        return self._all("SELECT id FROM incidents WHERE playbook = ? AND state = 'open' AND touched_at < ?",
                         (playbook, touched_before))

    def open_playbooks(self) -> list[str]:
        return [row["playbook"] for row in self._all("SELECT DISTINCT playbook FROM incidents WHERE state = 'open'")]

    def resolve(self, incident_id: str, why: str, now: float) -> bool:
        """Close an open incident; steps still awaiting approval expire. False when it was not open."""
        with self._tx() as db:
            changed = db.execute("UPDATE incidents SET state = 'resolved', resolved_at = ?, resolved_why = ? "
                                 "WHERE id = ? AND state = 'open'", (now, why, incident_id)).rowcount
            if changed:
                db.execute("UPDATE steps SET state = 'expired', finished_at = ? WHERE incident_id = ? "
                           "AND state IN ('awaiting_approval', 'pending', 'approved')", (now, incident_id))
        return bool(changed)

    # ------------------------------------------------------------ steps

    def steps(self, incident_id: str) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM steps WHERE incident_id = ? ORDER BY position", (incident_id,))
        for row in rows:
            row["detail"] = json.loads(row["detail"]) if row["detail"] else None
        return rows

    def step(self, incident_id: str, step_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM steps WHERE incident_id = ? AND step_id = ?", (incident_id, step_id))
        if row:
            row["detail"] = json.loads(row["detail"]) if row["detail"] else None
        return row

    def set_step(self, incident_id: str, step_id: str, state: str, *, detail: Any = None, error: str | None = None,
                 now: float | None = None, started: bool = False, attempt: bool = False,
                 decided_by: str | None = None, expect: tuple[str, ...] | None = None,
                 open_only: bool = False) -> bool:
        """Move a step to ``state``; with ``expect``, only from one of those states, with ``open_only``
        only while its incident is open (False otherwise: someone else moved first)."""
        now = time.time() if now is None else now
        sets = ["state = ?"]
        args: list[Any] = [state]
        if detail is not None:
            sets.append("detail = ?")
            args.append(json.dumps(detail, default=str))
        if error is not None:
            sets.append("error = ?")
            args.append(error)
        if started:
            sets.append("started_at = ?")
            args.append(now)
        if attempt:
            sets.append("attempts = attempts + 1")
        if decided_by is not None:
            sets.append("decided_by = ?")
            args.append(decided_by)
        if state in ("done", "failed", "skipped", "dry_run", "refused", "aborted", "rejected", "expired",
                     "delivered", "undelivered"):
            sets.append("finished_at = ?")
            args.append(now)
        where = "incident_id = ? AND step_id = ?"
        args += [incident_id, step_id]
        if expect:
            where += f" AND state IN ({', '.join('?' * len(expect))})"
            args += list(expect)
        if open_only:
            where += " AND EXISTS (SELECT 1 FROM incidents i WHERE i.id = steps.incident_id AND i.state = 'open')"
        with self._tx() as db:
            return bool(db.execute(f"UPDATE steps SET {', '.join(sets)} WHERE {where}", args).rowcount)

    def delivered_in_open_incidents(self) -> list[dict[str, Any]]:
        rows = self._all("SELECT s.* FROM steps s JOIN incidents i ON i.id = s.incident_id "
                         "WHERE i.state = 'open' AND s.state = 'delivered'")
        for row in rows:
            row["detail"] = json.loads(row["detail"]) if row["detail"] else None
        return rows

    def awaiting_approval(self) -> list[dict[str, Any]]:
        return self._all("SELECT s.incident_id, s.step_id, s.action, s.started_at, i.playbook, i.key, i.detection "
                         "FROM steps s JOIN incidents i ON i.id = s.incident_id "
                         "WHERE s.state = 'awaiting_approval' ORDER BY s.started_at")

    def unfinished(self) -> list[str]:
        """Open incidents with a step still to run or interrupted while running."""
        rows = self._all("SELECT DISTINCT s.incident_id FROM steps s JOIN incidents i ON i.id = s.incident_id "
                         "WHERE i.state = 'open' AND s.state IN ('pending', 'running', 'approved') "
                         "ORDER BY i.opened_at")
        return [row["incident_id"] for row in rows]

    # ------------------------------------------------------------ destructive budget

    def take_destructive(self, now: float, per_hour: int) -> int | None:
        """Count one destructive run if fewer than ``per_hour`` ran in the last hour (one transaction,
        so concurrent workers cannot all pass); None when taken, else how many ran."""
        with self._tx() as db:
            used = db.execute("SELECT COUNT(*) FROM destructive_runs WHERE at >= ?", (now - 3600,)).fetchone()[0]
            if used >= per_hour:
                return int(used)
            db.execute("INSERT INTO destructive_runs VALUES (?)", (now,))
            db.execute("DELETE FROM destructive_runs WHERE at < ?", (now - 7 * 86400,))
        return None

    # ------------------------------------------------------------ outbox

    def queue_notification(self, incident_id: str, step_id: str, from_states: tuple[str, ...], now: float) -> bool:
        """The step becomes ``queued`` and its alert an outbox entry, in one transaction, only while
        the incident is open: a closing incident either sees the entry (and sends its all-clear) or
        the entry is never made."""
        with self._tx() as db:
            moved = db.execute(
                f"UPDATE steps SET state = 'queued', started_at = ? WHERE incident_id = ? AND step_id = ? "
                f"AND state IN ({', '.join('?' * len(from_states))}) "
                "AND EXISTS (SELECT 1 FROM incidents i WHERE i.id = ? AND i.state = 'open')",
                (now, incident_id, step_id, *from_states, incident_id)).rowcount
            if moved:
                db.execute("INSERT OR IGNORE INTO outbox (incident_id, step_id, purpose, state, next_at, created_at) "
                           "VALUES (?, ?, 'run', 'queued', ?, ?)", (incident_id, step_id, now, now))
        return bool(moved)

    def enqueue(self, incident_id: str, step_id: str, purpose: str, now: float) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO outbox (incident_id, step_id, purpose, state, next_at, created_at) "
                       "VALUES (?, ?, ?, 'queued', ?, ?)", (incident_id, step_id, purpose, now, now))

    def due(self, now: float, limit: int = 50) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM outbox WHERE state = 'queued' AND next_at <= ? ORDER BY next_at LIMIT ?",
                         (now, limit))

    def next_due(self) -> float | None:
        row = self._one("SELECT MIN(next_at) AS t FROM outbox WHERE state = 'queued'")
        return row["t"] if row and row["t"] is not None else None

    def outbox(self, incident_id: str | None = None) -> list[dict[str, Any]]:
        if incident_id is None:
            return self._all("SELECT * FROM outbox ORDER BY id")
        return self._all("SELECT * FROM outbox WHERE incident_id = ? ORDER BY id", (incident_id,))

    def delivered(self, entry_id: int, now: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET state = 'delivered', delivered_at = ?, attempts = attempts + 1, error = NULL "
                       "WHERE id = ?", (now, entry_id))

    def retry_later(self, entry_id: int, next_at: float, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1, next_at = ?, error = ? WHERE id = ?",
                       (next_at, error, entry_id))

    def failed(self, entry_id: int, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET state = 'failed', attempts = attempts + 1, error = ? WHERE id = ?",
                       (error, entry_id))

    def forget_before(self, before: float) -> int:
        """Drop closed incidents (resolved or limited) older than ``before``, with their steps, outbox
        entries and handled detections: the journal stays bounded. How many incidents went."""
        with self._tx() as db:
            old = "SELECT id FROM incidents WHERE (state = 'resolved' AND resolved_at < ?) OR (state = 'limited' AND opened_at < ?)"
            db.execute(f"DELETE FROM steps WHERE incident_id IN ({old})", (before, before))
            db.execute(f"DELETE FROM outbox WHERE incident_id IN ({old}) AND state != 'queued'", (before, before))
            gone = db.execute("DELETE FROM incidents WHERE (state = 'resolved' AND resolved_at < ?) "
                              "OR (state = 'limited' AND opened_at < ?)", (before, before)).rowcount
            db.execute("DELETE FROM seen WHERE at < ? AND (incident_id IS NULL OR incident_id NOT IN "
                       "(SELECT id FROM incidents))", (before,))
        return gone

    def counts(self) -> dict[str, int]:
        rows = self._all("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")
        return {row["state"]: int(row["n"]) for row in rows}


class _Transaction:
    def __init__(self, journal: Journal):
        self.journal = journal

    def __enter__(self) -> sqlite3.Connection:
        self.journal._lock.acquire()
        self.journal._db.execute("BEGIN IMMEDIATE")
        return self.journal._db

    def __exit__(self, kind: Any, *_: Any) -> None:
        try:
            self.journal._db.execute("ROLLBACK" if kind else "COMMIT")
        finally:
            self.journal._lock.release()
