"""The detect stage as a long-running process: poll, detect, publish, commit, with health, metrics,
scheduled checkpoints and a clean stop.

The loop's one promise: offsets move only after the outputs of what they cover are durable, and only
together with the detector state that read those events. On Kafka a checkpoint is the commit: the
models' state and one piece per partition (its clients' state, its held events and the offset after
the last record read there) are written, then the offsets are committed (up to the first held event,
so that a replica without the piece reads the held events again). A restart, or the replica a
partition is assigned to after a rebalance, takes the piece over and goes on from its offset (see
README "Scale-out and crash safety"). When the broker is away the loop keeps the batch in hand, retries with backoff
(logged once), reports not-ready, and goes on where it stopped when the broker is back. SIGTERM or
SIGINT finishes the batch, checkpoints (and so commits) and closes; a second signal stops at once (the
events since the last checkpoint are then read again: nothing is lost).
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from kafka.errors import CommitFailedError, KafkaConfigurationError, KafkaError, RebalanceInProgressError

from monitor import __version__
from monitor.config import Config, seconds
from monitor.errors import ConfigError
from monitor.detections import Detection
from monitor.ops.http import HttpServer
from monitor.ops.metrics import Metrics
from monitor.ops.scheduler import Jobs
from monitor.ops.state import CheckpointStore, DirectoryPieces, pack, partition_key, unpack
from monitor.pipeline import BatchResult, Pipeline
from monitor.publish import FileOutputs, KafkaOutputs, PublishError, Spool
from monitor.sources.kafka import next_offsets

log = logging.getLogger("inferwatch.daemon")

# How long a stop waits for an unreachable broker to take the last batch before giving it up to
# redelivery.
STOP_GRACE_SECONDS = 15.0
# /healthz fails when the loop has not turned for this long (a hung process, not a slow broker).
LOOP_STALL_SECONDS = 120.0


def tune_garbage_collector() -> None:
    """Fewer, cheaper cyclic-GC passes: each poll allocates thousands of short-lived records and events,
    and with CPython's default thresholds (700, 10, 10) the frequent full collections re-scan every
    long-lived object (detector state, kafka-python's buffers). Measured with bench/throughput.py on
    200,000 64-feature events: 47k -> 77k events/s. Memory stays bounded: the collector still runs.
    """
    gc.collect()
    gc.freeze()  # what exists after start-up (modules, config, models) is never garbage
    gc.set_threshold(50_000, 50, 1000)


class DetectDaemon:
    def __init__(self, config: Config, *, inputs: Sequence[str] | None = None,
                 detections_out: Any = None, dead_letters_out: Path | None = None,
                 http: bool = True, metrics: Metrics | None = None, checkpoints: bool = True,
                 stage: str = "all"):
        self.config = config
        # all: detect and respond; detect: without playbooks; respond: playbooks on the detections topic
        self.stage = stage
        self.respond: Any = None
        self.metrics = metrics or Metrics()
        self.metrics.build.info({"version": __version__})
        self.inputs = list(inputs or [])
        # A file run checkpoints to <state dir>/detectors.pkl; on Kafka the checkpoints go with the
        # commits (``_checkpoint_kafka``) and come back with the partitions' assignment.
        self.store = CheckpointStore(config.state.dir) if checkpoints else None
        restored = {}
        if self.store is not None:
            self.store.prepare()
            if self.inputs:
                restored = self.store.load("detectors") or {}
        if restored:
            log.info("restored detector state of %d models from %s", len(restored), self.store.dir)
        self.pipeline = Pipeline(config, self.metrics, restored)
        self.pipeline.track_partitions = not self.inputs  # a partition's clients move with it
        self.stopping = threading.Event()
        self.listeners: list[Callable[[Detection], None]] = []
        self.source: Any = None
        self.outputs: Any = None
        self._detections_out = detections_out
        self._dead_letters_out = dead_letters_out
        self._ready_reason = "starting"
        self._read_up_to: dict[tuple[str, int], int] = {}  # (topic, partition) -> offset after the last read
        self._owned: set[tuple[str, int]] = set()  # the partitions the group assigned here
        self._adopted: list[Any] = []  # held records of partitions taken over, read before the next poll's
        self.pieces: DirectoryPieces | None = None  # where the Kafka checkpoints go
        self._last_loop = time.monotonic()
        self._stopped_at: float | None = None
        self.jobs = Jobs(self.metrics)
        self.scraper: Any = None
        self.http: HttpServer | None = None
        if http:
            self.http = HttpServer(config.http.host, config.http.port, self.metrics, self.health, self.readiness)
        # The operator surface: model inventory and risk register, kept beside the checkpoint; /api/*.
        from monitor.ops.api import OperatorSurface

        self.operator = OperatorSurface(config, self.metrics, persist=self.store is not None)
        self.pipeline.after_batch = self.operator.after_batch
        self.listeners.append(self.operator.on_detection)
        if self.http:
            self.operator.routes(self.http)
        self.processed = 0
        # monotonic times of the first and latest non-empty batch, for throughput measurements
        self.first_batch_at: float | None = None
        self.last_batch_at: float | None = None

    # -- probes --------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict]:
        stalled = time.monotonic() - self._last_loop
        return stalled < LOOP_STALL_SECONDS, {"loop_seconds_ago": round(stalled, 3)}

    def readiness(self) -> tuple[bool, dict]:
        ok = self._ready_reason == "ok"
        return ok, {"reason": self._ready_reason}

    def _set_ready(self, reason: str) -> None:
        if reason != self._ready_reason:
            (log.info if reason == "ok" else log.warning)("readiness: %s", reason)
        self._ready_reason = reason
        self.metrics.ready.set(1 if reason == "ok" else 0)

    # -- life cycle ----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: Any) -> None:
            if self.stopping.is_set():
                log.warning("second %s: stopping now; the uncommitted batch will be redelivered",
                            signal.Signals(signum).name)
                raise KeyboardInterrupt
            log.info("%s received: finishing the batch, committing and stopping", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

        def on_hangup(_signum: int, _frame: Any) -> None:
            if self.respond is not None:
                # Not in the signal handler itself: loading takes a while and logs.
                threading.Thread(target=self.respond.responder.reload, name="playbook-reload", daemon=True).start()
            else:
                log.info("SIGHUP: no respond stage runs here, nothing to reload")

        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, on_hangup)

    def stop(self) -> None:
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        self.stopping.set()

    def run(self) -> int:
        if self.http:
            self.http.start()
            log.info("HTTP on %s:%d (/metrics, /healthz, /readyz)", self.config.http.host, self.http.port)
        tune_garbage_collector()
        due = self._schedule() if self.stage != "respond" else {}
        self._start_respond()
        self.jobs.start()
        try:
            if self.stage == "respond":
                self._run_respond_only()
            elif self.inputs:
                self._run_files(due)
            else:
                self._run_kafka(due)
        except KeyboardInterrupt:
            log.warning("stopped without the final commit")
            return 130
        finally:
            self.jobs.stop()
            if self.respond is not None:
                self.respond.stop()
            if getattr(self, "_producer_for_actions", None) is not None:
                self._producer_for_actions.close(timeout=5)
            if self.source is not None and hasattr(self.source, "close"):
                self.source.close()
            if self.outputs is not None:
                self.outputs.close()
            if self.pieces is not None:
                self.pieces.close()
            if self.http:
                self.http.stop()
        held = self.pipeline.held()
        log.info("stopped after %d events", self.processed - held)
        if held:
            log.info("%d events of unfinished batches were not processed (from Kafka: kept in the checkpoint)", held)
        return 0

    # -- respond stage -------------------------------------------------------------------------

    def _start_respond(self) -> None:
        if self.stage == "detect" or self.config.respond.playbooks is None:
            if self.stage == "respond":
                raise ConfigError(f"{self.config.source}: $.respond.playbooks: --stage respond needs a playbook "
                                  "directory")
            return
        from monitor.respond.stage import RespondStage

        events = None
        if self.stage == "all":
            from monitor.respond.ring import EventRing

            events = EventRing(per_model=self.config.respond.snapshot_events)
            self.pipeline.event_ring = events
        self.respond = RespondStage(self.config, self.metrics, events=events, producer=self._denylist_producer)
        self.respond.start(self.jobs)
        if self.http:
            self.respond.admin_routes(self.http)
        if self.inputs:
            self.listeners.append(self.respond.on_detection)
        else:
            self.respond.consume_in_background()

    def _denylist_producer(self) -> Any:
        """The Kafka producer block_client writes the denylist with (built when first needed)."""
        if getattr(self, "_producer_for_actions", None) is None:
            from monitor.sources.kafka import make_producer

            self._producer_for_actions = make_producer(self.config)
        return self._producer_for_actions

    def _run_respond_only(self) -> None:
        self._set_ready("waiting for the detections topic")
        while not self.stopping.is_set():
            self._last_loop = time.monotonic()
            self._set_ready("ok" if self.respond.ready_reason == "ok" else self.respond.ready_reason)
            self.stopping.wait(0.5)

    # -- scheduled jobs ------------------------------------------------------------------------

    def _schedule(self) -> dict[str, threading.Event]:
        """The jobs, on APScheduler. Those that touch detectors only raise a flag for the main loop; the
        scrape runs on the scheduler's thread and queues its figures. A file run is a batch job: its
        output must not depend on the wall clock, so it runs the checkpoint only."""
        due = {"checkpoint": self.jobs.flag_every("checkpoint", seconds(self.config.state.checkpoint_interval))}
        if self.inputs:
            return due
        jobs = self.config.jobs
        if jobs.evict_idle_clients is not None:
            due["evict_idle_clients"] = self.jobs.flag_every("evict_idle_clients", seconds(jobs.evict_idle_clients))
        if jobs.reference_refresh is not None:
            due["reference_refresh"] = self.jobs.flag_every("reference_refresh", seconds(jobs.reference_refresh))
        if jobs.scrape.targets:
            from monitor.ops.scrape import Scraper

            self.scraper = Scraper(jobs.scrape.targets, seconds(jobs.scrape.timeout), self.metrics,
                                   f"{self.config.source}: $.jobs.scrape")
            self.jobs.run_every("scrape", seconds(jobs.scrape.every), self.scraper.run)
        return due

    def _run_jobs(self, due: dict[str, threading.Event]) -> list[Detection]:
        """The flagged jobs, between batches, and the scraped figures; returns what they detected."""
        for name, flag in due.items():
            if not flag.is_set():
                continue
            flag.clear()
            if name == "checkpoint":
                if self.inputs:
                    self._checkpoint("interval")
                elif not self._checkpoint_kafka("interval"):
                    break  # a stop's grace ran out: what was not committed is read again
                continue
            try:
                if name == "evict_idle_clients":
                    gone = self.pipeline.evict_idle()
                    if gone:
                        log.info("forgot %d idle clients", gone)
                elif name == "reference_refresh":
                    for model, versions in self.pipeline.refresh_references().items():
                        log.info("%s: resource baselines rebuilt from recent events for %s", model, ", ".join(versions))
                self.jobs.done(name, True)
            except Exception:
                log.exception("scheduled job %s failed; the daemon goes on", name)
                self.jobs.done(name, False)
        found: list[Detection] = []
        if self.scraper is not None:
            for model, target, ts, figures in self.scraper.drain():
                try:
                    found.extend(self.pipeline.server_figures(model, target, ts, figures))
                except Exception:
                    log.exception("the figures scraped from %s could not be charted", target)
                    self.metrics.detector_errors.labels("resource").inc()
        return found

    def _checkpoint(self, reason: str) -> None:
        self.operator.save()
        if self.store is None:
            return
        try:
            took = self.store.save("detectors", self.pipeline.state())
            self.metrics.checkpoint_seconds.set(took)
            self.jobs.done("checkpoint", True)
            log.debug("checkpoint (%s) in %.3fs", reason, took)
        except Exception:
            self.jobs.done("checkpoint", False)
            log.exception("checkpoint (%s) failed; state will be re-learned after a restart", reason)

    def _checkpoint_kafka(self, reason: str) -> bool:
        """Write the models' piece and each partition's (its clients, its held records, the offset
        they match), then commit those offsets. False only when a stop's grace ran out; a failed
        write is logged and tried again at the next interval (the previous checkpoint stands)."""
        self.operator.save()
        offsets = {key: self._read_up_to[key] for key in self._owned if key in self._read_up_to}
        if not offsets or self.pieces is None:
            return True
        # A replica without the pieces (another state directory, a lost volume) reads the held events
        # again from the commit; the piece's offset, past them, is where its owner goes on.
        floor = self.pipeline.held_floor()
        commits = {key: min(offset, floor.get(key, offset)) for key, offset in offsets.items()}
        start = time.perf_counter()
        try:
            self.pieces.put("models", pack(self.pipeline.shared_state()))
            for key, piece in self.pipeline.partition_state(set(offsets)).items():
                piece["offset"] = offsets[key]
                if not self.pieces.put(partition_key(*key), pack(piece), offset=offsets[key]):
                    log.info("%s has a newer checkpoint by its new owner: not replaced", _names({key}))
        except Exception:
            self.jobs.done("checkpoint", False)
            log.exception("checkpoint (%s) could not be written; the previous one stands", reason)
            return True
        timeout = seconds(self.config.kafka.ack_timeout)
        refused = []

        def commit() -> None:
            try:
                self.source.commit_offsets(commits, timeout)
            except (CommitFailedError, RebalanceInProgressError):
                refused.append(True)  # a rebalance took partitions: their new owner goes on from the pieces

        if not self._retrying("committing offsets", commit, self.metrics.commit_failures):
            return False
        took = time.perf_counter() - start
        self.metrics.checkpoint_seconds.set(took)
        self.metrics.events_held.set(self.pipeline.held())
        if refused:
            log.warning("checkpoint (%s): the commit was refused after a rebalance", reason)
        self.jobs.done("checkpoint", not refused)
        log.debug("checkpoint (%s) of %d partitions in %.3fs", reason, len(offsets), took)
        return True

    def _reassign(self) -> None:
        """Follow the group's assignment: drop what this replica kept of the partitions it lost, and
        take over the checkpoint pieces of those it was given (before reading their records)."""
        try:
            changes = self.source.assignments()
        except KafkaError as exc:
            log.warning("the consumer process could not say its assignment: %s", exc)
            return
        for change in changes:
            revoked = self._owned - change.partitions
            added = change.partitions - self._owned
            self._owned = set(change.partitions)
            if revoked:
                try:
                    dropped = self.pipeline.drop_partitions(revoked)
                except Exception:  # a detector's bug must not stop the stream: its clients linger
                    log.exception("forgetting the clients of %s failed", _names(revoked))
                    dropped = 0
                for key in revoked:
                    self._read_up_to.pop(key, None)
                self._adopted = [r for r in self._adopted if (r.topic, r.partition) not in revoked]
                log.info("partitions revoked: %s (their state goes with them; %d held events dropped)",
                         _names(revoked), dropped)
            if added:
                self._adopt({key: change.commits.get(key, -1) for key in added}, change.ends)

    def _adopt(self, commits: dict[tuple[str, int], int | None], ends: dict[tuple[str, int], int]) -> None:
        """Take over the checkpoint pieces of newly assigned partitions (and the models' state, for the
        models not watched here yet). A piece's offset is at or past its partition's commit (pieces are
        written before the commit): the records below it are skipped, their outputs were published.
        ``ends``: the log-end offsets of the partitions with nothing committed."""
        pieces = {}
        for key in sorted(commits):
            try:
                data = self.pieces.get(partition_key(*key)) if self.pieces is not None else None
                if data is None:
                    continue
                piece = unpack(data)
                if commits[key] is None and not 0 <= piece["offset"] <= ends.get(key, -1):
                    # Nothing committed, and a checkpoint past the partition's end: the topic was
                    # deleted since. It belongs to a stream that is gone, and would hold newer pieces
                    # back. (Within the partition, it is the first checkpoint of the group, whose commit
                    # a crash or a rebalance prevented: it is taken over.)
                    log.warning("the checkpoint of %s belongs to offsets that are gone; removed", _names({key}))
                    self.pieces.remove(partition_key(*key))
                else:
                    pieces[key] = piece
            except Exception:
                log.exception("the checkpoint of %s could not be read; its clients start afresh", _names({key}))
        if not pieces:
            log.info("partitions assigned: %s (no checkpoint: state starts here)", _names(set(commits)))
            return
        self._restore_models()
        for key, piece in pieces.items():
            committed, offset = commits[key], piece["offset"]
            # Written by a replica that had lost the partition, after its new owner's commit: its
            # clients miss the events between the two, and its held events were read since.
            stale = committed is not None and 0 <= committed and offset < committed
            try:
                self._adopted.extend(self.pipeline.adopt_partition(key, piece, held=not stale))
            except Exception:
                log.exception("the checkpoint of %s could not be restored; its clients start afresh", _names({key}))
                continue
            if stale:
                log.warning("the checkpoint of %s is %d events behind its commit", _names({key}), committed - offset)
            else:
                self._read_up_to[key] = offset
                log.info("partition %s taken over at offset %d with %d held events and %d clients",
                         _names({key}), offset, len(piece["held"]), len(piece["ids"]))

    def _restore_models(self) -> None:
        """The models' shared state of the last checkpoint, for the models not watched here yet."""
        try:
            data = self.pieces.get("models") if self.pieces is not None else None
            if data is not None:
                fresh = self.pipeline.restore_shared(unpack(data))
                if fresh:
                    log.info("restored detector state of %d models from the checkpoint", len(fresh))
        except Exception:
            log.exception("the models' checkpoint could not be read; their state starts afresh")

    # -- files ---------------------------------------------------------------------------------

    def _run_files(self, due: dict[str, threading.Event]) -> None:
        from monitor.sources.files import FileSource

        self.source = FileSource(self.inputs, self.config.kafka.poll.max_records, self.config.limits.max_message_bytes)
        self.outputs = FileOutputs(self._detections_out, self._dead_letters_out)
        self.outputs.listeners.extend(self.listeners)
        self._set_ready("ok")
        for records in self.source.batches():
            self._last_loop = time.monotonic()
            with self.metrics.batch_seconds.time():
                result = self.pipeline.process(records)
                self.outputs.publish(result)
            self.metrics.batch_events.observe(len(records))
            self.processed += len(records)
            self._run_jobs(due)
            if self.stopping.is_set():
                log.info("stopping before the end of the input")
                break
        else:
            self.outputs.publish(self.pipeline.flush())  # the input is read: its last ticks are complete
        self._checkpoint("end of input")
        if self.respond is not None:
            # The input is read; let the playbooks' steps and notifications finish before stopping.
            self.respond.responder.wait_idle(timeout=60)
            self.respond.responder.deliver_due()

    # -- kafka ---------------------------------------------------------------------------------

    def _beat(self) -> None:
        self._last_loop = time.monotonic()

    def _connect(self) -> None:
        from monitor.sources.kafka import KafkaSource, ensure_topics, make_producer

        if self.config.kafka.create_topics:
            ensure_topics(self.config)
        max_request = max(1_048_576, self.config.limits.max_message_bytes + 128 * 1024)
        producer = make_producer(self.config, max_request_size=max_request)
        topics = self.config.kafka.topics
        self.outputs = KafkaOutputs(producer, topics.detections, topics.dead_letters,
                                    Spool(Path(self.config.state.dir) / "undeliverable.jsonl"),
                                    seconds(self.config.kafka.ack_timeout), max_request)
        self.outputs.listeners.extend(self.listeners)
        if self.pieces is None:
            self.pieces = DirectoryPieces(self.config.state.dir, self.config.kafka.group_id)
            self.pieces.prepare()
        try:
            if self.config.kafka.consumer_process:
                from monitor.sources.fetcher import ProcessSource

                self.source = ProcessSource(self.config, self.metrics)
            else:
                self.source = KafkaSource(self.config, self.metrics)
        except Exception:
            self.outputs.close()
            self.outputs = None
            raise

    def _run_kafka(self, due: dict[str, threading.Event]) -> None:
        from monitor.sources.kafka import security_settings, wait_for_broker

        security_settings(self.config)  # a missing ${VAR} is a config error now, not an outage later

        self._ready_reason = "waiting for the broker"  # the normal start: not worth a warning
        delay = 1.0
        while True:
            wait_for_broker(self.config, self.stopping, heartbeat=self._beat)
            if self.stopping.is_set():
                return
            try:
                self._connect()
                break
            except (KafkaConfigurationError, ValueError, TypeError) as exc:
                raise ConfigError(f"{self.config.source}: $.kafka: kafka-python rejects the settings: {exc}") from None
            except (KafkaError, OSError) as exc:
                # The broker answered TCP but not Kafka (starting up, wrong port, auth): try again.
                log.warning("connecting to Kafka failed (%s: %s); retrying", type(exc).__name__, exc)
                self._set_ready(f"connecting failed: {type(exc).__name__}")
                self.stopping.wait(delay)
                delay = min(delay * 2, 30.0)
        self._set_ready("ok")
        # Before anything is routed (the scraper's figures may come before the first assignment): the
        # models' references come back rather than being learnt again.
        self._restore_models()
        last_lag, delivered, caught_up = 0.0, True, False
        while not self.stopping.is_set():
            self._last_loop = time.monotonic()
            if self.pipeline.held() and not self._flush_idle(time.monotonic() - self.pipeline.flush_after, caught_up):
                delivered = False  # what the flush ran is neither published nor committed: no checkpoint of it
                break
            found = self._run_jobs(due)
            if found and not self._retrying("publishing outputs", lambda: self.outputs.publish(BatchResult(detections=found)),
                                            self.metrics.publish_failures):
                break
            try:
                records = self.source.poll()
            except KafkaError as exc:
                self.metrics.broker_up.set(0)
                self._set_ready(f"poll failed: {type(exc).__name__}")
                self.stopping.wait(1.0)
                continue
            self._reassign()
            now = time.monotonic()
            if now - last_lag > 1.0:
                self.source.update_lag()
                last_lag = now
            polled = bool(records)
            caught_up = not polled
            if not records and not self._adopted:
                reachable = self.source.broker_reachable()
                self.metrics.broker_up.set(1 if reachable else 0)
                self._set_ready("ok" if reachable else "broker unreachable")
                continue
            self.metrics.broker_up.set(1)
            # Records read again (the consumer fetched from the last commit after an outage, a rebalance
            # or its process's restart) were processed or are held: not twice.
            records = [r for r in records if r.offset >= self._read_up_to.get((r.topic, r.partition), 0)]
            if self._adopted:  # the held records of partitions taken over come first
                records, self._adopted = self._adopted + records, []
            if not records:
                if polled:
                    self._done()  # all read before: the consumer process may ship the next batch
                continue
            if self.first_batch_at is None:
                self.first_batch_at = now
            with self.metrics.batch_seconds.time():
                result = self.pipeline.process(records)
                delivered = self._deliver(result, next_offsets(records), batch=polled)
            self.metrics.batch_events.observe(len(records))
            if not delivered:
                break
            self.processed += len(records)
            self.last_batch_at = time.monotonic()
        if delivered:
            self._checkpoint_kafka("stop")  # the held events go into it: a restart goes on with them
        # else the detectors have seen a batch whose outputs are not durable: the previous checkpoint
        # stands, and its events are read again after a restart.

    def _retrying(self, what: str, attempt: Callable[[], None], failures: Any) -> bool:
        """Run ``attempt`` until it succeeds; False when a stop's grace ran out first."""
        delay, told = 0.2, False
        while True:
            try:
                attempt()
                if told:
                    log.info("%s succeeded after the broker came back", what)
                    self._set_ready("ok")
                return True
            except (PublishError, KafkaError) as exc:
                failures.inc()
                self.metrics.broker_up.set(0)
                self._set_ready(f"{what} failing: {type(exc).__name__}")
                if not told:
                    log.warning("%s failed (%s); holding the batch and retrying with backoff", what, exc)
                    told = True
            self._last_loop = time.monotonic()
            if self._stopped_at is not None and time.monotonic() - self._stopped_at > STOP_GRACE_SECONDS:
                log.warning("stopping with an unfinished %s; its events will be redelivered", what)
                return False
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _deliver(self, result: Any, read: dict[tuple[str, int], int], batch: bool = True) -> bool:
        """Publish ``result`` and note ``read`` (the offset after the last record read, per partition)
        for the next checkpoint's commit; False when a stop's grace ran out first. ``batch``: a polled
        batch's results (the consumer process then ships another)."""
        if not self._retrying("publishing outputs", lambda: self.outputs.publish(result),
                              self.metrics.publish_failures):
            return False
        for key, offset in read.items():  # held records taken over lie below what was read since
            if offset > self._read_up_to.get(key, -1):
                self._read_up_to[key] = offset
        self.metrics.events_held.set(self.pipeline.held())
        if batch:
            self._done()
        return True

    def _done(self) -> None:
        """Tell the source a polled batch is processed; a consumer process that is gone is replaced
        at the next poll."""
        try:
            self.source.done()
        except (KafkaError, OSError) as exc:
            log.debug("could not tell the consumer process a batch is done: %s", exc)

    def _flush_idle(self, idle_since: float | None, caught_up: bool) -> bool:
        """Run the held ticks of models idle since ``idle_since`` (None: all) and publish what they
        found; False when a stop's grace ran out first."""
        result = self.pipeline.flush(idle_since, caught_up)
        if not result.processed and not result.dead_letters:
            return True
        return self._deliver(result, {}, batch=False)


def _names(keys: set[tuple[str, int]]) -> str:
    return ", ".join(f"{topic}[{partition}]" for topic, partition in sorted(keys)) or "none"
