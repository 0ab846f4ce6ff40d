"""The Kafka side of the detect stage: a consumer in a consumer group, and a producer for its outputs.

Offsets are committed by hand, only after the batch's detections and dead letters were acknowledged
by the broker (``Outputs.publish`` then ``KafkaSource.commit``), so a crash between the two replays
the batch rather than losing it: delivery is at least once and detection ids make repeats harmless.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, NamedTuple, Sequence

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from monitor.config import Config
from monitor.errors import ConfigError
from monitor.ops import logs
from monitor.ops.metrics import Metrics

GATHER_SECONDS = 0.1  # how long a poll may gather more records while they keep coming

log = logging.getLogger("inferwatch.kafka")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# What kafka.security may set: kafka-python's security options that a YAML file can express.
SECURITY_KEYS = frozenset({
    "security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password",
    "sasl_kerberos_name", "sasl_kerberos_service_name", "sasl_kerberos_domain_name",
    "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_crlfile", "ssl_ciphers",
    "ssl_check_hostname",
})


def check_security_keys(config: Config) -> None:
    import difflib

    for key in config.kafka.security:
        if key not in SECURITY_KEYS:
            close = difflib.get_close_matches(key, sorted(SECURITY_KEYS), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(sorted(SECURITY_KEYS))}"
            raise ConfigError(f"{config.source}: $.kafka.security.{key}: unknown kafka-python security option{hint}")


def missing_environment(config: Config) -> list[tuple[str, str]]:
    """(key, variable) for every ${VAR} in kafka.security that the environment does not set."""
    return [(key, name) for key, value in config.kafka.security.items() if isinstance(value, str)
            for name in _ENV_REF.findall(value) if name not in os.environ]


def security_settings(config: Config) -> dict[str, Any]:
    """kafka.security with ${VAR} references read from the environment (values never logged)."""
    check_security_keys(config)
    out: dict[str, Any] = {}
    for key, value in config.kafka.security.items():
        if isinstance(value, str):
            missing = [name for name in _ENV_REF.findall(value) if name not in os.environ]
            if missing:
                raise ConfigError(
                    f"{config.source}: $.kafka.security.{key}: environment variable {missing[0]} is not set")
            value = _ENV_REF.sub(lambda m: os.environ[m.group(1)], value)
            if "password" in key or _ENV_REF.search(config.kafka.security[key]):
                logs.redact(value)
        elif "password" in key:  # an unquoted number in YAML: still a password
            value = str(value)
            logs.redact(value)
        out[key] = value
    return out


def client_settings(config: Config) -> dict[str, Any]:
    return {
        "bootstrap_servers": config.kafka.bootstrap_servers,
        "client_id": config.kafka.client_id,
        # A client constructor waits for bootstrap this long; short, so a stop is not held up and a
        # retry comes soon (the daemon has already seen the broker's port answer).
        "bootstrap_timeout_ms": 5000,
        "reconnect_backoff_ms": 200,
        "reconnect_backoff_max_ms": 5000,
        **security_settings(config),
    }


def construct(cls: Any, **settings: Any) -> Any:
    """``cls(**settings)`` for a kafka-python client, closing its IO thread and sockets when the
    constructor fails (kafka-python 3 starts them before bootstrapping and leaves them on failure,
    so each retry against a port that does not speak Kafka would leak one more thread)."""
    client = cls.__new__(cls)
    try:
        client.__init__(**settings)
    except BaseException:
        for owner in (client, getattr(client, "_client", None), getattr(client, "_sender", None)):
            net = getattr(owner, "_net", None)
            if net is not None:
                try:
                    net.close()
                except Exception:
                    log.debug("closing a half-built client", exc_info=True)
        raise
    return client


def make_producer(config: Config, **overrides: Any) -> KafkaProducer:
    settings = {
        **client_settings(config),
        "acks": "all",
        "linger_ms": 5,
        "max_block_ms": 10000,
        "request_timeout_ms": 10000,
        # A send the broker has not acknowledged by then fails, and the daemon resends it: an outage
        # shows as a failure within this time rather than kafka-python's default two minutes.
        "delivery_timeout_ms": 30000,
        **overrides,
    }
    return construct(KafkaProducer, **settings)


class _RebalanceLog(ConsumerRebalanceListener):
    """Says which partitions come and go.

    Nothing is committed here: the daemon commits at its checkpoints, with the state the offsets
    match, and learns of the change after the poll (``KafkaSource.assignments``). (kafka-python 3 runs
    this on its IO thread, where a blocking commit is refused anyway.)"""

    def on_partitions_revoked(self, revoked: Any) -> None:
        log.info("partitions revoked: %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in revoked) or "none")

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions assigned: %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in assigned) or "none")


class KafkaSource:
    """Batched polls from the logs topic in the configured group, with manual commits and lag."""

    def __init__(self, config: Config, metrics: Metrics, topics: Sequence[str] | None = None):
        self.config = config
        self.metrics = metrics
        self.topics = list(topics or [config.kafka.topics.logs])
        k = config.kafka
        self.consumer = construct(
            KafkaConsumer,
            **client_settings(config),
            group_id=k.group_id,
            enable_auto_commit=False,
            auto_offset_reset=k.auto_offset_reset,
            max_poll_records=k.poll.max_records,
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=max(100, k.session_timeout_ms // 3),
            max_poll_interval_ms=k.max_poll_interval_ms,
            # Large fetches keep the per-request overhead small at high rates, while 1 MiB per
            # partition makes a backlog arrive from all partitions together, near event-time order.
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=1024 * 1024,
        )
        self.consumer.subscribe(self.topics, listener=_RebalanceLog())
        self._lag_labels: set[tuple[str, str]] = set()
        self._warned_internals = False
        self._assigned: set[tuple[str, int]] = set()
        self._assignments: list[Assignment] = []  # changes not yet taken by ``assignments``

    def poll(self) -> list[Any]:
        """Up to ``poll.max_records`` records, flattened across partitions in partition order.

        While records keep coming (a backlog, a busy topic), polls are gathered for up to
        ``GATHER_SECONDS`` into one batch of up to ``max_records``: one fetch holds a few thousand
        records, and the detectors' per-batch costs (per model and per column) made batches that small
        cost twice as much per event as batches of 20,000. An idle topic is not held up: the gathering
        stops at the first empty poll."""
        limit = self.config.kafka.poll.max_records
        polled = self.consumer.poll(timeout_ms=self.config.kafka.poll.timeout_ms, max_records=limit)
        out: list[Any] = [r for records in polled.values() for r in records]
        deadline = time.monotonic() + GATHER_SECONDS
        assigned = self.consumer.assignment() if out else set()
        while out and len(out) < limit // 2 and (left := deadline - time.monotonic()) > 0:
            more = self.consumer.poll(timeout_ms=int(left * 1000) + 1, max_records=limit - len(out))
            now = self.consumer.assignment()
            if now != assigned:
                # A rebalance inside the gathering: records of partitions now owned by another member
                # are theirs to process (and commit); keep the rest and stop here.
                out = [r for r in out if TopicPartition(r.topic, r.partition) in now]
                out.extend(r for records in more.values() for r in records)
                break
            if not more:
                break
            out.extend(r for records in more.values() for r in records)
        self._note_assignment()
        return out

    def keep_membership(self) -> list[Any]:
        """A poll with every assigned partition paused, to stay in the group while the records already
        shipped are being processed. Returns what it read nonetheless: the records of partitions a
        rebalance inside this poll assigned here (those were not paused)."""
        self.consumer.pause(*self.consumer.assignment())
        try:
            polled = self.consumer.poll(timeout_ms=0)
        finally:
            self.consumer.resume(*self.consumer.paused())  # those still assigned after the poll
        self._note_assignment()
        return [r for records in polled.values() for r in records]

    def _note_assignment(self) -> None:
        """After a poll (where the group rebalances): a changed assignment, with the committed offset
        of each partition new here."""
        now = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        if now == self._assigned:
            return
        commits = {key: self._committed(key) for key in now - self._assigned}
        self._assigned = now
        self._assignments.append(Assignment(frozenset(now), commits,
                                            self._ends([key for key, offset in commits.items() if offset is None])))

    def _ends(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The log-end offsets of ``keys``; {} when the broker does not say (the caller assumes the worst)."""
        if not keys:
            return {}
        try:
            ends = self.consumer.end_offsets([TopicPartition(*key) for key in keys])
        except Exception as exc:  # KafkaError, or a timeout
            log.warning("the end offsets of %d partitions could not be read (%s)", len(keys), type(exc).__name__)
            return {}
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items() if offset is not None}

    def _committed(self, key: tuple[str, int]) -> int | None:
        for attempt in range(3):
            try:
                return self.consumer.committed(TopicPartition(*key), timeout_ms=5000)
            except Exception as exc:  # KafkaError, or a timeout: the broker is slow to answer
                problem = exc
                time.sleep(0.5 * (attempt + 1))
        log.warning("the committed offset of %s[%d] could not be read (%s)", key[0], key[1], type(problem).__name__)
        return -1

    def assignments(self) -> list["Assignment"]:
        """The assignment changes since the last call, oldest first."""
        out, self._assignments = self._assignments, []
        return out

    def done(self) -> None:
        """A polled batch is processed (the consumer process ships the next one then)."""

    def commit_offsets(self, offsets: dict[tuple[str, int], int], timeout: float = 10.0) -> None:
        """Commit (topic, partition) -> next offset to read, synchronously, for the partitions still
        assigned here: a partition the group gave to another replica is that replica's to commit."""
        assigned = self.consumer.assignment()
        committed = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        committed = {tp: om for tp, om in committed.items() if tp in assigned}
        if committed:
            self.consumer.commit(committed, timeout_ms=int(timeout * 1000))

    def lag(self) -> dict[tuple[str, str], int]:
        """(topic, partition as text) -> messages between the high watermark and the position."""
        out = {}
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            try:
                position = self.consumer.position(tp, timeout_ms=0)
            except Exception:  # position unknown yet (no fetch since assignment)
                continue
            if high is not None and position is not None:
                out[(tp.topic, str(tp.partition))] = max(0, high - position)
        return out

    def update_lag(self) -> None:
        self._lag_labels = publish_lag(self.metrics, self.lag(), self._lag_labels)

    def broker_reachable(self) -> bool:
        """True while a connection to some broker is up (kafka-python has no public call for this)."""
        try:
            client = self.consumer._client
            nodes = [getattr(b, "node_id", None) if hasattr(b, "node_id") else b.nodeId
                     for b in client.cluster.brokers()]
            return any(client.connected(node) for node in nodes)
        except Exception:  # a kafka-python without these internals: say so once, assume reachable
            if not self._warned_internals:
                log.warning("cannot read broker connection state from kafka-python; /readyz will not "
                            "reflect broker outages while idle", exc_info=True)
                self._warned_internals = True
            return True

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        except Exception:
            log.exception("closing the consumer")


class Assignment(NamedTuple):
    """The partitions assigned after a rebalance, and for each one new here its committed offset
    (None where nothing was committed, -1 where it could not be read); for those with nothing
    committed, the log-end offset where the broker said it."""

    partitions: frozenset[tuple[str, int]]
    commits: dict[tuple[str, int], int | None]
    ends: dict[tuple[str, int], int]


def next_offsets(records: Sequence[Any]) -> dict[tuple[str, int], int]:
    """(topic, partition) -> the offset after the last of ``records`` there: what a commit stores."""
    last: dict[tuple[str, int], int] = {}
    for r in records:
        last[(r.topic, r.partition)] = r.offset
    return {key: offset + 1 for key, offset in last.items()}


def publish_lag(metrics: Metrics, lag: dict[tuple[str, str], int],
                shown: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Set the lag gauges and remove those of partitions no longer here; returns the labels shown."""
    for labels, value in lag.items():
        metrics.consumer_lag.labels(*labels).set(value)
    for labels in shown - set(lag):  # partitions revoked from this replica
        metrics.consumer_lag.remove(*labels)
    return set(lag)


def wait_for_broker(config: Config, stop: Any, heartbeat: Any = lambda: None) -> None:
    """Block until a bootstrap server accepts a TCP connection, retrying with backoff (the outage is
    logged once), or until ``stop`` is set. A TCP probe, not a Kafka client: it answers within two
    seconds either way, so a stop is never held up by a client's 30-second bootstrap timeout."""
    import socket

    delay, told = 0.5, False
    servers = config.kafka.bootstrap_servers
    while not stop.is_set():
        heartbeat()
        problem = ""
        for server in servers:
            host, _, port = server.rpartition(":")
            try:
                with socket.create_connection((host, int(port)), timeout=2.0):
                    pass
                if told:
                    log.info("broker %s reachable again", server)
                return
            except OSError as exc:
                problem = exc.strerror or type(exc).__name__
        if not told:
            log.warning("broker %s not reachable (%s); retrying with backoff", ",".join(servers), problem)
            told = True
        stop.wait(delay)
        delay = min(delay * 2, 10.0)


def ensure_topics(config: Config) -> None:
    """Create the logs, dead-letter and detections topics when missing (kafka.create_topics)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = construct(KafkaAdminClient, **client_settings(config))
    try:
        existing = set(admin.list_topics())
        t = config.kafka.topics
        wanted = [NewTopic(t.logs, config.kafka.topic_partitions, 1),
                  NewTopic(t.dead_letters, 1, 1),
                  NewTopic(t.detections, config.kafka.topic_partitions, 1)]
        missing = [n for n in wanted if n.name not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
            log.info("created topics %s", ", ".join(n.name for n in missing))
    finally:
        admin.close()


