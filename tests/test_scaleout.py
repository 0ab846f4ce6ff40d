"""Scale-out (issue 9): a partition's per-client state moves with it between replicas, so an attacker's
history survives a rebalance.

In process: the pipeline's pieces (the models' shared state, a partition's clients and held records)
handed from one pipeline to another mid-attack, and back. Live: two daemons in one consumer group on
the real broker, the second joining and later leaving while mallory probes; the attack is found after
the same number of mallory's queries as with one replica (the pipeline alone on the same events)."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor.config import load_config
from monitor.ops.metrics import Metrics
from monitor.ops.state import pack, unpack
from monitor.pipeline import Pipeline
from monitor.sources.fetcher import WireRecord
from tests.conftest import ROOT, Broker, Daemon, committed, write_config

START = 1_764_230_400.0
ATTACKER = "mallory"


@pytest.fixture(scope="module")
def demo_traffic() -> list[tuple[bytes, bytes]]:
    """(key, value) of 40 s of the demo's traffic at 1,500 events/s, mallory's probing of digits (from
    30%) thinned to about one query a second: its alarm then needs several seconds of its history, so
    a rebalance before it moves a history the detectors have read (not only events still held)."""
    from monitor.demo.traffic import TrafficGenerator, TrafficPlan

    out: list[tuple[bytes, bytes]] = []
    TrafficGenerator(lambda key, value: out.append((key, value)), TrafficPlan(duration=40, rate=1500)).simulate(START)
    attacker = [i for i, (key, _) in enumerate(out) if key == ATTACKER.encode()]
    dropped = set(attacker) - set(attacker[::THIN])
    return [(key, value) for i, (key, value) in enumerate(out) if key is not None and i not in dropped]


THIN = 100  # mallory keeps one query in this many


def partition_of(key: bytes) -> int:
    """The attacker on partition 0, the other clients spread over 0 and 1."""
    return 0 if key == ATTACKER.encode() else zlib.crc32(key) % 2


def as_records(traffic: list[tuple[bytes, bytes]], topic: str = "logs") -> list[WireRecord]:
    offsets = [0, 0]
    out = []
    for key, value in traffic:
        p = partition_of(key)
        out.append(WireRecord(value, key, topic, p, offsets[p], None))
        offsets[p] += 1
    return out


def first_alarm(detections: list[Any]) -> str:
    """The event id of the query on which the attacker was first named for model extraction."""
    found = sorted((d for d in detections if d.kind == "model_extraction" and d.client_id == ATTACKER),
                   key=lambda d: d.ts)
    assert found, "the attacker was not found"
    return found[0].evidence["event_ids"][-1]


def attacker_query(traffic: list[tuple[bytes, bytes]], event_id: str) -> int:
    """The attacker's query count at ``event_id`` (1 for its first query)."""
    ids = [json.loads(value)["event_id"] for key, value in traffic if key == ATTACKER.encode()]
    return ids.index(event_id) + 1


def after_query(traffic: list[tuple[bytes, bytes]], n: int) -> int:
    """The position in ``traffic`` just after the attacker's ``n``th query."""
    return [i for i, (key, _) in enumerate(traffic) if key == ATTACKER.encode()][n - 1] + 1


def ts_of(record: tuple[bytes, bytes]) -> float:
    return json.loads(record[1])["ts"]


def shipped() -> Any:
    """The shipped detectors, reading batches of about a tick (not up to 5,000 events): a rebalance a
    few seconds into the attack then finds its history read, not only held."""
    raw = yaml.safe_load((ROOT / "configs/inferwatch.yaml").read_text())
    return load_config(None, {"detectors": raw["detectors"], "event_time.min_batch_events": 200})


def replica() -> Pipeline:
    """A pipeline as the Kafka daemon runs it: it knows which partition each client's events come from."""
    pipeline = Pipeline(shipped(), Metrics())
    pipeline.track_partitions = True
    return pipeline


def handover(giver: Pipeline, taker: Pipeline, key: tuple[str, int], clients: bool = True) -> list[Any]:
    """Partition ``key`` from ``giver`` to ``taker`` through a checkpoint's bytes; the held records
    ``taker`` reads first. Without ``clients``, the clients' state is not taken over (the control)."""
    taker.restore_shared(unpack(pack(giver.shared_state())))
    piece = unpack(pack(giver.partition_state({key})))[key]
    if not clients:
        piece["clients"] = {}
    held = taker.adopt_partition(key, piece)
    giver.drop_partitions({key})
    return held


def run(pipeline: Pipeline, records: list[WireRecord], found: list[Any], chunk: int = 2000) -> None:
    for i in range(0, len(records), chunk):
        found.extend(pipeline.process(records[i:i + chunk]).detections)


def rebalanced_alarm(traffic: list[tuple[bytes, bytes]], join: int, leave: int, clients: bool = True) -> int:
    """The attacker's query at its first alarm when its partition goes from one pipeline to another at
    ``join`` and back at ``leave`` (positions in ``traffic``)."""
    records = as_records(traffic)
    a, b, found = replica(), replica(), []
    run(a, records[:join], found)
    moved = ("logs", 0)
    held = handover(a, b, moved, clients)
    middle = records[join:leave]
    run(a, [r for r in middle if r.partition == 1], found)
    run(b, held + [r for r in middle if r.partition == 0], found)
    # b checkpoints once more before it gives the partition back: what it took over is in it, though
    # most of those clients sent nothing since
    assert set(unpack(pack(b.partition_state({moved})))[moved]["ids"]) >= {ATTACKER}
    held = handover(b, a, moved, clients)
    run(a, held + records[leave:], found)
    found.extend(a.flush().detections)
    assert b.held() == 0 and moved not in b.partition_of.values()
    return attacker_query(traffic, first_alarm(found))


def one_replica_alarm(traffic: list[tuple[bytes, bytes]]) -> int:
    """The attacker's query at its first alarm with one replica: the pipeline the Kafka daemon runs, on
    every event. (The count does not depend on how the events are batched: 8 with batches of 700,
    2,000 or 5,000 events, and 8 from a live daemon alone in its group, as checked on 2026-12-03.)"""
    alone: list[Any] = []
    baseline = replica()
    run(baseline, as_records(traffic), alone)
    alone.extend(baseline.flush().detections)
    return attacker_query(traffic, first_alarm(alone))


def test_a_partition_handed_to_another_pipeline_mid_attack_keeps_the_attackers_history(demo_traffic) -> None:
    queries = one_replica_alarm(demo_traffic)
    assert queries >= 6, "the alarm must need a history to move"
    join, leave = after_query(demo_traffic, queries // 3), after_query(demo_traffic, 2 * queries // 3)
    assert ts_of(demo_traffic[leave]) - ts_of(demo_traffic[join]) > 1, "ticks apart: read between"

    assert rebalanced_alarm(demo_traffic, join, leave) == queries
    # the control: without the clients' state the same handovers name the attacker later
    assert rebalanced_alarm(demo_traffic, join, leave, clients=False) > queries


def test_dropping_a_partition_forgets_its_clients_and_held_events(demo_traffic) -> None:
    records = as_records(demo_traffic)
    pipeline = replica()
    run(pipeline, records[: len(records) // 2], [])
    probing = next(d for r in pipeline.watched() if r.model == "digits" for d in r.detectors if d.name == "probing")
    assert ATTACKER in probing.tracked_clients()
    held_before = pipeline.held()
    dropped = pipeline.drop_partitions({("logs", 0)})
    assert ATTACKER not in probing.tracked_clients()
    assert 0 < dropped <= held_before and pipeline.held() == held_before - dropped
    assert all(r.partition == 1 for held in pipeline._held.values() for r in held.records)


def test_a_full_probing_table_makes_room_for_a_suspicious_client_taken_over() -> None:
    import numpy as np

    from monitor.detectors.probing import ClientTable

    def table(clients: list[str], now: float) -> ClientTable:
        t = ClientTable(capacity=4, history=5, dims=3, distances=6)
        slots = t.slots(clients, now, idle=3600)
        t.last_ts[slots] = now
        return t

    full = table(["a", "b", "c", "d"], now=100.0)  # benign, all recently seen
    other = table(["mallory", "x"], now=101.0)
    m = other.slot_of["mallory"]
    other.evidence[m] = 0.9  # half-way to an alarm and more
    other.queries[m], other.ring[m] = 40, 1.0
    rows = other.export({"mallory": "p0", "x": "p0"})["p0"]
    assert full.adopt(rows, idle=3600) == 0
    taken = full.slot_of["mallory"]
    assert full.evidence[taken].max() == np.float32(0.9) and full.queries[taken] == 40 and full.ring[taken].max() == 1.0
    assert len(full.slot_of) == 4, "room made by forgetting benign clients"
    # rows made on another reference keep their counts and evidence, not their projected queries
    fresh = table(["y"], now=100.0)
    fresh.adopt(rows, idle=3600, projected=False)
    taken = fresh.slot_of["mallory"]
    assert fresh.evidence[taken].max() == np.float32(0.9) and fresh.queries[taken] == 40 and fresh.ring[taken].max() == 0


def test_a_partitions_checkpoint_is_not_replaced_by_an_older_one(tmp_path: Path) -> None:
    from monitor.ops.state import DirectoryPieces

    pieces = DirectoryPieces(tmp_path, "group")
    pieces.prepare()
    assert pieces.put("partition/logs/0", b"new owner", offset=500)
    # the replica that lost the partition checkpoints once more before it notices
    assert not pieces.put("partition/logs/0", b"old owner", offset=400)
    assert pieces.get("partition/logs/0") == b"new owner"
    assert pieces.put("partition/logs/0", b"next", offset=500) and pieces.get("partition/logs/0") == b"next"
    assert pieces.put("models", b"any") and pieces.get("models") == b"any"
    assert pieces.get("partition/logs/1") is None


# -- live: two daemons in one group -----------------------------------------------------------------


def produce_to_partitions(broker: Broker, topic: str, traffic: list[tuple[bytes, bytes]]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=20, batch_size=512 * 1024)
    for key, value in traffic:
        producer.send(topic, key=key, value=value, partition=partition_of(key))
    producer.flush(60)
    producer.close()


def committed_total(broker: Broker, group: str, topic: str) -> int:
    return committed(broker.bootstrap, group, topic, 2)


EXTRACTION = """\
name: extraction
match: {kind: model_extraction, client_id: mallory}
dedup: {key: "{{ model }}/{{ client_id }}", cooldown: 1h}
steps:
  - {id: note, action: webhook, with: {url: "HOOK"}}
"""


def live_alarm(broker: Broker, tmp_path: Path, traffic: list[tuple[bytes, bytes]], daemons: list[Daemon],
               respond: Any = None) -> tuple[int, list[Daemon]]:
    """Run the daemon and a second replica that joins after the attacker's 2nd query and leaves after
    its 5th on ``traffic`` produced in three parts; returns the attacker's query count at the first
    model-extraction alarm, and the two daemons."""
    tmp_path.mkdir()
    topics = broker.topics("scale", partitions=2)
    raw = yaml.safe_load((ROOT / "configs/inferwatch.yaml").read_text())
    state = tmp_path / "state"  # shared, as a ReadWriteMany volume would be
    common = {"detectors": raw["detectors"], "event_time": {"min_batch_events": 200}}
    one = write_config(tmp_path / "one.yaml", broker.bootstrap, topics, state, **common)
    group = yaml.safe_load(one.read_text())["kafka"]["group_id"]
    # its member id sorts first, so the range assignor gives it partition 0: the attacker's
    two = write_config(tmp_path / "two.yaml", broker.bootstrap, topics, state, **common)
    settings = yaml.safe_load(two.read_text())
    settings["kafka"].update(group_id=group, client_id="a-second")
    two.write_text(yaml.safe_dump(settings))

    join, leave = after_query(traffic, 2), after_query(traffic, 5)
    first = Daemon(one, tmp_path / "first.log", "--stage", "detect")
    daemons.append(first)
    if respond is not None:  # one respond stage behind the detect replicas, as the Helm chart runs it
        books = tmp_path / "books"
        books.mkdir()
        (books / "extraction.yaml").write_text(EXTRACTION.replace("HOOK", respond.url))
        settings = yaml.safe_load(one.read_text())
        settings["state"]["dir"] = str(tmp_path / "respond-state")
        settings["respond"] = {"playbooks": str(books), "group_id": f"respond-{group}"}
        (tmp_path / "respond.yaml").write_text(yaml.safe_dump(settings))
        daemons.append(Daemon(tmp_path / "respond.yaml", tmp_path / "respond.log", "--stage", "respond"))
    produce_to_partitions(broker, topics["logs"], traffic[:join])
    first.wait_for(lambda: committed_total(broker, group, topics["logs"]) == join, timeout=120, what="the first part")
    # Each part ends with its models idle, their held ticks run (a wall-clock matter), before the
    # group changes.
    first.wait_for(lambda: first.metric("inferwatch_events_held") == 0, what="the first part's last ticks")
    other = Daemon(two, tmp_path / "second.log", "--stage", "detect")
    daemons.append(other)
    runs = [first, other]
    other.wait_for(lambda: "taken over" in other.log(), timeout=60, what="the second replica to take partition 0")
    assert "partitions revoked" in first.log()
    produce_to_partitions(broker, topics["logs"], traffic[join:leave])
    first.wait_for(lambda: committed_total(broker, group, topics["logs"]) == leave, timeout=120, what="the second part")
    for run in runs:
        run.wait_for(lambda: run.metric("inferwatch_events_held") == 0, what="the second part's last ticks")
    assert other.stop() == 0
    first.wait_for(lambda: first.log().count("taken over") >= 1, timeout=60, what="partition 0 back")
    produce_to_partitions(broker, topics["logs"], traffic[leave:])
    first.wait_for(lambda: committed_total(broker, group, topics["logs"]) == len(traffic), timeout=180,
                   what="every event committed")
    found = []
    for _ in range(60):  # the last ticks run once the model is idle
        found = [json.loads(r.value) for r in broker.consume_all(topics["detections"])]
        if any(d["kind"] == "model_extraction" and d["client_id"] == ATTACKER for d in found):
            break
        time.sleep(1)
    assert first.stop() == 0
    alarms = sorted((d for d in found if d["kind"] == "model_extraction" and d["client_id"] == ATTACKER),
                    key=lambda d: d["ts"])
    assert alarms, "the attacker was not found"
    return attacker_query(traffic, alarms[0]["evidence"]["event_ids"][-1]), runs


@pytest.mark.slow
def test_a_replica_joining_and_leaving_mid_attack_finds_the_attacker_as_one_replica_does(
        broker: Broker, tmp_path: Path, demo_traffic: list[tuple[bytes, bytes]], daemons: list[Daemon]) -> None:
    from tests.contract_servers import WebhookServer

    alone = one_replica_alarm(demo_traffic)
    hook = WebhookServer().start()
    try:
        shared, (first, other) = live_alarm(broker, tmp_path / "pair", demo_traffic, daemons, respond=hook)
        assert alone > 5, "the alarm comes after the second replica left: it needed the history it kept"
        assert shared == alone
        # the attacker's partition went to the second replica and came back, with its state each time
        assert "taken over at offset" in other.log() and "taken over at offset" in first.log()
        # One playbook run for the attack, however many times replicas published the alarm (a replica
        # taking a partition over reads again what came after the last checkpoint).
        deadline = time.monotonic() + 30
        while not hook.requests and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # a second notification would come now
        incidents = {json.loads(r["body"])["incident"]["id"] for r in hook.requests}
        assert len(hook.requests) == 1 and len(incidents) == 1
    finally:
        hook.stop()


def test_a_second_respond_stage_in_the_group_is_told_off(broker: Broker, tmp_path: Path, daemons: list[Daemon]) -> None:
    topics = broker.topics("respond2", partitions=2)
    books = tmp_path / "books"
    books.mkdir()
    (books / "note.yaml").write_text("name: note\nmatch: {kind: model_extraction}\ndry_run: true\n"
                                     "steps:\n  - {id: note, action: webhook, with: {url: 'http://127.0.0.1:9/hook'}}\n")
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topics, tmp_path / "state",
                          respond={"playbooks": str(books), "group_id": f"respond-{topics['logs']}"})
    settings = yaml.safe_load(config.read_text())
    settings["state"]["dir"] = str(tmp_path / "other-state")
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(settings))
    one = Daemon(config, tmp_path / "one.log", "--stage", "respond")
    daemons.append(one)
    one.wait_for(one.ready, what="the first respond stage")
    other = Daemon(tmp_path / "other.yaml", tmp_path / "other.log", "--stage", "respond")
    daemons.append(other)
    told = "another respond stage reads the detections topic"
    other.wait_for(lambda: told in one.log() or told in other.log(), timeout=60, what="the warning")
    assert one.stop() == 0 and other.stop() == 0
