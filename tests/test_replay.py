"""``inferwatch replay``: real models' traffic (the demo's scikit-learn models with its incidents, in
simulated time) replayed from files and from a real Kafka-protocol broker, against a live daemon."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from monitor.cli import main
from monitor.config import load_config
from monitor.replay.kafka import parse_bound
from monitor.replay.run import Replay
from tests.conftest import ROOT, Daemon, write_config
from tests.test_replay_html import browser, expected_points, open_report  # noqa: F401 (fixtures: Chromium)

START = 1_764_230_400.0  # the simulated traffic's first event time


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 s of the demo's traffic at 1,500 events/s: digits and cancer, a sponge client, mallory probing,
    a drift, a slower release, and malformed messages."""
    from monitor.demo.traffic import TrafficGenerator, TrafficPlan

    path = tmp_path_factory.mktemp("traffic") / "traffic.jsonl.gz"
    with gzip.open(path, "wb") as out:
        generator = TrafficGenerator(lambda key, value: out.write(value + b"\n"), TrafficPlan(duration=30, rate=1500))
        generator.simulate(START)
    return path


def lines(path: Path) -> list[bytes]:
    with gzip.open(path, "rb") as handle:
        return [line.rstrip(b"\n") for line in handle]


def replay(tmp_path: Path, *args: str, name: str = "report.json") -> dict[str, Any]:
    out = tmp_path / name
    assert main(["replay", "-c", str(ROOT / "configs/inferwatch.yaml"), *args, "--report", str(out)]) == 0
    return json.loads(out.read_text())


def shipped_config(tmp_path: Path, **changes: Any) -> Path:
    raw = yaml.safe_load((ROOT / "configs/inferwatch.yaml").read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_a_file_replay_reports_what_happened_and_the_same_bytes_twice(traffic: Path, tmp_path: Path) -> None:
    args = ["--input", str(traffic), "-p", str(ROOT / "playbooks"), "--html", str(tmp_path / "report.html")]
    report = replay(tmp_path, *args)
    assert main(["replay", "-c", str(ROOT / "configs/inferwatch.yaml"), *args,
                 "--report", str(tmp_path / "again.json")]) == 0
    assert (tmp_path / "report.json").read_bytes() == (tmp_path / "again.json").read_bytes()

    sent = [line for line in lines(traffic) if line.strip()]
    events = report["events"]
    assert events["read"] == len(sent)
    assert events["processed"] + events["dead_lettered"] == len(sent)
    assert events["dead_lettered"] > 0 and sum(events["dead_letter_reasons"].values()) == events["dead_lettered"]
    assert report["inputs"] == [{"kind": "file", "path": str(traffic), "bytes": traffic.stat().st_size,
                                 "sha256": hashlib.sha256(traffic.read_bytes()).hexdigest()}]
    assert len(report["config"]["sha256"]) == 64 and len(report["playbooks"]["sha256"]) == 64

    detections = report["detections"]
    assert [(d["ts"], d["detection_id"]) for d in detections] == sorted((d["ts"], d["detection_id"]) for d in detections)
    found = {(d["model"], d["kind"], d["client_id"]) for d in detections}
    assert ("digits", "model_extraction", "mallory") in found
    assert any(kind == "feature_drift" for model, kind, _ in found if model == "digits")
    assert any(kind in ("latency_anomaly", "resource_anomaly") for model, kind, _ in found if model == "cancer")
    assert report["models"]["digits"]["detectors"] == {"confidence": "armed", "drift": "armed", "probing": "armed",
                                                       "resource": "armed"}
    assert set(report["models"]["cancer"]["versions"]) == {"2024-11", "2024-12"}

    # the playbooks ran dry on event time: mallory's incident says what would have happened
    probing = [i for i in report["incidents"] if i["playbook"] == "probing-response" and "mallory" in i["key"]]
    assert probing, [i["key"] for i in report["incidents"]]
    assert {s["state"] for s in probing[0]["steps"]} <= {"dry_run", "skipped"}
    assert any(s["state"] == "dry_run" for s in probing[0]["steps"])
    assert all(START <= i["opened_at"] <= START + 30 for i in report["incidents"])

    mallory = next(c for c in report["suspicious_clients"] if c["client_id"] == "mallory")
    assert "model_extraction" in mallory["kinds"] and mallory["max_risk"] >= 1.0
    assert mallory["evidence"][0]["summary"]

    series = report["series"]["digits"]
    assert len(series["t"]) == len(series["events"]) == len(series["drift"]["values"])
    assert sum(series["events"]) == report["models"]["digits"]["events"]
    assert all(series["events"]), "steady traffic: every second has its events, whatever the batches"
    assert max(v for v in series["drift"]["values"] if v is not None) >= 1.0  # the drift crossed its threshold
    assert "mallory" in series["client_risk"]["clients"]
    assert series["latency_ms"]["baseline_median"] > 0
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "mallory" in html


@pytest.mark.slow
def test_the_report_does_not_depend_on_how_the_input_was_batched(traffic: Path, tmp_path: Path) -> None:
    """Detectors read each model's events a tick of event time at a time, whatever the polls were."""
    reports = []
    for size in (97, 20000):
        config = load_config(shipped_config(tmp_path, **{"kafka.poll.max_records": size}))
        reports.append(Replay(config, inputs=[str(traffic)]).run())
    small, large = reports
    assert small["detections"] and small["detections"] == large["detections"]
    assert small["series"] == large["series"]


@pytest.mark.slow
def test_filters_keep_one_client_one_model_or_a_time_range(traffic: Path, tmp_path: Path) -> None:
    events = [json.loads(line) for line in lines(traffic) if line.startswith((b'{"event_id": "digits-',
                                                                              b'{"event_id": "cancer-'))]
    mallory = replay(tmp_path, "--input", str(traffic), "--no-playbooks", "--client", "mallory", name="m.json")
    assert mallory["events"]["processed"] == sum(1 for e in events if e.get("client_id") == "mallory")
    assert mallory["events"]["filtered_out"] > 0
    assert list(mallory["models"]) == ["digits"]

    cancer = replay(tmp_path, "--input", str(traffic), "--no-playbooks", "--model", "canc*", name="c.json")
    assert list(cancer["models"]) == ["cancer"]
    assert {d["model"] for d in cancer["detections"]} == {"cancer"}

    window = replay(tmp_path, "--input", str(traffic), "--no-playbooks", "--from", "2025-11-27T08:00:10Z",
                    "--to", str(START + 20), name="w.json")
    assert window["filters"]["from"] == START + 10 and window["filters"]["to"] == START + 20
    assert window["events"]["processed"] == sum(1 for e in events if START + 10 <= e["ts"] <= START + 20)
    assert START + 10 <= window["time_range"]["first"] and window["time_range"]["last"] <= START + 20


def test_bounds_parse_times_and_offsets() -> None:
    assert parse_bound("2025-11-27T08:00:00Z", "--from").time == START
    assert parse_bound("2025-11-27T09:00:00+01:00", "--from").time == START
    assert parse_bound("1764230400.5", "--from").time == START + 0.5
    assert parse_bound("0:10, 2:30", "--from").offsets == {0: 10, 2: 30}
    for bad in ("yesterday", "2025-11-27T08:00:00", "0:10,x", "nan", "inf", "1e300", "-5"):
        with pytest.raises(Exception, match="--from"):
            parse_bound(bad, "--from")


def test_usage_errors_exit_2_and_say_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sample = tmp_path / "one.jsonl"
    sample.write_text(json.dumps({"event_id": "a", "ts": START, "model": "m"}) + "\n")
    cases = [
        (["--input", str(sample)], "--report OUT.json, --html OUT.html or both"),
        (["--input", str(tmp_path / "missing.jsonl"), "--report", str(tmp_path / "r.json")], "no such file"),
        (["--input", str(sample), "--from", "0:5", "--report", str(tmp_path / "r.json")], "offsets go with --topic"),
        (["--input", str(sample), "--from", "tomorrow", "--report", str(tmp_path / "r.json")], "RFC 3339"),
        (["--input", str(sample), "--from", str(START + 5), "--to", str(START), "--report", str(tmp_path / "r.json")],
         "--to is before --from"),
        (["--input", str(sample), "--report", str(tmp_path)], "is a directory"),
        (["--input", "-", "-", "--report", str(tmp_path / "r.json")], "can be read once"),
        (["--input", str(sample), "-p", str(tmp_path / "nobooks"), "--report", str(tmp_path / "r.json")],
         "no such file or directory"),
    ]
    for args, message in cases:
        assert main(["replay", *args]) == 2, args
        assert message in capsys.readouterr().err, args


def test_a_replay_of_nothing_is_an_empty_report(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    report = replay(tmp_path, "--input", str(empty), "--no-playbooks")
    assert report["events"]["read"] == 0 and report["detections"] == [] and report["models"] == {}
    assert report["time_range"] == {"first": None, "last": None}


# -- Kafka ---------------------------------------------------------------------------------------


def produce(broker: Any, topic: str, records: list[bytes]) -> None:
    """Each event with its own time as the record timestamp, as a model server's producer would."""
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=20, batch_size=256 * 1024)
    for value in records:
        try:
            body = json.loads(value)
            key, ts = str(body.get("client_id", "")).encode(), int(float(body["ts"]) * 1000)
        except (ValueError, KeyError, TypeError, AttributeError):
            key, ts = None, int(START * 1000)
        producer.send(topic, key=key, value=value, timestamp_ms=ts)
    producer.flush(60)
    producer.close()


def without_source(detections: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in d.items() if k != "source"} for d in detections]


@pytest.mark.slow
def test_a_live_run_and_a_replay_of_the_same_events_find_the_same(broker: Any, traffic: Path, tmp_path: Path,
                                                                    daemons: list[Daemon]) -> None:
    topics = broker.topics("live", partitions=1)
    records = [line for line in lines(traffic) if line.strip()]
    produce(broker, topics["logs"], records)
    raw = yaml.safe_load((ROOT / "configs/inferwatch.yaml").read_text())
    config = write_config(tmp_path / "live.yaml", broker.bootstrap, topics, tmp_path / "state",
                          detectors=raw["detectors"], event_time={"tick": "1s", "flush_after": "2s"})
    daemon = Daemon(config, tmp_path / "daemon.log", "--stage", "detect")
    daemons.append(daemon)
    daemon.wait_for(lambda: daemon.metric("inferwatch_events_total", model="digits", outcome="processed")
                    + daemon.metric("inferwatch_events_total", model="cancer", outcome="processed")
                    + daemon.metric("inferwatch_events_total", model="__none__", outcome="dead_letter")
                    == len(records), timeout=180, what="every event processed")
    daemon.wait_for(lambda: daemon.metric("inferwatch_events_held") == 0, timeout=30, what="the last tick")
    assert daemon.stop() == 0
    live = sorted((json.loads(r.value) for r in broker.consume_all(topics["detections"])),
                  key=lambda d: (d["ts"], d["detection_id"]))
    assert any(d["kind"] == "model_extraction" and d["client_id"] == "mallory" for d in live)

    from_kafka = replay(tmp_path, "--topic", topics["logs"], "--bootstrap", broker.bootstrap, "--no-playbooks",
                        name="kafka.json")
    assert from_kafka["detections"] == live  # the same findings, the same Kafka offsets as their sources
    assert from_kafka["inputs"][0]["records"] == len(records)
    from_file = replay(tmp_path, "--input", str(traffic), "--no-playbooks", name="file.json")
    assert without_source(from_file["detections"]) == without_source(live)


@pytest.mark.slow
def test_a_kafka_replay_reads_a_range_without_moving_any_group(broker: Any, traffic: Path, tmp_path: Path) -> None:
    topics = broker.topics("range", partitions=3)
    records = [line for line in lines(traffic) if line.strip()][:12000]
    produce(broker, topics["logs"], records)
    # a live group that has read part of the topic: the replay must leave its offsets alone
    group = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id="live-group", enable_auto_commit=False)
    partitions = [TopicPartition(topics["logs"], p) for p in range(3)]
    group.assign(partitions)
    from kafka.structs import OffsetAndMetadata

    group.commit({tp: OffsetAndMetadata(5, "", -1) for tp in partitions})
    before = {tp: group.committed(tp) for tp in partitions}

    args = ["--topic", topics["logs"], "--bootstrap", broker.bootstrap, "-p", str(ROOT / "playbooks")]
    first = replay(tmp_path, *args, name="one.json")
    replay(tmp_path, *args, name="two.json")
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()
    source = first["inputs"][0]
    assert source["records"] == len(records) == first["events"]["read"]
    assert sum(p["records"] for p in source["partitions"].values()) == len(records)
    assert {tp: group.committed(tp) for tp in partitions} == before
    group.close()

    ranged = replay(tmp_path, "--topic", topics["logs"], "--bootstrap", broker.bootstrap, "--no-playbooks",
                    "--from", "0:100,1:0,2:0", "--to", "0:199,1:49,2:0", name="range.json")
    parts = ranged["inputs"][0]["partitions"]
    assert (parts["0"]["first_offset"], parts["0"]["last_offset"], parts["0"]["records"]) == (100, 199, 100)
    assert (parts["1"]["records"], parts["2"]["records"]) == (50, 1)

    timed = replay(tmp_path, "--topic", topics["logs"], "--bootstrap", broker.bootstrap, "--no-playbooks",
                   "--from", str(START + 2), "--to", str(START + 4), name="timed.json")
    assert timed["events"]["processed"] > 0
    assert START + 2 <= timed["time_range"]["first"] and timed["time_range"]["last"] <= START + 4


def test_a_kafka_replay_names_a_missing_topic(broker: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["replay", "--topic", "no-such-topic-here", "--bootstrap", broker.bootstrap,
                 "--report", str(tmp_path / "r.json")])
    assert code == 2
    assert "no topic 'no-such-topic-here'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists(), "no empty report left to be taken for a result"


@pytest.mark.slow
def test_the_html_report_of_a_real_replay_opens_offline_and_draws_every_plot(traffic: Path, tmp_path: Path,
                                                                             open_report: Any) -> None:
    report = Replay(load_config(ROOT / "configs/inferwatch.yaml"), inputs=[str(traffic)],
                    playbooks=str(ROOT / "playbooks")).run()
    opened = open_report(report)
    assert opened.errors == [] and opened.requests == [opened.url]
    drawn = opened.attrs("[data-plot]", "data-drawn")
    assert drawn == {key: str(n) for key, n in expected_points(report["series"]).items()}
    assert len(drawn) == 8 and all(int(n) > 0 for n in drawn.values())  # 4 plots for each of the 2 models
    assert opened.page.get_attribute("[data-timeline]", "data-drawn") == str(len(report["detections"]))
    assert "mallory" in opened.page.inner_text("body")


def test_the_progress_bar_shows_on_a_terminal_and_not_in_a_pipe(tmp_path: Path) -> None:
    import os
    import pty
    import subprocess
    import sys

    sample = tmp_path / "events.jsonl"
    sample.write_text("".join(json.dumps({"event_id": f"e{i}", "ts": START + i, "model": "m", "confidence": 0.9})
                              + "\n" for i in range(2000)))
    command = [sys.executable, "-m", "monitor", "replay", "--input", str(sample), "--no-playbooks",
               "--report", str(tmp_path / "r.json")]
    leader, follower = pty.openpty()
    with subprocess.Popen(command, stderr=follower, stdout=subprocess.DEVNULL, cwd=ROOT) as process:
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            shown += chunk
    os.close(leader)
    assert process.returncode == 0
    text = shown.decode(errors="replace")
    assert "2,000 events" in text and "ev/s" in text and "ETA" in text and "100%" in text
    piped = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert piped.returncode == 0 and "ev/s" not in piped.stderr and "replayed 2,000 messages" in piped.stderr


@pytest.mark.slow
def test_the_demo_writes_its_traffic_for_a_replay_the_same_every_time(tmp_path: Path) -> None:
    for name in ("a.jsonl.gz", "b.jsonl.gz"):
        assert main(["demo", "--write", str(tmp_path / name), "--duration", "4", "--rate", "1000"]) == 0
    assert lines(tmp_path / "a.jsonl.gz") == lines(tmp_path / "b.jsonl.gz")
    report = replay(tmp_path, "--input", str(tmp_path / "a.jsonl.gz"), "--no-playbooks")
    assert report["events"]["read"] == len(lines(tmp_path / "a.jsonl.gz"))
    assert set(report["models"]) == {"digits", "cancer"}
