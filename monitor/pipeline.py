"""Stage 1's core: a polled batch of raw messages in, events routed per model through detectors, out
come detections and dead letters. No I/O here: the daemon and replay feed it and publish what it returns.
It keeps the events of each model's unfinished batch (see ``event_time`` in the config) and the wall
clock of their arrival, for the idle flush.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple, Protocol

import numpy as np

from monitor.config import Config, seconds
from monitor.detections import Detection
from monitor.detectors import Detector, ModelBatch, registry
from monitor.events import DeadLetter, EventDecoder, invalid_utf8, utf8_error
from monitor.ops.metrics import OTHER_MODEL, Metrics

log = logging.getLogger("inferwatch.pipeline")

NO_MODEL = "__none__"  # the model label of messages that never became events
STALE_SECONDS = 60.0  # wall-clock seconds after which held events are read whatever their ticks
PARTITION_MAP_BOUND = 1_000_000  # clients in ``Pipeline.partition_of`` before it is pruned to those tracked


class RawRecord(Protocol):
    """What a source hands over: kafka-python's ConsumerRecord has these, and so do file records."""

    value: bytes | None
    key: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: int | None


@dataclass
class BatchResult:
    detections: list[Detection] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    processed: int = 0


class Held(NamedTuple):
    """A model's events waiting for their batch to complete."""

    events: list[Any]
    records: list[RawRecord]
    arrived: float  # monotonic time of the last arrival ...
    batch: int  # ... and the number of the batch it came in
    since: float  # monotonic time the oldest of them was first held
    floor: dict[tuple[str, int], int]  # the lowest offset held per partition


class ModelRoute:
    """A watched model's detectors, built from config on first sight."""

    __slots__ = ("model", "detectors", "label", "events", "last_ts")

    def __init__(self, model: str, detectors: list[Detector], label: str):
        self.model = model
        self.detectors = detectors
        self.label = label  # the metrics label: the name, or __other__ beyond the model limit
        self.events = 0
        self.last_ts = float("-inf")


class Pipeline:
    def __init__(self, config: Config, metrics: Metrics, restored: dict[str, dict[str, Any]] | None = None):
        self.config = config
        self.metrics = metrics
        limits = config.limits
        self.decoder = EventDecoder(limits.max_features, limits.max_message_bytes, limits.max_string_chars)
        self.routes: dict[str, ModelRoute | None] = {}  # None: seen but not watched
        self._restored = restored or {}
        # The respond stage's EventRing when it runs in this process: the raw events its snapshots keep.
        self.event_ring: Any = None
        self.tracked = 0
        self._overflow = ModelRoute(OTHER_MODEL, [], OTHER_MODEL)
        self._warned_limit = False
        self._untracked: dict[tuple[str, str], int] = {}  # per (model, detector): untracked queries exported
        # Detectors read a model's events in batches of whole ticks of event time (``_cuts``); the
        # events of a model's unfinished batch wait here until it completes or ``flush``.
        tick = config.event_time.tick
        self.tick = None if tick is None else seconds(tick)
        self._held: dict[str, Held] = {}
        self._batches = 0  # batches processed: a model is idle once one came without its events
        self.min_batch_events = config.event_time.min_batch_events
        self.max_batch_span = seconds(config.event_time.max_batch_span)
        self.flush_after = seconds(config.event_time.flush_after)
        self._done_tick: dict[str, float] = {}  # per model, the newest tick its detectors have read
        # Called after each batch a model's detectors read, with its route and batch (replay's figures).
        self.after_batch: Callable[[ModelRoute, ModelBatch], None] | None = None
        # client id -> the (topic, partition) of its latest event: a partition's per-client state moves
        # with it to the replica it is assigned to (client_id is the record key). Kept by the Kafka
        # daemon only (``track_partitions``); pruned at checkpoints and when it grows past a bound.
        self.track_partitions = False
        self.partition_of: dict[str, tuple[str, int]] = {}

    # -- routing -------------------------------------------------------------------------------

    def _route(self, model: str) -> ModelRoute | None:
        if not self.config.watches(model):
            if len(self.routes) < 4 * self.config.limits.max_models:
                self.routes[model] = None
            return None
        if self.tracked >= self.config.limits.max_models:
            if not self._warned_limit:
                log.warning("model limit (limits.max_models=%d) reached: further models such as %s are "
                            "counted as __other__ but not watched", self.config.limits.max_models, model)
                self._warned_limit = True
            if len(self.routes) < 4 * self.config.limits.max_models:
                self.routes[model] = self._overflow  # remember the decision, within a bound
            return self._overflow
        detectors = []
        saved = self._restored.pop(model, {})
        for name, params in self.config.detector_params(model).items():
            detector = registry.build(name, model, params)
            if name in saved:
                try:
                    detector.restore(saved[name])
                except Exception:
                    log.exception("could not restore %s state of %s; starting fresh", name, model)
            detectors.append(detector)
        detectors.sort(key=lambda d: d.reads_peers)  # those that read others' figures run after them
        for detector in detectors:
            detector.bind(detectors)
        route = ModelRoute(model, detectors, model)
        self.routes[model] = route
        self.tracked += 1
        self.metrics.models_tracked.set(self.tracked)
        log.info("watching model %s with %s", model, ", ".join(d.name for d in detectors) or "no detectors")
        return route

    # -- the batch -----------------------------------------------------------------------------

    def process(self, records: Iterable[RawRecord]) -> BatchResult:
        """Decode and validate the batch (no side effects), then run it through the detectors.

        Should decoding fail on a message (a bug: bad input is handled), the batch is decoded again
        message by message and the message that triggers the bug becomes a ``processing_failed`` dead
        letter; should a model's detection step fail outside its detectors, that model's events of the
        batch become ``processing_failed`` dead letters. Nothing is processed twice, and one message
        cannot stop the stream on every restart."""
        records = records if isinstance(records, list) else list(records)
        self._batches += 1
        try:
            grouped, dead = self._decode(records)
        except Exception:
            log.exception("decoding a batch of %d messages failed; isolating the message", len(records))
            grouped, dead = self._decode_one_by_one(records)
        if self.event_ring is not None:
            for model, (events, recs) in grouped.items():
                self.event_ring.add_many(itertools.repeat(model), [e.client_id for e in events],
                                         [r.value for r in recs])
        return self._detect(grouped, dead)

    def _decode_one_by_one(self, records: list[RawRecord]) -> tuple[dict, list[DeadLetter]]:
        grouped: dict[str, tuple[list[Any], list[RawRecord]]] = {}
        dead: list[DeadLetter] = []
        for r in records:
            try:
                one, letters = self._decode([r])
            except Exception as exc:
                log.exception("message at %s[%d]@%d failed decoding; dead-lettered", r.topic, r.partition, r.offset)
                dead.append(DeadLetter.of(r, "processing_failed", f"{type(exc).__name__}: {exc}"[:500]))
                continue
            dead.extend(letters)
            for model, (events, recs) in one.items():
                bucket = grouped.setdefault(model, ([], []))
                bucket[0].extend(events)
                bucket[1].extend(recs)
        return grouped, dead

    def _decode(self, records: list[RawRecord]) -> tuple[dict[str, tuple[list[Any], list[RawRecord]]], list[DeadLetter]]:
        """Events grouped by model, and dead letters. Pure: no metrics, no detector state."""
        decode = self.decoder.decode_unchecked_features
        grouped: dict[str, tuple[list[Any], list[RawRecord]]] = {}
        dead: list[DeadLetter] = []
        bad_utf8 = invalid_utf8([r.value for r in records])
        if bad_utf8:
            for i in sorted(bad_utf8):
                r = records[i]
                dead.append(DeadLetter.of(r, "invalid_utf8", utf8_error(r.value)))
            records = [r for i, r in enumerate(records) if i not in bad_utf8]
        # The per-event loop: kept to a decode, a type test and two appends (the throughput budget).
        for r in records:
            event = decode(r.value)
            if event.__class__ is tuple:
                dead.append(DeadLetter.of(r, event[0], event[1]))
                continue
            bucket = grouped.get(event.model)
            if bucket is None:
                bucket = grouped[event.model] = ([], [])
            bucket[0].append(event)
            bucket[1].append(r)
        for model, (events, recs) in grouped.items():
            problems = self.decoder.feature_problems(events)
            if problems:
                for i, (reason, error) in problems.items():
                    dead.append(DeadLetter.of(recs[i], reason, error))
                keep = [i for i in range(len(events)) if i not in problems]
                grouped[model] = ([events[i] for i in keep], [recs[i] for i in keep])
        return grouped, dead

    def _detect(self, grouped: dict[str, tuple[list[Any], list[RawRecord]]], dead: list[DeadLetter],
                hold: bool = True) -> BatchResult:
        result = BatchResult(dead_letters=dead)
        m = self.metrics
        if self.track_partitions:
            partition_of = self.partition_of
            for events, records in grouped.values():
                partition_of.update(zip([e.client_id for e in events], [(r.topic, r.partition) for r in records]))
            if len(partition_of) > PARTITION_MAP_BOUND:
                self._prune_partition_map()
        for model, (events, records) in grouped.items():
            held = self._held.pop(model, None)
            if held is not None:
                events, records = held.events + events, held.records + records
            if not events:
                continue
            try:
                self._detect_model(model, events, records, result, hold, held.since if held is not None else None)
            except Exception as exc:
                log.exception("the detection step failed on %d events of model %s; dead-lettered", len(events), model)
                m.detector_errors.labels("pipeline").inc()
                self._held.pop(model, None)  # dead-lettered below with the rest
                dead.extend(DeadLetter.of(r, "processing_failed", f"{type(exc).__name__}: {exc}"[:500])
                            for r in records)
        if len(dead) > 1:
            dead.sort(key=lambda d: (d.topic, d.partition, d.offset))  # input order, whatever found them
        for letter in dead:
            m.dead_letters.labels(letter.reason).inc()
        if dead:
            m.events.labels(NO_MODEL, "dead_letter").inc(len(dead))
        result.detections.sort(key=lambda d: (d.ts, d.detection_id))
        return result

    def _detect_model(self, model: str, events: list[Any], records: list[RawRecord], result: BatchResult,
                      hold: bool, held_since: float | None = None) -> None:
        m = self.metrics
        route = self.routes.get(model, False)
        if route is False:
            route = self._route(model)
        if route is None:
            m.events.labels(OTHER_MODEL, "ignored").inc(len(events))
            return
        if route.label == OTHER_MODEL:
            m.events.labels(OTHER_MODEL, "untracked").inc(len(events))
            return
        batch = in_event_time_order(ModelBatch(model, events, records))
        if self.tick is None or not hold:  # as polled; or the end of the input, an idle or stale model
            self._run_detectors(route, batch, result)
            return
        ticks = np.floor(batch.ts / self.tick)
        late = int(np.searchsorted(ticks, self._done_tick.get(model, -np.inf), side="right"))
        if late:  # events of ticks already read: a batch of their own
            self._run_detectors(route, ModelBatch(model, batch.events[:late], batch.records[:late]), result)
        lo = late  # where the open batch starts
        for a, b in self._cuts(ticks, late):
            self._run_detectors(route, ModelBatch(model, batch.events[a:b], batch.records[a:b]), result)
            self._done_tick[model] = float(ticks[b - 1])
            lo = b
        if lo < len(ticks):
            floor: dict[tuple[str, int], int] = {}
            for r in batch.records[lo:]:
                key = (r.topic, r.partition)
                if r.offset < floor.get(key, r.offset + 1):
                    floor[key] = r.offset
            since = held_since if held_since is not None and lo == late else time.monotonic()
            self._held[model] = Held(batch.events[lo:], batch.records[lo:], time.monotonic(), self._batches, since, floor)

    def _cuts(self, ticks: np.ndarray, start: int) -> list[tuple[int, int]]:
        """The batches to read now from the sorted ``ticks[start:]``: whole ticks, the newest never (more
        of it may come). A batch closes once it holds ``min_batch_events`` events or spans
        ``max_batch_span``, and before a tick that would take it past that span or that follows a gap of
        ``flush_after`` (where a live daemon would have flushed it for idleness). Decided by the events
        alone: the same batches however the events were polled."""
        cuts = []
        lo = start
        runs = [(start + a, start + b) for a, b in _runs(ticks[start:])]
        for k, (a, b) in enumerate(runs):
            if lo < a and ((ticks[a] - ticks[a - 1]) * self.tick >= self.flush_after
                           or (ticks[a] - ticks[lo] + 1) * self.tick > self.max_batch_span):
                cuts.append((lo, a))
                lo = a
            if k == len(runs) - 1:
                break
            if b - lo >= self.min_batch_events or (ticks[b - 1] - ticks[lo] + 1) * self.tick >= self.max_batch_span:
                cuts.append((lo, b))
                lo = b
        return cuts

    def _run_detectors(self, route: ModelRoute, batch: ModelBatch, result: BatchResult) -> None:
        m = self.metrics
        found_all = []
        for detector in route.detectors:
            try:
                found = detector.update(batch)
            except Exception:
                # A detector bug must not stop the stream or lose the batch's other results.
                log.exception("detector %s failed on a batch of %d events of model %s",
                              detector.name, len(batch), route.model)
                m.detector_errors.labels(detector.name).inc()
                continue
            found_all.extend(found)
            if (counts := detector.client_counts()) is not None:
                tracked, untracked = counts
                m.clients_tracked.labels(route.label, detector.name).set(tracked)
                key = (route.label, detector.name)
                m.clients_untracked.labels(*key).inc(max(0, untracked - self._untracked.get(key, 0)))
                self._untracked[key] = untracked
        # metrics last: a failure above leaves them untouched (the events become dead letters instead)
        route.events += len(batch)
        batch_ts = float(batch.ts[-1])
        if batch_ts > route.last_ts:
            route.last_ts = batch_ts
            m.last_event_ts.labels(route.label).set(batch_ts)
        for d in found_all:
            m.detections.labels(route.label, d.detector, d.kind, d.severity).inc()
        result.detections.extend(self._labelled(found_all))
        m.events.labels(route.label, "processed").inc(len(batch))
        result.processed += len(batch)
        if self.after_batch is not None:
            self.after_batch(route, batch)

    # -- ticks of event time -------------------------------------------------------------------

    def flush(self, idle_since: float | None = None, caught_up: bool = False) -> BatchResult:
        """Run what is held of every model idle since ``idle_since`` (``time.monotonic()`` seconds; None:
        every model, at the end of the input or at a stop). Idle: no new event of the model since then,
        and a batch has come without any (or ``caught_up``: the last poll found nothing): while a
        backlog is read every batch holds every busy model, however slowly it is read, so no tick of
        one is cut by the wall clock. Events held for longer than ``STALE_SECONDS`` run anyway (an event
        stamped in the future would otherwise hold its partition's commits)."""
        now = time.monotonic()
        due = [model for model, held in self._held.items()
               if idle_since is None or now - held.since > STALE_SECONDS
               or (held.arrived <= idle_since and (held.batch < self._batches or caught_up))]
        return self._detect({model: ([], []) for model in due}, [], hold=False)

    def held(self) -> int:
        """Events waiting for their model's batch to complete."""
        return sum(len(held.events) for held in self._held.values())

    def held_floor(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> the lowest offset still held there: a commit must stop before it."""
        floor: dict[tuple[str, int], int] = {}
        for held in self._held.values():
            for key, offset in held.floor.items():
                if offset < floor.get(key, offset + 1):
                    floor[key] = offset
        return floor

    # -- scheduled work ------------------------------------------------------------------------

    def evict_idle(self) -> int:
        """The ``evict_idle_clients`` job: each per-client detector forgets the clients idle for longer
        than its ``client_idle``, in the event time of its model's newest event. Returns how many."""
        gone = 0
        for route in self.watched():
            for detector in route.detectors:
                gone += detector.evict_idle(route.last_ts)
                if (counts := detector.client_counts()) is not None:
                    self.metrics.clients_tracked.labels(route.label, detector.name).set(counts[0])
        return gone

    def refresh_references(self) -> dict[str, list[str]]:
        """The ``reference_refresh`` job: model -> versions whose resource baselines were rebuilt."""
        out = {}
        for route in self.watched():
            for detector in route.detectors:
                refresh = getattr(detector, "refresh", None)
                if refresh is not None and (rebuilt := refresh()):
                    out[route.model] = rebuilt
        return out

    def server_figures(self, model: str, target: str, ts: float, figures: dict[str, float]) -> list[Detection]:
        """A model server's scraped figures, handed to the model's detectors that read them."""
        route = self.routes.get(model, False)
        if route is False:
            route = self._route(model)
        if route is None or route.label == OTHER_MODEL:
            return []
        found: list[Detection] = []
        for detector in route.detectors:
            observe = getattr(detector, "observe_server", None)
            if observe is not None:
                found.extend(observe(target, ts, figures))
        for d in found:
            self.metrics.detections.labels(route.label, d.detector, d.kind, d.severity).inc()
        return self._labelled(found)

    def _labelled(self, detections: list[Detection]) -> list[Detection]:
        for d in detections:
            if not d.labels:
                d.labels = self.config.model_labels(d.model)
        return detections

    def watched(self) -> list[ModelRoute]:
        return [r for r in self.routes.values() if r is not None and r.label != OTHER_MODEL]

    # -- state ---------------------------------------------------------------------------------

    def state(self) -> dict[str, dict[str, Any]]:
        """Detector state of every watched model, for a checkpoint (restored models not yet seen kept)."""
        out = {model: dict(states) for model, states in self._restored.items()}
        for model, route in self.routes.items():
            if route is not None and route.detectors:
                out[model] = {d.name: d.state() for d in route.detectors}
        return out

    # -- state by partition --------------------------------------------------------------------------
    # A checkpoint of the Kafka daemon is the models' shared state plus one piece per partition: the
    # per-client state of the clients whose events come from it and the records held there. The
    # replica a partition is assigned to takes its piece over (``adopt_partition``); the one it leaves
    # drops it (``drop_partitions``).

    def shared_state(self) -> dict[str, Any]:
        """Detector state of every watched model without the per-client state, and where each model's
        batches stand in event time."""
        detectors = {model: dict(states) for model, states in self._restored.items()}
        for model, route in self.routes.items():
            if route is not None and route.detectors:
                detectors[model] = {d.name: d.shared_state() for d in route.detectors}
        return {"detectors": detectors, "done_tick": dict(self._done_tick)}

    def restore_shared(self, saved: dict[str, Any]) -> list[str]:
        """Restore ``shared_state`` for the models not watched yet (before their first events);
        returns those models."""
        fresh = [m for m in saved["detectors"] if m not in self.routes]
        for model in fresh:
            self._restored[model] = saved["detectors"][model]
            if model in saved["done_tick"]:
                self._done_tick[model] = saved["done_tick"][model]
        return fresh

    def partition_state(self, keys: set[tuple[str, int]]) -> dict[tuple[str, int], dict[str, Any]]:
        """(topic, partition) -> {"ids": [client ids], "clients": {model: {detector: state}}, "held":
        [raw records]} for each of ``keys``. One pass over each detector's clients."""
        self._prune_partition_map()
        owner = {client: key for client, key in self.partition_of.items() if key in keys}
        out: dict[tuple[str, int], dict[str, Any]] = {key: {"ids": [], "clients": {}, "held": []} for key in keys}
        for client, key in owner.items():
            out[key]["ids"].append(client)
        for route in self.watched():
            for detector in route.detectors:
                for key, saved in detector.clients_state(owner).items():
                    out[key]["clients"].setdefault(route.model, {})[detector.name] = saved
        for held in self._held.values():
            for r in held.records:
                piece = out.get((r.topic, r.partition))
                if piece is not None:
                    piece["held"].append(r)  # kafka-python's ConsumerRecord and WireRecord both pickle
        return out

    def adopt_partition(self, key: tuple[str, int], saved: dict[str, Any], held: bool = True) -> list[RawRecord]:
        """Take over the piece of partition ``key`` of a checkpoint; returns its held records (none
        without ``held``), which the caller hands to ``process`` before the partition's new records."""
        for client in saved["ids"]:
            self.partition_of[client] = key
        for model, states in saved["clients"].items():
            route = self.routes.get(model, False)
            if route is False:
                route = self._route(model)
            if route is None or route.label == OTHER_MODEL:
                continue
            for detector in route.detectors:
                if detector.name in states:
                    try:
                        detector.adopt_clients(states[detector.name])
                    except Exception:
                        log.exception("could not take over the %s clients of %s; they start afresh", detector.name, model)
        return list(saved["held"]) if held else []

    def drop_partitions(self, keys: set[tuple[str, int]]) -> int:
        """Forget the clients and held events of partitions now read by another replica; returns how
        many held events were dropped (the new owner reads them from the last checkpoint)."""
        gone = {c for c, key in self.partition_of.items() if key in keys}
        for c in gone:
            del self.partition_of[c]
        for route in self.watched():
            for detector in route.detectors:
                detector.forget_clients(gone)
        dropped = 0
        for model, held in list(self._held.items()):
            keep = [i for i, r in enumerate(held.records) if (r.topic, r.partition) not in keys]
            if len(keep) == len(held.records):
                continue
            dropped += len(held.records) - len(keep)
            if not keep:
                del self._held[model]
                continue
            records = [held.records[i] for i in keep]
            floor = {key: offset for key, offset in held.floor.items() if key not in keys}
            self._held[model] = held._replace(events=[held.events[i] for i in keep], records=records, floor=floor)
        return dropped

    def _prune_partition_map(self) -> None:
        """Keep the client -> partition map to the clients some detector tracks."""
        tracked = {c for route in self.watched() for d in route.detectors for c in d.tracked_clients()}
        for held in self._held.values():
            tracked.update(e.client_id for e in held.events)
        if len(tracked) < len(self.partition_of):
            self.partition_of = {c: key for c, key in self.partition_of.items() if c in tracked}

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"model": r.model, "events": r.events, "last_event_ts": r.last_ts,
             "detectors": [d.describe() for d in r.detectors]}
            for r in self.watched()
        ]



def _runs(ticks: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal values in the sorted ``ticks``."""
    if len(ticks) == 0:
        return []
    edges = (np.flatnonzero(ticks[1:] != ticks[:-1]) + 1).tolist()
    return list(zip([0] + edges, edges + [len(ticks)]))


def in_event_time_order(batch: ModelBatch) -> ModelBatch:
    """The batch sorted by event time (stable): one poll interleaves partitions, and detectors that
    see a model's stream out of order would see a change, a return and the change again."""
    ts = batch.ts
    if len(ts) < 2 or not np.any(ts[1:] < ts[:-1]):
        return batch
    order = np.argsort(ts, kind="stable").tolist()
    events, records = batch.events, batch.records
    return ModelBatch(batch.model, [events[i] for i in order], [records[i] for i in order])
