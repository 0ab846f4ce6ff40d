"""The detect stage end to end on the real (embedded) Kafka-protocol broker, the daemon as a subprocess."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path


from tests.conftest import Daemon, committed, event, write_config

MALFORMED = {
    b"not json at all": "invalid_json",
    b"[1, 2, 3]": "not_an_object",
    b'{"ts": 1, "model": "fraud"}': "missing_field",
    b'{"event_id": "x", "ts": 1, "model": "fraud", "latency_ms": "slow"}': "wrong_type",
    b'{"event_id": "x", "ts": NaN, "model": "fraud"}': "non_finite_number",
    b'{"event_id": "x", "ts": 1, "model": "fraud", "cpu_ms": 1e999}': "non_finite_number",
    b'{"event_id": "x", "ts": 1, "model": "fraud", "features": [1, 2, 3, 4, 5, 6, 7, 8, 9]}': "too_many_features",
    b'{"event_id": "\xff\xfe", "ts": 1, "model": "fraud"}': "invalid_utf8",
    b'{"event_id": "x", "ts": "yesterday", "model": "fraud"}': "invalid_timestamp",
    b'{"event_id": "x", "ts": 1, "model": "fraud", "pad": "' + b"a" * 3000 + b'"}': "message_too_large",
}


def drifting_stream(n: int, change_at: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        confidence = rng.gauss(0.93, 0.02) if i < change_at else rng.gauss(0.62, 0.06)
        out.append(json.dumps(event(i, confidence=min(1.0, max(0.0, confidence)))).encode())
    return out


def test_events_dead_letters_detections_and_commits(broker, tmp_path, daemons):
    topics = broker.topics("flow")
    # The reference comes from a file: read from three partitions at once, a backlog does not arrive
    # in event-time order, so the first events received would mix times before and after the change.
    reference = tmp_path / "reference.jsonl"
    reference.write_bytes(b"\n".join(drifting_stream(2000, change_at=10**9, seed=8)) + b"\n")
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topics, tmp_path / "state",
                          limits={"max_features": 8, "max_message_bytes": 2048},
                          detectors={"drift": {"reference": str(reference)}})
    good = drifting_stream(6000, change_at=4000)
    bad = list(MALFORMED)
    values = good[:3000] + bad + good[3000:]
    broker.produce(topics["logs"], values)

    d = Daemon(config, tmp_path / "daemon.log")
    daemons.append(d)
    d.wait_for(lambda: d.metric("inferwatch_events_total", model="fraud", outcome="processed") == 6000,
               what="all valid events processed")
    d.wait_for(lambda: committed(broker.bootstrap, group_of(config), topics["logs"], 3) == len(values),
               what="offsets committed")

    # valid events are counted exactly, malformed ones by reason
    assert d.metric("inferwatch_events_total", model="__none__", outcome="dead_letter") == len(bad)
    for reason in set(MALFORMED.values()):
        expected = sum(1 for r in MALFORMED.values() if r == reason)
        assert d.metric("inferwatch_dead_letters_total", reason=reason) == expected, reason

    # every malformed message is in the dead-letter topic: original bytes, reason, source coordinates
    letters = broker.consume_all(topics["dead_letters"], expect=len(bad))
    assert sorted(r.value for r in letters) == sorted(bad)
    for record in letters:
        headers = dict(record.headers)
        assert headers["inferwatch.reason"].decode() == MALFORMED[record.value]
        assert headers["inferwatch.source.topic"].decode() == topics["logs"]
        assert int(headers["inferwatch.source.offset"]) >= 0
        assert headers["inferwatch.error"]

    # the confidence drop is a detection on the detections topic, keyed by model, in DESIGN §3 form
    found = broker.consume_all(topics["detections"], expect=1)
    assert found, d.log()[-3000:]
    first = json.loads(found[0].value)
    assert found[0].key == b"fraud"
    assert first["detector"] == "drift" and first["kind"] == "prediction_drift"
    assert first["model"] == "fraud" and first["severity"] in ("warning", "critical")
    assert first["ts"] >= event(4000)["ts"], "no alarm before the change"
    column = first["evidence"]["columns"][0]
    assert first["evidence"]["features"] == ["confidence"]
    assert column["reference"]["mean"] > column["current"]["mean"]
    assert first["evidence"]["reference"].startswith(str(reference))
    assert first["atlas"] and first["source"]["topic"] == topics["logs"]
    assert d.metric("inferwatch_detections_total", model="fraud", detector="drift",
                    kind="prediction_drift", severity=first["severity"]) >= 1
    # and each detection is logged as one JSON line
    assert any(r.get("logger") == "inferwatch.detections" for r in d.log_records())
    check_with_promtool(d.get("/metrics")[1])
    assert d.stop() == 0


def check_with_promtool(exposition: bytes) -> None:
    """The live exposition passes `promtool check metrics` (skipped where promtool is not installed)."""
    import shutil
    import subprocess

    if shutil.which("promtool") is None:
        return  # tests/test_metrics_exposition.py says so with a skip; .ci/run installs it
    result = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def group_of(config_path) -> str:
    import yaml

    return yaml.safe_load(config_path.read_text())["kafka"]["group_id"]


def first_run(broker, tmp_path, daemons, topics) -> Path:
    """3,000 events on ``topics`` read to the end by a daemon stopped with SIGTERM (so checkpointed);
    returns its config."""
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topics, tmp_path / "state")
    broker.produce(topics["logs"], [json.dumps(event(i)).encode() for i in range(3000)])
    first = Daemon(config, tmp_path / "first.log")
    daemons.append(first)
    first.wait_for(lambda: first.metric("inferwatch_events_total", model="fraud", outcome="processed") == 3000,
                   what="first run")
    assert first.stop(signal.SIGTERM) == 0
    return config


def test_restart_resumes_from_committed_offsets(broker, tmp_path, daemons):
    topics = broker.topics("restart")
    config = first_run(broker, tmp_path, daemons, topics)
    assert committed(broker.bootstrap, group_of(config), topics["logs"], 3) == 3000

    broker.produce(topics["logs"], [json.dumps(event(i)).encode() for i in range(3000, 4000)])
    second = Daemon(config, tmp_path / "second.log")
    daemons.append(second)
    second.wait_for(lambda: second.metric("inferwatch_events_total", model="fraud", outcome="processed") >= 1000,
                    what="second run")
    second.wait_for(lambda: committed(broker.bootstrap, group_of(config), topics["logs"], 3) == 4000,
                    what="second commit")
    # exactly the new events: nothing committed before is processed again
    assert second.metric("inferwatch_events_total", model="fraud", outcome="processed") == 1000
    # the detector state came back from the checkpoint instead of being re-learned
    assert "restored detector state of 1 models" in second.log()


def test_a_first_checkpoint_whose_commit_never_happened_is_taken_over(broker, tmp_path, daemons):
    """A crash (or a rebalance) between a group's first checkpoint and its commit leaves pieces and no
    commit: the partition's state and offset are taken over, not thrown away with everything read
    again. (A group with nothing committed and another group's pieces is that situation.)"""
    import shutil

    import yaml

    topics = broker.topics("first", partitions=1)
    config = first_run(broker, tmp_path, daemons, topics)

    settings = yaml.safe_load(config.read_text())
    settings["kafka"]["group_id"] = fresh = group_of(config) + "-uncommitted"
    (tmp_path / "fresh.yaml").write_text(yaml.safe_dump(settings))
    pieces = tmp_path / "state" / "checkpoints"
    shutil.copytree(pieces / group_of(config), pieces / fresh)
    broker.produce(topics["logs"], [json.dumps(event(i)).encode() for i in range(3000, 4000)])
    second = Daemon(tmp_path / "fresh.yaml", tmp_path / "second.log")
    daemons.append(second)
    second.wait_for(lambda: committed(broker.bootstrap, fresh, topics["logs"], 1) == 4000, what="the commit")
    assert second.metric("inferwatch_events_total", model="fraud", outcome="processed") == 1000
    assert "taken over at offset 3000" in second.log()
    assert second.stop() == 0


def test_a_checkpoint_past_its_partitions_end_is_removed(broker, tmp_path, daemons):
    """Nothing committed and a piece beyond the partition's end: the topic was deleted and created
    again since, the piece belongs to a stream that is gone."""
    from monitor.ops.state import DirectoryPieces, pack, partition_key

    topics = broker.topics("gone", partitions=1)
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topics, tmp_path / "state")
    pieces = DirectoryPieces(tmp_path / "state", group_of(config))
    pieces.prepare()
    pieces.put(partition_key(topics["logs"], 0), pack({"ids": [], "clients": {}, "held": [], "offset": 50_000}),
               offset=50_000)
    broker.produce(topics["logs"], [json.dumps(event(i)).encode() for i in range(1000)])
    d = Daemon(config, tmp_path / "daemon.log")
    daemons.append(d)
    d.wait_for(lambda: committed(broker.bootstrap, group_of(config), topics["logs"], 1) == 1000, what="the commit")
    assert d.metric("inferwatch_events_total", model="fraud", outcome="processed") == 1000
    assert "belongs to offsets that are gone; removed" in d.log()
    assert d.stop() == 0


def test_broker_outage_mid_stream_is_survived(own_broker, tmp_path, daemons):
    broker = own_broker
    topics = broker.topics("outage")
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topics, tmp_path / "state",
                          kafka={"poll": {"max_records": 500, "timeout_ms": 200}})
    total = 60_000
    broker.produce(topics["logs"], [json.dumps(event(i)).encode() for i in range(total)])
    d = Daemon(config, tmp_path / "daemon.log")
    daemons.append(d)
    d.wait_for(lambda: d.metric("inferwatch_events_total", model="fraud", outcome="processed") > 0,
               what="the backlog to start")

    broker.down()  # mid-stream: the backlog is being consumed
    down_at = time.monotonic()
    assert d.metric("inferwatch_events_total", model="fraud", outcome="processed") < total, \
        "the outage must come while events are still unread"
    d.wait_for(lambda: not d.ready() and d.metric("inferwatch_broker_up") == 0, timeout=60,
               what="/readyz and inferwatch_broker_up to say the broker is away")
    assert d.get("/healthz")[0] == 200, "the process itself stays healthy"
    time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))  # 30 s away: past the session timeout (6 s)
    assert not d.ready() and d.get("/healthz")[0] == 200

    broker.up()
    broker.produce(topics["logs"], [json.dumps(event(i)).encode() for i in range(total, total + 1000)])
    d.wait_for(d.ready, timeout=60, what="/readyz after the broker came back")
    d.wait_for(lambda: committed(broker.bootstrap, group_of(config), topics["logs"], 3) == total + 1000,
               timeout=120, what="every offset committed after the outage")
    # nothing lost: every event processed at least once (a batch caught by the outage may be redone);
    # the last tick's events were committed inside the checkpoint and run once the model is idle
    d.wait_for(lambda: d.metric("inferwatch_events_total", model="fraud", outcome="processed") >= total + 1000,
               what="every event processed")
    assert d.stop() == 0
    outage_lines = [r for r in d.log_records() if r.get("level") == "warning"]
    assert 1 <= len(outage_lines) <= 4, "the outage is logged once per kind, not per retry"


def test_sigterm_finishes_the_batch_and_commits(broker, tmp_path, daemons):
    topics = broker.topics("term")
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topics, tmp_path / "state")
    broker.produce(topics["logs"], [json.dumps(event(i)).encode() for i in range(20000)])
    d = Daemon(config, tmp_path / "daemon.log")
    daemons.append(d)
    d.wait_for(lambda: d.metric("inferwatch_events_total", model="fraud", outcome="processed") > 0,
               what="processing to start")
    assert d.stop(signal.SIGTERM) == 0
    done = committed(broker.bootstrap, group_of(config), topics["logs"], 3)
    messages = [r.get("msg", "") for r in d.log_records()]
    processed = [int(m.split()[2]) for m in messages if m.startswith("stopped after")]
    # The events of unfinished batches are kept in the checkpoint, to be run after a restart; the
    # commit stops at the first of them (a replica without the checkpoint reads them again). With one
    # model the held events are each partition's newest: what was processed is what was committed.
    assert processed and done == processed[0], "what was processed is what was committed"


def test_an_oversized_message_with_a_huge_key_is_dead_lettered_cut_to_fit_and_the_stream_goes_on(
        broker, tmp_path, daemons):
    topics = broker.topics("huge")
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topics, tmp_path / "state")
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=8 * 1024 * 1024)
    huge_key, huge_value = b"k" * 200_000, b"x" * 2_000_000
    producer.send(topics["logs"], key=huge_key, value=huge_value, headers=[("trace-id", b"abc123")])
    for i in range(100):
        producer.send(topics["logs"], value=json.dumps(event(i)).encode())
    producer.flush(30)
    producer.close()

    d = Daemon(config, tmp_path / "daemon.log")
    daemons.append(d)
    d.wait_for(lambda: d.metric("inferwatch_events_total", model="fraud", outcome="processed") == 100,
               what="the events after the oversized message")
    [letter] = broker.consume_all(topics["dead_letters"], expect=1)
    headers = dict(letter.headers)
    assert headers["inferwatch.reason"] == b"message_too_large"
    assert headers["trace-id"] == b"abc123", "the original headers travel with the dead letter"
    assert int(headers["inferwatch.truncated_key_from_bytes"]) == len(huge_key)
    assert int(headers["inferwatch.truncated_from_bytes"]) == len(huge_value)
    import hashlib

    assert headers["inferwatch.original_sha256"].decode() == hashlib.sha256(huge_value).hexdigest()
    assert letter.key == huge_key[: len(letter.key)] and letter.value == huge_value[: len(letter.value)]
    assert d.stop() == 0


def test_kafka_secrets_never_reach_the_log_even_at_debug(broker, tmp_path, daemons, monkeypatch):
    topics = broker.topics("secret")
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topics, tmp_path / "state",
                          logging={"level": "DEBUG", "format": "json"})
    import yaml

    raw = yaml.safe_load(config.read_text())
    raw["kafka"]["security"] = {"security_protocol": "PLAINTEXT", "sasl_plain_username": "bob",
                                "sasl_plain_password": "${IW_TEST_PASSWORD}"}
    raw["kafka"]["create_topics"] = True  # the admin client logs its whole configuration at DEBUG
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("IW_TEST_PASSWORD", "s3cr3t-Hunter2-value")
    broker.produce(topics["logs"], [json.dumps(event(i)).encode() for i in range(50)])
    d = Daemon(config, tmp_path / "daemon.log")
    daemons.append(d)
    d.wait_for(lambda: d.metric("inferwatch_events_total", model="fraud", outcome="processed") == 50,
               what="events processed at DEBUG")
    assert d.stop() == 0
    log_text = d.log()
    assert "sasl_plain_password" in log_text, "kafka-python did log its configuration"
    assert "s3cr3t-Hunter2-value" not in log_text


def test_a_dead_letter_with_no_key_no_value_and_null_headers_is_published(broker, tmp_path):
    """Kafka lets a record have neither key nor value and headers with null values (Java and
    librdkafka producers send them); kafka-python's producer accepts neither, so the dead letter is
    adapted, and a refused one goes to the spool: it never stops the stream."""
    from monitor.events import DeadLetter
    from monitor.pipeline import BatchResult
    from monitor.publish import KafkaOutputs, Spool
    from kafka import KafkaProducer

    topics = broker.topics("nulls")
    outputs = KafkaOutputs(KafkaProducer(bootstrap_servers=broker.bootstrap), topics["detections"],
                           topics["dead_letters"], Spool(tmp_path / "undeliverable.jsonl"))
    letter = DeadLetter("empty_message", "the message value is empty", None, None, topics["logs"], 2, 41, None,
                        [("traceparent", None), ("tenant", b"acme")])
    outputs.publish(BatchResult(dead_letters=[letter]))
    outputs.close()
    [record] = broker.consume_all(topics["dead_letters"], expect=1)
    headers = dict(record.headers)
    assert record.value == b"" and headers["inferwatch.original_value_null"] == b"1"
    assert headers["traceparent"] == b"" and headers["tenant"] == b"acme"
    assert headers["inferwatch.source.offset"] == b"41"
    assert not (tmp_path / "undeliverable.jsonl").exists()


def consumer_process_of(daemon_pid: int) -> int:
    """The pid of the daemon's consumer process (its one child running the spawn entry point)."""
    import subprocess as sp

    out = sp.run(["pgrep", "-P", str(daemon_pid)], capture_output=True, text=True).stdout.split()
    children = [int(pid) for pid in out]
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            if b"spawn_main" in handle.read():  # not the resource tracker, also a child
                return pid
    raise AssertionError(f"no consumer process among the children {children} of {daemon_pid}")


def test_a_killed_consumer_process_is_replaced_and_nothing_is_lost(broker, tmp_path, daemons):
    import os

    topics = broker.topics("child")
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topics, tmp_path / "state")
    broker.produce(topics["logs"], [json.dumps(event(i)).encode() for i in range(3000)])
    d = Daemon(config, tmp_path / "daemon.log")
    daemons.append(d)
    d.wait_for(lambda: committed(broker.bootstrap, group_of(config), topics["logs"], 3) == 3000,
               what="the first events committed")
    os.kill(consumer_process_of(d.process.pid), signal.SIGKILL)
    broker.produce(topics["logs"], [json.dumps(event(i)).encode() for i in range(3000, 5000)])
    d.wait_for(lambda: committed(broker.bootstrap, group_of(config), topics["logs"], 3) == 5000,
               timeout=90, what="the events after the consumer process was killed")
    # the last tick's events are committed inside the checkpoint; they run once the model is idle
    d.wait_for(lambda: d.metric("inferwatch_events_total", model="fraud", outcome="processed") >= 5000,
               what="every event processed")
    assert any("starting another" in r.get("msg", "") for r in d.log_records())
    assert d.stop() == 0


def test_the_consumer_process_does_not_outlive_a_killed_daemon(broker, tmp_path, daemons):
    topics = broker.topics("orphan")
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topics, tmp_path / "state")
    d = Daemon(config, tmp_path / "daemon.log")
    daemons.append(d)
    d.wait_for(d.ready, what="the daemon to be ready")
    child = consumer_process_of(d.process.pid)
    d.stop(signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/status") as handle:
                if "\nState:\tZ" in handle.read():
                    return  # exited; only waiting for whoever adopted it to reap it
        except FileNotFoundError:
            return
        time.sleep(0.2)
    raise AssertionError("the consumer process is still running after its daemon was killed")


def test_a_commit_after_the_consumer_process_died_starts_another_instead_of_failing(broker, tmp_path):
    from monitor.config import load_config
    from monitor.ops.metrics import Metrics
    from monitor.sources.fetcher import ProcessSource

    topics = broker.topics("commit-dead")
    config = load_config(write_config(tmp_path / "c.yaml", broker.bootstrap, topics, tmp_path / "state"))
    source = ProcessSource(config, Metrics())
    try:
        first = source.process
        first.kill()
        first.join(10)
        source.commit_offsets({(topics["logs"], 0): 6}, timeout=5)
        assert source.process is not first and source.process.is_alive()
    finally:
        source.close()
    assert not source.process.is_alive()


def test_a_daemon_busy_for_longer_than_the_poll_interval_keeps_its_partitions(broker, tmp_path):
    """A reference's calibration keeps the daemon from reading for seconds: the consumer process must
    go on polling (its next batch waiting, larger than the pipe's buffer), or the group takes its
    partitions away and the events are read again."""
    from monitor.config import load_config
    from monitor.ops.metrics import Metrics
    from monitor.sources.fetcher import ProcessSource

    topics = broker.topics("busy", partitions=1)
    broker.produce(topics["logs"], [json.dumps(event(i, payload="x" * 1000)).encode() for i in range(6000)])
    config = load_config(write_config(tmp_path / "c.yaml", broker.bootstrap, topics, tmp_path / "state"))
    source = ProcessSource(config, Metrics())
    try:
        deadline = time.monotonic() + 30
        first: list = []
        while not first and time.monotonic() < deadline:
            first = source.poll()
        assert first, "no batch within 30 s"
        assigned = [change.partitions for change in source.assignments()]
        assert assigned == [frozenset({(topics["logs"], 0)})]
        time.sleep(config.kafka.max_poll_interval_ms / 1000 + 3)  # busy, reading nothing
        source.done()
        read = len(first)
        while read < 6000 and time.monotonic() < deadline + 30:
            batch = source.poll()
            if batch:
                assert batch[0].offset == read, "read again from the commit: the partitions were taken away"
                read += len(batch)
                source.done()
        assert read == 6000
        assert source.assignments() == [], "the group rebalanced while the daemon was busy"
    finally:
        source.close()
