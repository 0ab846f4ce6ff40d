"""The respond engine: a detection becomes an incident, an incident runs its playbook's steps, with
the guardrails of DESIGN §5 and everything through the journal.

``handle(detection)`` is durable on return: the detection is matched, deduplicated and recorded (a
new incident and its pending steps, or one more detection of an open one) in the journal before
the caller commits its Kafka offset. The steps then run in worker threads, one incident at a time
per worker, in order:

- a step whose ``when`` does not hold is ``skipped``; in a dry run (global or the playbook's) every
  step is ``dry_run`` with its rendered parameters shown, secrets as ``***``;
- ``approval: required`` stops the incident at ``awaiting_approval`` until an operator approves it
  (admin endpoint or ``inferwatch approve``) or rejects it; the incident closing expires it;
- a destructive step over the global hourly budget is ``refused``;
- a notification is queued in the outbox (``queued``) and delivered by the outbox worker, retried
  with backoff until delivered (``delivered``), refused for good or too old (``undelivered``: the
  steps after it do not wait for it, so its ``on_failure`` does not apply);
- any other step runs now, retried a few times on a transient error; it ends ``done`` or
  ``failed``, and ``on_failure: abort`` then marks the remaining steps ``aborted``.

After a crash, ``recover`` picks up every open incident with steps to go: a step found ``running``
was interrupted; a destructive one is reconciled (its action reads the world) before it could run
again, so it never acts twice. Incidents close after their playbook's quiet period (``resolve.after``)
or by hand; notifications then send their all-clear.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

from monitor.ops import logs
from monitor.respond import delivery
from monitor.respond import playbooks as pb
from monitor.respond.actions.base import Action, Final, Incident, Services, Transient
from monitor.respond.journal import Journal

log = logging.getLogger("inferwatch.respond")

STEP_RETRIES = 3  # a non-notifying step's attempts on transient errors before it fails
STEP_RETRY_CAP = 30.0  # seconds: the longest wait between them
DONE_STATES = ("done", "skipped", "dry_run", "queued", "delivered")


class Responder:
    def __init__(self, playbook_dir: str | Path, journal: Journal, services: Services, *,
                 dry_run: bool = False, max_destructive_per_hour: int = 10, outbox_max_age: float = 86400.0,
                 retention: float = 30 * 86400.0,
                 workers: int = 4, metrics: Any = None, require_env: bool = True,
                 clock: Callable[[], float] = time.time):
        self.playbook_dir = Path(playbook_dir)
        self.journal = journal
        self.services = services
        self.dry_run = dry_run
        self.max_destructive_per_hour = max_destructive_per_hour
        self.outbox_max_age = outbox_max_age
        self.retention = retention
        self._last_forget = 0.0
        self.metrics = metrics
        self.require_env = require_env
        self.clock = clock
        self.services.now = clock
        self.playbooks = pb.load(self.playbook_dir, require_env=require_env, dry_run=dry_run)
        # Every step version loaded in this process, by (playbook, step id, digest): an incident runs
        # the steps it opened with, even after a reload changed or removed them.
        self._versions: dict[tuple[str, str, str], pb.CompiledStep] = {}
        self._books: dict[str, pb.Playbook] = {}  # the newest version of every playbook loaded
        self._remember(self.playbooks)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._scheduled = 0  # incidents queued or being advanced (idle when 0)
        self._deliver_lock = threading.Lock()  # one delivery pass at a time: an entry is sent once
        self._stopping = threading.Event()
        self._wake_outbox = threading.Event()
        self._threads: list[threading.Thread] = []
        self._workers = workers
        self._failed_files = pb.PlaybookSet()
        self._count_loaded()

    # ------------------------------------------------------------ life cycle

    def start(self) -> "Responder":
        for n in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"respond-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        outbox = threading.Thread(target=self._deliver_loop, name="respond-outbox", daemon=True)
        outbox.start()
        self._threads.append(outbox)
        self.recover()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake_outbox.set()
        for _ in range(self._workers):
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [thread for thread in self._threads if thread.is_alive()]

    def idle(self) -> bool:
        """No incident waiting for or in a worker (tests, replays and the file mode wait for this)."""
        with self._busy_lock:
            return self._scheduled == 0

    def wait_idle(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.02)
        return self.idle()

    def run_queued(self) -> None:
        """Advance every queued incident in the calling thread, in order (a replay runs no workers, so
        that its decisions come in one order every time)."""
        while True:
            try:
                incident_id = self._queue.get_nowait()
            except queue.Empty:
                return
            if incident_id is not None:
                self._advance_one(incident_id)

    def recover(self) -> None:
        """Queue every open incident with a step still to run (after a restart)."""
        for incident_id in self.journal.unfinished():
            self._schedule(incident_id)
        self._wake_outbox.set()

    def reload(self) -> tuple[bool, str]:
        """Load the playbooks again; on any error keep the current set and say why."""
        try:
            fresh = pb.load(self.playbook_dir, require_env=self.require_env, dry_run=self.dry_run)
        except pb.PlaybookError as exc:
            log.error("playbook reload failed, keeping the %d loaded playbooks: %s", len(self.playbooks.playbooks), exc)
            self._count("playbook_reloads", outcome="failed")
            return False, str(exc)
        self.playbooks = fresh
        self._remember(fresh)
        self._count("playbook_reloads", outcome="loaded")
        self._count_loaded()
        names = ", ".join(b.name for b in fresh.playbooks) or "none"
        log.info("playbooks reloaded: %s", names)
        return True, f"{len(fresh.playbooks)} playbooks: {names}"

    def reload_if_changed(self) -> None:
        if pb.changed(self.playbook_dir, self.playbooks) and pb.changed(self.playbook_dir, self._failed_files):
            ok, _ = self.reload()
            # A broken file is reported once, not every check, until it changes again.
            self._failed_files = pb.PlaybookSet([], pb.file_times(self.playbook_dir)) if not ok else pb.PlaybookSet()

    def _remember(self, books: pb.PlaybookSet) -> None:
        for book in books.playbooks:
            self._books[book.name] = book
            for step in book.steps:
                self._versions[(book.name, step.id, step.digest)] = step

    # ------------------------------------------------------------ detections

    def handle(self, detection: dict[str, Any]) -> list[str]:
        """Match, deduplicate and record one detection; the incident ids it opened or joined.

        A playbook that fails on this detection (its dedup key does not render for it) is logged and
        counted, and the others still run; a journal error (disk full) propagates, so the caller does
        not commit the detection's offset."""
        touched = []
        for book in self.playbooks.matching(detection):
            try:
                touched.extend(self._handle_one(book, detection))
            except sqlite3.Error:
                raise
            except Exception as exc:  # noqa: BLE001 - a template failing on this detection
                log.error("playbook %s cannot handle detection %s: %s", book.name, detection.get("detection_id"),
                          logs.scrub(f"{type(exc).__name__}: {exc}"))
                self._count("incidents", playbook=book.name, outcome="error")
                self.journal.mark_seen(str(detection.get("detection_id")), book.name, self.clock())
        return touched

    def _handle_one(self, book: pb.Playbook, detection: dict[str, Any]) -> list[str]:
        now = self.clock()
        detection_id = str(detection.get("detection_id"))
        if self.journal.seen(detection_id, book.name):
            return []  # redelivered after a crash, or replayed: already handled
        key = book.dedup_key(pb.template_context(detection, playbook=book.name))
        current = self.journal.open_incident_for(key)
        if current is not None and self.journal.join(current["id"], detection_id, book.name,
                                                     float(detection.get("ts") or now), now):
            self._count("incidents", playbook=book.name, outcome="joined")
            return [current["id"]]
        last = self.journal.last_resolved_for(key)
        if last is not None and now - last["resolved_at"] < book.cooldown:
            self.journal.mark_seen(detection_id, book.name, now, last["id"])
            self._count("incidents", playbook=book.name, outcome="cooldown")
            return []
        incident_id = _incident_id(book.name, key, detection_id)
        limited = self.journal.runs_since(book.name, now - book.limit_window) >= book.spec.limits.max_runs
        steps = [(s.id, s.spec.action, type(s.action).destructive, s.digest) for s in book.steps]
        self.journal.open(incident_id, book.name, key, detection, self.dry_run or book.spec.dry_run, steps, now,
                          state="limited" if limited else "open")
        if limited:
            log.warning("playbook %s is over its budget of %d runs per %g s: incident %s recorded, not run",
                        book.name, book.spec.limits.max_runs, book.limit_window, incident_id)
            self._count("incidents", playbook=book.name, outcome="limited")
            return []
        log.info("incident %s opened by playbook %s (key %s)", incident_id, book.name, key,
                 extra={"incident": incident_id, "playbook": book.name})
        self._count("incidents", playbook=book.name, outcome="opened")
        self._schedule(incident_id)
        return [incident_id]

    # ------------------------------------------------------------ operators

    def pending(self) -> list[dict[str, Any]]:
        return [{"incident": row["incident_id"], "step": row["step_id"], "action": row["action"],
                 "playbook": row["playbook"], "key": row["key"], "waiting_since": row["started_at"]}
                for row in self.journal.awaiting_approval()]

    def decide(self, incident_id: str, step_id: str, approve: bool, who: str) -> tuple[bool, str]:
        """Approve (or reject) a step awaiting approval."""
        step = self.journal.step(incident_id, step_id)
        if step is None:
            return False, f"no step {step_id!r} in incident {incident_id!r}"
        if step["state"] != "awaiting_approval":
            return False, f"step {step_id!r} of incident {incident_id!r} is {step['state']}, not awaiting approval"
        state = "approved" if approve else "rejected"
        if not self.journal.set_step(incident_id, step_id, state, decided_by=who, now=self.clock(),
                                     expect=("awaiting_approval",)):
            return False, "decided meanwhile by someone else"
        log.info("step %s of incident %s %s by %s", step_id, incident_id, state, who)
        if not approve:
            self._abort_rest(incident_id, "rejected by an operator")
        self._schedule(incident_id)
        return True, f"step {step_id} of incident {incident_id} {state}"

    def resolve(self, incident_id: str, why: str = "resolved by an operator") -> bool:
        if not self.journal.resolve(incident_id, why, self.clock()):
            return False
        self._after_resolve(incident_id, why)
        return True

    # ------------------------------------------------------------ periodic

    def tick(self) -> None:
        """Close quiet incidents; the scheduler calls this every few seconds."""
        now = self.clock()
        for book in list(self._books.values()):
            for row in self.journal.quiet_incidents(book.name, now - book.resolve_after):
                if self.journal.resolve(row["id"], f"quiet for {book.resolve_after:g} s", now):
                    self._after_resolve(row["id"], "quiet")
        self._refresh_open(now)
        for name in self.journal.open_playbooks():
            if name not in self._books:  # removed before a restart: nothing left to run its steps with
                for row in self.journal.quiet_incidents(name, now):
                    if self.journal.resolve(row["id"], "its playbook is no longer loaded", now):
                        log.warning("incident %s closed: playbook %s is no longer loaded (no all-clear sent)",
                                    row["id"], name)
        if now - self._last_forget > 3600:  # once an hour: closed incidents past the retention go
            self._last_forget = now
            gone = self.journal.forget_before(now - self.retention)
            if gone:
                log.info("journal: forgot %d incidents closed more than %g days ago", gone, self.retention / 86400)
        if self.metrics is not None:
            counts = self.journal.counts()
            self.metrics.outbox_queued.set(counts.get("queued", 0))
            self.metrics.approvals_pending.set(len(self.journal.awaiting_approval()))

    def _refresh_open(self, now: float) -> None:
        """Notifications that need keeping alive while their incident is open (Alertmanager's endsAt)."""
        for step_row in self.journal.delivered_in_open_incidents():
            incident = self.journal.incident(step_row["incident_id"])
            step = self._step(incident["playbook"], step_row) if incident else None
            if step is None or type(step.action).refresh is Action.refresh or self._dry(incident):
                continue
            try:
                params = step.render(self._context(incident))
                detail = step.action.refresh(params, self._incident(incident), self.services, step_row["detail"] or {})
            except (Transient, Final) as exc:
                log.warning("incident %s step %s: keeping the alert alive failed (%s); tried again",
                            incident["id"], step.id, logs.scrub(str(exc)))
                continue
            if detail is not None:
                self.journal.set_step(incident["id"], step.id, "delivered", detail=detail, now=now,
                                      expect=("delivered",))

    def _after_resolve(self, incident_id: str, why: str) -> None:
        incident = self.journal.incident(incident_id)
        log.info("incident %s resolved (%s)", incident_id, why, extra={"incident": incident_id})
        self._count("incidents", playbook=incident["playbook"] if incident else "", outcome="resolved")
        if incident is None or incident["dry_run"] or self.dry_run:
            return
        book = self._books.get(incident["playbook"])
        if book is not None and not book.spec.resolve.notify:
            return
        sent = {row["step_id"] for row in self.journal.outbox(incident_id) if row["purpose"] == "run"
                and row["state"] != "failed"}
        for step_row in self.journal.steps(incident_id):
            step = self._step(incident["playbook"], step_row)
            if step_row["step_id"] in sent and step is not None and type(step.action).notifies:
                self.journal.enqueue(incident_id, step.id, "resolve", self.clock())
        self._wake_outbox.set()

    # ------------------------------------------------------------ running steps

    def _schedule(self, incident_id: str) -> None:
        with self._busy_lock:
            self._scheduled += 1
        self._queue.put(incident_id)

    def _work(self) -> None:
        while True:
            incident_id = self._queue.get()
            if incident_id is None:
                return
            with self._busy_lock:
                if incident_id in self._busy:  # another worker has it: come back to it after
                    requeue = not self._stopping.is_set()
                    if not requeue:
                        self._scheduled -= 1
                else:
                    self._busy.add(incident_id)
                    requeue = None
            if requeue is not None:
                if requeue:
                    self._queue.put(incident_id)
                    time.sleep(0.01)
                continue
            self._advance_one(incident_id)

    def _advance_one(self, incident_id: str) -> None:
        """Advance one queued incident; an engine bug is logged, not raised (the others go on)."""
        try:
            self._advance(incident_id)
        except Exception:
            log.exception("respond: incident %s failed in the engine (a bug)", incident_id)
        finally:
            with self._busy_lock:
                self._busy.discard(incident_id)
                self._scheduled -= 1

    def _incident(self, row: dict[str, Any]) -> Incident:
        return Incident(id=row["id"], playbook=row["playbook"], key=row["key"], opened_at=row["opened_at"],
                        detection=row["detection"], detections=row["detections"])

    def _context(self, row: dict[str, Any]) -> dict[str, Any]:
        return pb.template_context(row["detection"], {"id": row["id"], "key": row["key"], "playbook": row["playbook"],
                                                      "opened_at": row["opened_at"], "detections": row["detections"]},
                                   row["playbook"])

    def _step(self, playbook: str, step_row: dict[str, Any]) -> pb.CompiledStep | None:
        """The step as it was when the incident opened (any version loaded in this process); None
        when that version is gone (changed or removed before a restart)."""
        digest = step_row.get("spec_hash")
        if digest is None:  # a journal from before steps were pinned
            book = self.playbooks.get(playbook)
            return next((s for s in book.steps if s.id == step_row["step_id"]), None) if book else None
        return self._versions.get((playbook, step_row["step_id"], digest))

    def _dry(self, row: dict[str, Any]) -> bool:
        """Dry now: the incident opened dry, or the global or the playbook's dry run is on now."""
        book = self.playbooks.get(row["playbook"])
        return bool(row["dry_run"] or self.dry_run or (book is not None and book.spec.dry_run))

    def _advance(self, incident_id: str) -> None:
        while not self._stopping.is_set():
            row = self.journal.incident(incident_id)
            if row is None or row["state"] != "open":
                return
            context = self._context(row)
            for step_row in self.journal.steps(incident_id):
                state = step_row["state"]
                if state in DONE_STATES or state in ("rejected", "aborted", "expired", "undelivered"):
                    continue
                if state in ("refused", "failed"):
                    step = self._step(row["playbook"], step_row)
                    if step is None or step.spec.on_failure == "abort":
                        return
                    continue
                if state == "awaiting_approval":
                    return
                step = self._step(row["playbook"], step_row)
                if step is None:
                    message = ("the playbook changed or was removed since the incident opened; the step is not run "
                               "(it may differ from what was shown or approved)")
                    self.journal.set_step(incident_id, step_row["step_id"], "failed", error=message,
                                          now=self.clock(), expect=(state,))
                    log.error("incident %s step %s: %s", incident_id, step_row["step_id"], message)
                    self._abort_rest(incident_id, f"step {step_row['step_id']} could not run")
                    return
                if not self._run_step(row, step, step_row, context):
                    return
                break  # re-read the incident and its steps: another thread may have moved them
            else:
                return

    def _run_step(self, row: dict[str, Any], step: pb.CompiledStep, step_row: dict[str, Any],
                  context: dict[str, Any]) -> bool:
        """Take one step as far as it goes now; False when the incident must stop here (a gate, a
        failure that aborts, the incident closed or the step moved by another thread)."""
        incident_id, now = row["id"], self.clock()
        action = step.action
        destructive, notifies = type(action).destructive, type(action).notifies
        state = step_row["state"]
        if state == "pending":
            if not step.applies(row["detection"]):
                self._count("steps", action=step.spec.action, state="skipped")
                return self.journal.set_step(incident_id, step.id, "skipped", now=now, expect=("pending",),
                                             open_only=True)
            if self._dry(row):
                shown = self._shown(step, context)
                if not self.journal.set_step(incident_id, step.id, "dry_run", detail=shown, now=now,
                                             expect=("pending",), open_only=True):
                    return False
                log.info("dry run: incident %s step %s would run %s", incident_id, step.id, step.spec.action,
                         extra={"incident": incident_id, "step": step.id, "params": shown})
                self._count("steps", action=step.spec.action, state="dry_run")
                return True
            if step.spec.approval == "required":
                if self.journal.set_step(incident_id, step.id, "awaiting_approval", started=True, now=now,
                                         detail=self._shown(step, context), expect=("pending",), open_only=True):
                    log.warning("incident %s: step %s (%s) awaits approval: inferwatch approve %s %s", incident_id,
                                step.id, step.spec.action, incident_id, step.id,
                                extra={"incident": incident_id, "step": step.id})
                    self._count("steps", action=step.spec.action, state="awaiting_approval")
                return False
        elif state == "approved" and self._dry(row):
            # A dry run switched on after the approval: show, do not act.
            return self.journal.set_step(incident_id, step.id, "dry_run", detail=self._shown(step, context), now=now,
                                         expect=("approved",), open_only=True)
        if notifies:
            if not self.journal.queue_notification(incident_id, step.id, (state,), now):
                return False
            self._wake_outbox.set()
            self._count("steps", action=step.spec.action, state="queued")
            return True
        incident = self._incident(row)
        try:
            params = step.render(context)
        except Exception as exc:  # noqa: BLE001 - a template failing on this detection, a missing variable
            return self._finish_failed(incident_id, step, f"parameters: {logs.scrub(str(exc))}", expect=(state,))
        if state == "running":  # interrupted by a crash: read the world before acting again
            if destructive:
                try:
                    found = action.reconcile(params, incident, self.services, step_row["detail"] or {})
                except (Transient, Final) as exc:
                    found = None
                    log.warning("incident %s step %s: reconcile failed (%s); running it again", incident_id,
                                step.id, logs.scrub(str(exc)))
                if found is not None:
                    self.journal.set_step(incident_id, step.id, "done", detail={**found, "reconciled": True},
                                          now=self.clock(), expect=("running",))
                    log.info("incident %s step %s: found done after a restart", incident_id, step.id)
                    self._count("steps", action=step.spec.action, state="done")
                    return True
        elif destructive:
            used = self.journal.take_destructive(now, self.max_destructive_per_hour)
            if used is not None:
                message = (f"refused: {used} destructive actions in the last hour reach the budget "
                           f"(respond.max_destructive_per_hour: {self.max_destructive_per_hour})")
                if not self.journal.set_step(incident_id, step.id, "refused", error=message, now=now,
                                             expect=(state,), open_only=True):
                    return False
                log.error("incident %s step %s %s", incident_id, step.id, message)
                self._count("steps", action=step.spec.action, state="refused")
                return not self._fail(incident_id, step)
        # From here the step acts: only while the incident is open and nobody else moved the step.
        if not self.journal.set_step(incident_id, step.id, "running", started=True, now=now, expect=(state,),
                                     open_only=True):
            return False
        error = ""
        for attempt in range(1, STEP_RETRIES + 1):
            self.journal.set_step(incident_id, step.id, "running", attempt=True, now=self.clock())
            try:
                detail = action.run(params, incident, self.services)
            except Transient as exc:
                error = logs.scrub(str(exc))
                if self._stopping.is_set():
                    return False  # left running: reconciled (destructive) or run again after the restart
                if attempt < STEP_RETRIES:
                    wait = min(STEP_RETRY_CAP, exc.retry_after if exc.retry_after is not None
                               else delivery.backoff(attempt))
                    log.warning("incident %s step %s: %s; retry %d in %.1f s", incident_id, step.id, error,
                                attempt, wait)
                    if self._stopping.wait(wait):
                        return False
                    continue
                break
            except Final as exc:
                error = logs.scrub(str(exc))
                break
            except Exception as exc:  # noqa: BLE001 - an action's bug must not stop the engine
                log.exception("incident %s step %s: action %s raised", incident_id, step.id, step.spec.action)
                error = f"{type(exc).__name__}: {logs.scrub(str(exc))}"
                break
            # Done is recorded even if the incident closed meanwhile: the action happened.
            self.journal.set_step(incident_id, step.id, "done", detail=detail, now=self.clock(), expect=("running",))
            log.info("incident %s step %s (%s) done", incident_id, step.id, step.spec.action,
                     extra={"incident": incident_id, "step": step.id, "detail": detail})
            self._count("steps", action=step.spec.action, state="done")
            return True
        return self._finish_failed(incident_id, step, error, expect=("running",))

    def _finish_failed(self, incident_id: str, step: pb.CompiledStep, error: str,
                       expect: tuple[str, ...] | None = None) -> bool:
        if not self.journal.set_step(incident_id, step.id, "failed", error=error, now=self.clock(), expect=expect):
            return False
        log.error("incident %s step %s (%s) failed: %s", incident_id, step.id, step.spec.action, error,
                  extra={"incident": incident_id, "step": step.id})
        self._count("steps", action=step.spec.action, state="failed")
        return not self._fail(incident_id, step)

    def _fail(self, incident_id: str, step: pb.CompiledStep) -> bool:
        """After a failed or refused step: True when the incident stops (on_failure: abort)."""
        if step.spec.on_failure != "abort":
            return False
        self._abort_rest(incident_id, f"step {step.id} failed (on_failure: abort)")
        return True

    def _abort_rest(self, incident_id: str, why: str) -> None:
        for step_row in self.journal.steps(incident_id):
            if step_row["state"] in ("pending", "awaiting_approval", "approved"):
                self.journal.set_step(incident_id, step_row["step_id"], "aborted", error=why, now=self.clock(),
                                      expect=("pending", "awaiting_approval", "approved"))

    def _shown(self, step: pb.CompiledStep, context: dict[str, Any]) -> dict[str, Any]:
        try:
            return step.shown(context)
        except Exception as exc:  # noqa: BLE001
            return {"error": logs.scrub(str(exc))}

    # ------------------------------------------------------------ outbox

    def _deliver_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.deliver_due()
            except Exception:
                log.exception("respond: outbox delivery failed (a bug)")
            next_at = self.journal.next_due()
            wait = 5.0 if next_at is None else min(5.0, max(0.0, next_at - self.clock()))
            self._wake_outbox.wait(wait)
            self._wake_outbox.clear()

    def deliver_due(self) -> int:
        """Deliver every due outbox entry once; how many were delivered. One pass at a time (the
        outbox thread and a file run's end both call it): an entry is never sent twice at once."""
        delivered = 0
        with self._deliver_lock:
            for entry in self.journal.due(self.clock()):
                if self._stopping.is_set():
                    break
                try:
                    delivered += self._deliver(entry)
                except sqlite3.Error:
                    log.exception("respond: the journal failed delivering outbox entry %s; retrying later",
                                  entry["id"])
                    break
        return delivered

    def _deliver(self, entry: dict[str, Any]) -> int:
        incident_id, step_id, purpose = entry["incident_id"], entry["step_id"], entry["purpose"]
        now = self.clock()
        row = self.journal.incident(incident_id)
        step_row = self.journal.step(incident_id, step_id) if row else None
        step = self._step(row["playbook"], step_row) if step_row else None
        if row is None or step is None:
            self.journal.failed(entry["id"], "the playbook changed or was removed since the incident opened")
            if step_row is not None and purpose == "run":
                self.journal.set_step(incident_id, step_id, "undelivered", now=now, expect=("queued",),
                                      error="the playbook changed or was removed since the incident opened")
            return 0
        if self._dry(row):  # a dry run switched on since the alert was queued: nothing leaves
            self.journal.failed(entry["id"], "not sent: dry run")
            if purpose == "run":
                self.journal.set_step(incident_id, step_id, "dry_run", now=now, expect=("queued",),
                                      detail=self._shown(step, self._context(row)))
            return 0
        if purpose == "resolve":
            trigger = next((e for e in self.journal.outbox(incident_id)
                            if e["step_id"] == step_id and e["purpose"] == "run"), None)
            if trigger is not None and trigger["state"] == "queued":  # all-clear after the alert, never before
                self.journal.retry_later(entry["id"], max(now + 1.0, trigger["next_at"] + 0.5), "after its alert")
                return 0
            if trigger is not None and trigger["state"] == "failed":
                self.journal.failed(entry["id"], "its alert was never delivered")
                return 0
        action = step.action
        try:
            params = step.render(self._context(row))
            incident = self._incident(row)
            detail = (action.run if purpose == "run" else action.resolve)(params, incident, self.services)
        except Transient as exc:
            error = logs.scrub(str(exc))
            if now - entry["created_at"] > self.outbox_max_age:
                return self._undeliverable(entry, step, f"{error}; gave up after {self.outbox_max_age:g} s")
            wait = exc.retry_after if exc.retry_after is not None else delivery.backoff(entry["attempts"] + 1)
            self.journal.retry_later(entry["id"], now + wait, error)
            log.warning("incident %s step %s (%s %s): %s; retry in %.1f s", incident_id, step_id, step.spec.action,
                        purpose, error, wait)
            self._count("notifications", action=step.spec.action, outcome="retried")
            return 0
        except Final as exc:
            return self._undeliverable(entry, step, logs.scrub(str(exc)))
        except Exception as exc:  # noqa: BLE001 - a template failing, an action's bug
            log.exception("incident %s step %s: %s failed", incident_id, step_id, step.spec.action)
            return self._undeliverable(entry, step, f"{type(exc).__name__}: {logs.scrub(str(exc))}")
        self.journal.delivered(entry["id"], self.clock())
        if purpose == "run":
            self.journal.set_step(incident_id, step_id, "delivered", detail=detail, now=self.clock(), expect=("queued",))
        log.info("incident %s step %s (%s %s) delivered", incident_id, step_id, step.spec.action, purpose,
                 extra={"incident": incident_id, "step": step_id})
        self._count("notifications", action=step.spec.action, outcome="delivered")
        return 1

    def _undeliverable(self, entry: dict[str, Any], step: pb.CompiledStep, error: str) -> int:
        self.journal.failed(entry["id"], error)
        if entry["purpose"] == "run":
            # Not "failed": the steps after it have run already; on_failure is about steps that act.
            self.journal.set_step(entry["incident_id"], step.id, "undelivered", error=error, now=self.clock(),
                                  expect=("queued",))
        log.error("incident %s step %s (%s %s) not delivered: %s", entry["incident_id"], step.id, step.spec.action,
                  entry["purpose"], error)
        self._count("notifications", action=step.spec.action, outcome="failed")
        return 0

    # ------------------------------------------------------------ metrics

    def _count(self, name: str, **labels: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, f"respond_{name}").labels(**labels).inc()

    def _count_loaded(self) -> None:
        if self.metrics is not None:
            self.metrics.playbooks_loaded.set(len(self.playbooks.playbooks))


def _incident_id(playbook: str, key: str, detection_id: str) -> str:
    """Stable for the same first detection: a replay or a redelivery opens the same incident id."""
    return hashlib.sha256(f"{playbook}\x1f{key}\x1f{detection_id}".encode()).hexdigest()[:20]
