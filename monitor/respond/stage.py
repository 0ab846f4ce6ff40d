"""Stage 2 in the daemon: the Responder fed from the detections topic (its own consumer group, so
one replica owns a model's incidents: detections are keyed by model), or from the detect stage
directly when the daemon reads files; its periodic work on the daemon's scheduler; its admin HTTP
endpoints; hot reload of the playbooks on SIGHUP and on file change.

Offsets of the detections topic are committed only after the detections are in the journal, so a
crash redelivers them and the journal's record of handled detections makes that harmless.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import msgspec

from monitor.config import Config, seconds
from monitor.detections import Detection
from monitor.errors import ConfigError
from monitor.ops.auth import bearer_guard, only
from monitor.ops.http import Response, json_response
from monitor.respond import playbooks as pb
from monitor.respond.actions.base import Services
from monitor.respond.engine import Responder
from monitor.respond.journal import Journal

log = logging.getLogger("inferwatch.respond")

TICK_SECONDS = 5.0  # quiet incidents closed, gauges refreshed
RELOAD_CHECK_SECONDS = 10.0  # the playbook directory looked at for changed files


def kubernetes_factory(config: Config) -> Any:
    """A callable returning a kubernetes ApiClient built on first use, per ``respond.kubernetes``."""
    settings = config.respond.kubernetes
    built: list[Any] = []
    lock = threading.Lock()

    def client() -> Any:
        with lock:
            if built:
                return built[0]
            from kubernetes import client as k8s, config as k8s_config

            mode = settings.mode
            if mode == "auto":
                mode = "in_cluster" if os.environ.get("KUBERNETES_SERVICE_HOST") else "kubeconfig"
            try:
                if mode == "in_cluster":
                    k8s_config.load_incluster_config()
                else:
                    k8s_config.load_kube_config(config_file=settings.kubeconfig, context=settings.context)
            except Exception as exc:  # noqa: BLE001 - the kubernetes loaders raise several types
                from monitor.respond.actions.base import Final

                raise Final(f"no Kubernetes connection ({mode}): {type(exc).__name__}: {exc}") from None
            configuration = k8s.Configuration.get_default_copy()
            # urllib3 would retry a 503 or 429 itself (4 requests, seconds blocked, measured): the
            # engine's retry policy decides instead.
            configuration.retries = False
            built.append(k8s.ApiClient(configuration))
            return built[0]

    return client


class RespondStage:
    def __init__(self, config: Config, metrics: Any, *, events: Any = None, producer: Any = None):
        self.config = config
        self.metrics = metrics
        respond = config.respond
        state_dir = Path(config.state.dir)
        self.journal = Journal(state_dir / "journal.sqlite")
        services = Services(state_dir=state_dir, http_timeout=seconds(respond.http_timeout),
                            kubernetes=kubernetes_factory(config), producer=producer, events=events,
                            extras={"denylist_topic": respond.denylist_topic})
        try:
            self.responder = Responder(respond.playbooks, self.journal, services, dry_run=respond.dry_run,
                                       max_destructive_per_hour=respond.max_destructive_per_hour,
                                       outbox_max_age=seconds(respond.outbox_max_age), workers=respond.workers,
                                       retention=seconds(respond.journal_retention),
                                       metrics=metrics)
        except pb.PlaybookError as exc:
            self.journal.close()
            raise ConfigError(f"{config.source}: $.respond.playbooks: {exc}") from None
        self.stopping = threading.Event()
        self.consumer_thread: threading.Thread | None = None
        self.ready_reason = "starting"
        self.handled = 0

    # ------------------------------------------------------------ life cycle

    def start(self, jobs: Any) -> None:
        self.responder.start()
        jobs.run_every("respond_tick", TICK_SECONDS, self._tick)
        jobs.run_every("playbook_reload_check", RELOAD_CHECK_SECONDS, self.responder.reload_if_changed)
        names = ", ".join(b.name for b in self.responder.playbooks.playbooks) or "none"
        mode = " (dry run)" if self.config.respond.dry_run else ""
        log.info("respond stage: %d playbooks from %s%s: %s", len(self.responder.playbooks.playbooks),
                 self.config.respond.playbooks, mode, names)

    def _tick(self) -> None:
        self.responder.tick()
        try:
            from monitor.respond.actions import block

            block.expire(self.responder.services, self.responder.clock())
        except ImportError:
            pass

    def stop(self) -> None:
        self.stopping.set()
        if self.consumer_thread is not None:
            self.consumer_thread.join(15)
        self.responder.stop(timeout=30)
        if any(thread.is_alive() for thread in self.responder._threads):
            # A step still running (a rollback waiting for its rollout): its thread ends with the
            # process; the journal stays open for it, and a restart reconciles what it was doing.
            log.warning("respond: a step is still running at stop; it will be reconciled after the restart")
            return
        self.journal.close()

    def on_detection(self, detection: Detection) -> None:
        """The detect stage's listener when the daemon reads files (no detections topic)."""
        self.responder.handle(msgspec.to_builtins(detection))

    # ------------------------------------------------------------ Kafka

    def consume_in_background(self) -> None:
        self.consumer_thread = threading.Thread(target=self._consume, name="respond-consumer", daemon=True)
        self.consumer_thread.start()

    def _consume(self) -> None:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        from monitor.sources.kafka import security_settings, wait_for_broker

        kafka = self.config.kafka
        delay = 1.0
        consumer = None
        while not self.stopping.is_set():
            try:
                if consumer is None:
                    # A TCP probe first: a consumer built while the broker is down blocks in its
                    # bootstrap and holds up a stop.
                    self.ready_reason = "waiting for the broker"
                    wait_for_broker(self.config, self.stopping)
                    if self.stopping.is_set():
                        break
                    consumer = KafkaConsumer(
                        kafka.topics.detections, bootstrap_servers=kafka.bootstrap_servers,
                        group_id=self.config.respond.group_id, client_id=f"{kafka.client_id}-respond",
                        enable_auto_commit=False, auto_offset_reset=kafka.auto_offset_reset,
                        session_timeout_ms=kafka.session_timeout_ms, max_poll_interval_ms=kafka.max_poll_interval_ms,
                        **security_settings(self.config))
                    delay = 1.0
                batches = consumer.poll(timeout_ms=500, max_records=500)
                self.ready_reason = "ok" if _reachable(consumer) else "detections topic: broker unreachable"
                self._warn_if_shared(consumer)
                if not batches:
                    continue
                for records in batches.values():
                    for record in records:
                        self._handle_raw(record.value, record)
                consumer.commit()
            except KafkaError as exc:
                self.ready_reason = f"detections consumer: {type(exc).__name__}"
                log.warning("respond: reading the detections topic failed (%s: %s); retrying in %.0f s",
                            type(exc).__name__, exc, delay)
                consumer = _drop(consumer)
                self.stopping.wait(delay)
                delay = min(delay * 2, 30.0)
            except Exception:
                # The journal failed (disk full, locked) or a bug: the batch's offsets are not
                # committed; a new consumer starts again from the last commit.
                log.exception("respond: handling detections failed; reconnecting without committing")
                self.ready_reason = "handling detections failed"
                consumer = _drop(consumer)
                self.stopping.wait(delay)
                delay = min(delay * 2, 30.0)
        _drop(consumer)

    def _warn_if_shared(self, consumer: Any) -> None:
        """Say so (once) when another respond stage reads the detections in this group: each keeps its
        own journal, so after a rebalance moves a model between them its playbooks can run again."""
        if getattr(self, "_warned_shared", False):
            return
        assigned = consumer.assignment()
        if not assigned:
            return
        partitions = consumer.partitions_for_topic(self.config.kafka.topics.detections) or set()
        if len(assigned) < len(partitions):
            log.warning("respond: another respond stage reads the detections topic in group %s (this one has "
                        "%d of its %d partitions); run one: each has its own journal, so a playbook can run "
                        "again for an incident the other opened", self.config.respond.group_id,
                        len(assigned), len(partitions))
            self._warned_shared = True

    def _handle_raw(self, raw: bytes | None, record: Any) -> None:
        try:
            detection = msgspec.json.decode(raw or b"null", type=Detection)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # Not ours to dead-letter (the detect stage wrote it); say where it is and go on.
            log.error("respond: detection at %s[%d]@%d is not a valid detection (%s); skipped",
                      record.topic, record.partition, record.offset, exc)
            self.metrics.respond_incidents.labels(playbook="", outcome="invalid_detection").inc()
            return
        self.responder.handle(msgspec.to_builtins(detection))
        self.handled += 1

    # ------------------------------------------------------------ admin HTTP

    def admin_routes(self, http: Any) -> None:
        """The admin endpoints. Each checks the method, then the bearer token (``monitor.ops.auth``), and
        only then reads the body."""
        authorized = bearer_guard(self.config.respond.admin_token_env)

        def pending(method: str, headers: Any, read_body: Any) -> Response:
            return (only("GET", method) or authorized(headers)
                    or json_response(200, {"pending": self.responder.pending()}))

        def incidents(method: str, headers: Any, read_body: Any) -> Response:
            denied = only("GET", method) or authorized(headers)
            if denied:
                return denied
            rows = self.journal.incidents(limit=100)
            for row in rows:
                row["steps"] = [{k: s[k] for k in ("step_id", "action", "state", "attempts", "error", "decided_by")}
                                for s in self.journal.steps(row["id"])]
            return json_response(200, {"incidents": rows})

        def decide(approve: bool) -> Any:
            def handler(method: str, headers: Any, read_body: Any) -> Response:
                denied = only("POST", method) or authorized(headers)
                if denied:
                    return denied
                body = read_body()
                try:
                    request = json.loads(body or b"{}")
                    incident, step = str(request["incident"]), str(request["step"])
                except (ValueError, KeyError, TypeError):
                    return json_response(400, {"error": 'expected JSON {"incident": ID, "step": STEP, "by": NAME}'})
                if self.journal.step(incident, step) is None:
                    return json_response(404, {"ok": False, "message": f"no step {step!r} in incident {incident!r}"})
                who = str(request.get("by") or "admin-api")[:100]
                ok, message = self.responder.decide(incident, step, approve, who)
                return json_response(200 if ok else 409, {"ok": ok, "message": message})
            return handler

        def reload(method: str, headers: Any, read_body: Any) -> Response:
            denied = only("POST", method) or authorized(headers)
            if denied:
                return denied
            ok, message = self.responder.reload()
            return json_response(200 if ok else 422, {"ok": ok, "message": message})

        http.route_any("/admin/pending", pending)
        http.route_any("/admin/incidents", incidents)
        http.route_any("/admin/approve", decide(True))
        http.route_any("/admin/reject", decide(False))
        http.route_any("/admin/reload", reload)


def _reachable(consumer: Any) -> bool:
    """A connection to some broker is up (kafka-python has no public call for this)."""
    try:
        client = consumer._client
        nodes = [b.node_id if hasattr(b, "node_id") else b.nodeId for b in client.cluster.brokers()]
        return any(client.connected(node) for node in nodes)
    except Exception:  # noqa: BLE001 - another kafka-python: assume reachable
        return True


def _drop(consumer: Any) -> None:
    """Close a consumer without committing (what it read and did not commit is read again)."""
    if consumer is not None:
        try:
            consumer.close(autocommit=False)
        except Exception:  # noqa: BLE001 - closing a broken consumer
            pass
    return None
