"""The Kafka consumer in a process of its own, so that kafka-python's record parsing (about 5.5 µs a
record, in Python) runs on one core while the detectors run on another.

The child owns the consumer and its group membership: it polls, ships each batch to the daemon over a
pipe (msgpack, records as arrays), tells the daemon of assignment changes before the batches read on
them, and commits the offsets the daemon sends at its checkpoints. At most ``MAX_IN_FLIGHT`` batches
are shipped ahead of the daemon's word that it processed them (``done``). The daemon keeps the same
``KafkaSource`` interface (``ProcessSource``): poll, assignments, done, commit_offsets, lag,
reachability, close.

Failure: if the child dies, the daemon starts another (the group rebalances; uncommitted batches are
redelivered); if the daemon dies, the child sees its pipe close and exits. Only the daemon handles
signals.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from typing import Any

import msgspec
from kafka.errors import KafkaError

from monitor.config import Config
from monitor.ops.metrics import Metrics
from monitor.sources.kafka import Assignment, publish_lag

log = logging.getLogger("inferwatch.fetcher")

MAX_IN_FLIGHT = 2
# The commit errors that mean "not yours any more" (a rebalance), not "try again".
REFUSED = frozenset({"CommitFailedError", "RebalanceInProgressError", "IllegalGenerationError",
                     "UnknownMemberIdError"})
STATUS_EVERY = 0.5


class WireRecord(msgspec.Struct, array_like=True):
    """A consumer record as it crosses the pipe; the pipeline reads the same attributes as on
    kafka-python's ConsumerRecord."""

    value: bytes | None
    key: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: int | None
    headers: list[tuple[str, bytes | None]] | None = None


class ChildFailed(KafkaError):
    """The consumer process could not start or stopped; the message says why."""


_encoder = msgspec.msgpack.Encoder()
_decode_message = msgspec.msgpack.Decoder().decode
_decode_batch = msgspec.msgpack.Decoder(tuple[str, list[WireRecord]]).decode


def _child(config_json: bytes, conn: Any, log_level: str, log_format: str) -> None:
    """The consumer process's main loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from kafka.errors import KafkaConfigurationError

    from monitor.daemon import tune_garbage_collector
    from monitor.ops import logs
    from monitor.sources.kafka import KafkaSource

    logs.setup(log_level, log_format)
    tune_garbage_collector()
    config = msgspec.json.decode(config_json, type=Config)
    try:
        source = KafkaSource(config, Metrics())
    except KafkaConfigurationError as exc:
        conn.send_bytes(_encoder.encode(("config_error", str(exc))))
        return
    except Exception as exc:
        conn.send_bytes(_encoder.encode(("error", f"{type(exc).__name__}: {exc}")))
        return
    conn.send_bytes(_encoder.encode(("ready",)))
    outbox = _Outbox(conn)
    parent = os.getppid()
    in_flight, last_status, last_poll = 0, 0.0, time.monotonic()
    keepalive = min(1.0, config.kafka.max_poll_interval_ms / 4000)
    try:
        while True:
            while conn.poll(0 if in_flight < MAX_IN_FLIGHT else 0.2):
                message = _decode_message(conn.recv_bytes())
                kind = message[0]
                if kind == "done":  # ("done",): a shipped batch is processed, ship another
                    in_flight -= 1
                elif kind == "commit":  # ("commit", [[topic, partition, next_offset], ...], ack id, timeout)
                    _, offsets, ack, timeout = message
                    error = _commit(source, _keyed(offsets), timeout) if offsets else None
                    outbox.send(("ack", ack, error))
                elif kind == "stop":
                    return
            if os.getppid() != parent:
                return  # the daemon is gone
            # While the daemon is busy (a reference's calibration takes seconds), the consumer still
            # polls, its partitions paused, so that the group does not count it gone and rebalance.
            busy = in_flight >= MAX_IN_FLIGHT
            if not busy or time.monotonic() - last_poll > keepalive:
                last_poll = time.monotonic()
                try:
                    records = source.keep_membership() if busy else source.poll()
                except KafkaError as exc:
                    log.debug("poll failed: %s", exc)
                    records = []
                for change in source.assignments():  # before the batch read on it
                    outbox.send(("assignment", [[t, p] for t, p in change.partitions],
                                 _rows(change.commits), _rows(change.ends)))
                if records:
                    outbox.send(("batch", [(r.value, r.key, r.topic, r.partition, r.offset, r.timestamp,
                                            r.headers or None) for r in records]))
                    in_flight += 1
            now = time.monotonic()
            if now - last_status > STATUS_EVERY and outbox.idle():  # a daemon that is not reading needs none
                last_status = now
                outbox.send(("status", source.broker_reachable(), _rows(source.lag())))
    except (EOFError, BrokenPipeError, OSError):
        return  # the daemon closed its end
    finally:
        outbox.close()
        source.close()


class _Outbox:
    """The consumer process's messages to the daemon, written by a thread of their own. A batch is
    larger than the pipe's buffer: it waits there until the daemon reads it, which a busy daemon (a
    reference's calibration takes seconds) does late, and the consumer must go on polling meanwhile,
    or the group counts it gone and takes its partitions away."""

    def __init__(self, conn: Any):
        self.conn = conn
        self.queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.broken = False
        self.thread = threading.Thread(target=self._write, name="inferwatch-to-daemon", daemon=True)
        self.thread.start()

    def send(self, message: tuple) -> None:
        if self.broken:
            raise BrokenPipeError("the daemon closed its end")
        self.queue.put(_encoder.encode(message))

    def idle(self) -> bool:
        return self.queue.empty()

    def _write(self) -> None:
        while (data := self.queue.get()) is not None:
            try:
                self.conn.send_bytes(data)
            except OSError:
                self.broken = True
                return

    def close(self) -> None:
        self.queue.put(None)


def _rows(by_partition: dict[tuple[str, int], Any]) -> list[list[Any]]:
    """A mapping keyed by (topic, partition) as the pipe carries it: [[topic, partition, value], ...]."""
    return [[t, p, value] for (t, p), value in by_partition.items()]


def _keyed(rows: list[list[Any]]) -> dict[tuple[str, int], Any]:
    """``_rows`` read back."""
    return {(t, p): value for t, p, value in rows}


def _commit(source: Any, offsets: dict[tuple[str, int], int], timeout: float) -> str | None:
    try:
        source.commit_offsets(offsets, timeout)
    except Exception as exc:  # a rebalance took the partitions, or the broker is away: the daemon says so
        log.debug("commit failed (%s)", type(exc).__name__)
        return type(exc).__name__
    return None


class ProcessSource:
    """The daemon's side: the same calls as ``KafkaSource``, served by the consumer process."""

    def __init__(self, config: Config, metrics: Metrics, start_timeout: float = 60.0):
        self.config = config
        self.metrics = metrics
        self.start_timeout = start_timeout
        self._acks = itertools.count(1)
        self._batches: list[list[WireRecord]] = []
        self._reachable = True
        self._lag: dict[tuple[str, str], int] = {}
        self._lag_labels: set[tuple[str, str]] = set()
        self._assignments: list[Assignment] = []
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_child, name="inferwatch-consumer", daemon=True,
            args=(msgspec.json.encode(self.config), child_conn, self.config.logging.level, self.config.logging.format))
        self.process.start()
        child_conn.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._conn.poll(0.2):
                message = self._recv()
                if message[0] == "ready":
                    return
                self.process.join(5)
                if message[0] == "config_error":
                    from monitor.errors import ConfigError

                    raise ConfigError(f"{self.config.source}: $.kafka: kafka-python rejects the settings: {message[1]}")
                raise ChildFailed(message[1])
            if not self.process.is_alive():
                raise ChildFailed(f"the consumer process exited with {self.process.exitcode}")
        self.process.kill()
        raise ChildFailed("the consumer process did not start in time")

    def _recv(self) -> tuple:
        data = self._conn.recv_bytes()
        if data[:1] == b"\x92" and data[1:7] == b"\xa5batch":  # ("batch", records): the common, large one
            return _decode_batch(data)
        return tuple(_decode_message(data))

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "batch":
            self._batches.append(message[1])
        elif kind == "assignment":
            partitions = frozenset((t, p) for t, p in message[1])
            # batches shipped before the rebalance: their revoked partitions' records are the new owner's
            kept = [[r for r in records if (r.topic, r.partition) in partitions] for records in self._batches]
            for _ in range(sum(1 for records in kept if not records)):
                self.done()  # a batch dropped whole is done: the consumer process counts it shipped
            self._batches = [records for records in kept if records]
            self._assignments.append(Assignment(partitions, _keyed(message[2]), _keyed(message[3])))
        elif kind == "status":
            self._reachable = bool(message[1])
            self._lag = _keyed(message[2])

    def _alive_or_restart(self) -> None:
        if self.process.is_alive():
            return
        log.error("the consumer process exited (%s); starting another (uncommitted events are redelivered)",
                  self.process.exitcode)
        self._batches.clear()
        # Its partitions left with it: the group may have given them to another replica meanwhile, so
        # the daemon lets go of them and takes the next assignment over from the checkpoints.
        self._assignments.append(Assignment(frozenset(), {}, {}))
        self._start()

    def poll(self) -> list[Any]:
        if self._batches:
            return self._batches.pop(0)
        deadline = time.monotonic() + self.config.kafka.poll.timeout_ms / 1000
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._conn.poll(remaining):
                    self._alive_or_restart()
                    return []
                self._handle(self._recv())
                if self._batches:
                    return self._batches.pop(0)
        except (EOFError, OSError):
            self._alive_or_restart()
            return []

    def _wait_ack(self, ack: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                break
            message = self._recv()
            if message[0] == "ack" and message[1] == ack:
                if message[2] in REFUSED:
                    from kafka.errors import CommitFailedError

                    raise CommitFailedError(f"commit refused in the consumer process: {message[2]}")
                if message[2]:
                    raise KafkaError(f"commit failed in the consumer process: {message[2]}")
                return
            self._handle(message)
        raise ChildFailed("no answer to a commit from the consumer process")

    def assignments(self) -> list[Assignment]:
        out, self._assignments = self._assignments, []
        return out

    def done(self) -> None:
        """A shipped batch is processed: the consumer process may ship another. Best effort: a
        consumer process that is gone is replaced at the next poll (and its count starts afresh)."""
        if not self.process.is_alive():
            return
        try:
            self._conn.send_bytes(_encoder.encode(("done",)))
        except OSError as exc:
            log.debug("the consumer process is gone: %s", exc)

    def commit_offsets(self, offsets: dict[tuple[str, int], int], timeout: float = 10.0) -> None:
        """Commit (topic, partition) -> next offset to read, through the consumer process, and wait
        for its answer."""
        if not offsets:
            return
        if not self.process.is_alive():
            # Its partitions go to the next consumer, which re-reads from the last commit: these
            # events are processed again rather than committed by a consumer that no longer exists.
            self._alive_or_restart()
            return
        ack = next(self._acks)
        try:
            self._conn.send_bytes(_encoder.encode(("commit", _rows(offsets), ack, timeout)))
        except OSError as exc:
            raise ChildFailed(f"the consumer process is gone: {exc}") from None
        self._wait_ack(ack, timeout + 1)

    def update_lag(self) -> None:
        self._lag_labels = publish_lag(self.metrics, self._lag, self._lag_labels)

    def broker_reachable(self) -> bool:
        return self._reachable and self.process.is_alive()

    def close(self) -> None:
        try:
            self._conn.send_bytes(_encoder.encode(("stop",)))
        except OSError:
            pass
        self.process.join(15)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()
