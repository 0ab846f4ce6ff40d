"""Detect-stage throughput against the raw kafka-python consume rate, on the same data in the same run.

Produces K realistic events (64 features, class probabilities, latency, client ids; a small share
malformed) to the embedded broker, then measures
  (a) raw: a bare kafka-python consumer reading the K records, doing nothing with them;
  (b) daemon: the detect stage (decode, dead-letter, route, every configured detector, publish
      detections and dead letters, commit offsets) over the same K records;
and prints both rates and their ratio (target: >= 0.5).

    python bench/throughput.py [--events 300000] [--features 64] [--config configs/inferwatch.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import monitor  # noqa: E402,F401  (first: it sets single-threaded BLAS before numpy loads, as the daemon does)

import numpy as np  # noqa: E402

from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from monitor.broker import EmbeddedBroker  # noqa: E402
from monitor.config import load_config  # noqa: E402
from monitor.daemon import DetectDaemon  # noqa: E402

PARTITIONS = 3


def make_events(n: int, features: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(0, 1, (n, features)), 4)
    logits = rng.normal(0, 2, (n, 10))
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    latency = rng.lognormal(np.log(20), 0.3, n)
    out = []
    for i in range(n):
        if i % 1000 == 999:
            out.append(b'{"event_id": "bad", "ts": "not a time", "model": "m0"}')
            continue
        out.append(json.dumps({
            "event_id": f"e{i}", "ts": 1_764_000_000 + i * 0.001, "model": f"m{i % 4}",
            "model_version": "v1", "client_id": f"c{rng.integers(0, 5000)}",
            "features": x[i].tolist(), "prediction": int(proba[i].argmax()),
            "probabilities": np.round(proba[i], 5).tolist(), "latency_ms": round(float(latency[i]), 3),
            "input_bytes": features * 8, "status": "ok",
        }).encode())
    return out


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=512 * 1024,
                             max_request_size=8 * 1024 * 1024)
    for i, value in enumerate(values):
        producer.send(topic, key=str(i % 997).encode(), value=value)
    producer.flush(120)
    producer.close()


def raw_rate(bootstrap: str, topic: str, total: int) -> float:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             max_poll_records=5000, fetch_max_bytes=64 * 1024 * 1024,
                             max_partition_fetch_bytes=1024 * 1024)
    parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    seen, start = 0, None
    while seen < total:
        for records in consumer.poll(timeout_ms=1000).values():
            if start is None:
                start = time.perf_counter()
            seen += len(records)
    elapsed = time.perf_counter() - start
    consumer.close()
    return total / elapsed


def daemon_rate(bootstrap: str, topics: dict[str, str], total: int, config_path: str | None,
                state_dir: str) -> tuple[float, DetectDaemon]:
    config = load_config(config_path, {
        "kafka.bootstrap_servers": [bootstrap], "kafka.topics.logs": topics["logs"],
        "kafka.topics.dead_letters": topics["dead_letters"], "kafka.topics.detections": topics["detections"],
        "kafka.group_id": f"bench-{uuid.uuid4().hex[:6]}", "kafka.max_poll_interval_ms": 10000,
        "state.dir": state_dir, "logging.level": "WARNING",
    })
    # The detect stage alone: the playbooks (respond stage) read the detections topic, a few records.
    daemon = DetectDaemon(config, http=False, stage="detect")
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    while daemon.first_batch_at is None or daemon.processed < total:
        if not thread.is_alive():
            raise SystemExit("the daemon stopped before consuming every event (see the log above)")
        time.sleep(0.01)
    elapsed = daemon.last_batch_at - daemon.first_batch_at
    daemon.stop()
    thread.join(30)
    return total / elapsed, daemon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each; medians are reported")
    parser.add_argument("--config", help="daemon config (default: configs/inferwatch.yaml)",
                        default=os.path.join(os.path.dirname(__file__), "..", "configs", "inferwatch.yaml"))
    args = parser.parse_args()

    from monitor.daemon import tune_garbage_collector
    from monitor.ops import logs
    logs.setup("WARNING", "text")
    # The daemon tunes the collector for the whole process; apply it first so that the raw consumer,
    # measured in the same process, runs under the same conditions.
    tune_garbage_collector()
    print(f"generating {args.events} events with {args.features} features ...", flush=True)
    values = make_events(args.events, args.features)
    mean_bytes = sum(map(len, values)) / len(values)
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as state_dir:
        tag = uuid.uuid4().hex[:6]
        topics = {"logs": f"bench-{tag}", "dead_letters": f"bench-{tag}.dlq", "detections": f"bench-{tag}.det"}
        broker.create_topics({topics["logs"]: PARTITIONS, topics["dead_letters"]: 1, topics["detections"]: 1})
        start = time.perf_counter()
        produce(broker.bootstrap, topics["logs"], values)
        print(f"produced in {time.perf_counter() - start:.1f}s ({mean_bytes:.0f} bytes/event)", flush=True)
        raws, detects = [], []
        for round_ in range(args.rounds):  # alternate, so both see the same machine conditions
            raws.append(raw_rate(broker.bootstrap, topics["logs"], len(values)))
            rate, daemon = daemon_rate(broker.bootstrap, topics, len(values), args.config,
                                       os.path.join(state_dir, str(round_)))
            detects.append(rate)
            print(f"round {round_ + 1}: raw {raws[-1]:,.0f}/s, daemon {detects[-1]:,.0f}/s", flush=True)
        raw, detect = float(np.median(raws)), float(np.median(detects))
    detectors = sorted({d.name for r in daemon.pipeline.routes.values() if r for d in r.detectors})
    import crc32c  # noqa: F401  (the bench is only meaningful with it; import fails loudly otherwise)
    print(f"detectors enabled      : {', '.join(detectors)} on {daemon.pipeline.tracked} models")
    print(f"medians of {args.rounds} rounds, {args.events} events of {mean_bytes:.0f} bytes")
    print(f"raw kafka-python       : {raw:>10,.0f} events/s")
    print(f"detect stage (daemon)  : {detect:>10,.0f} events/s  (decode, detect, publish, commit)")
    print(f"ratio                  : {detect / raw:>10.2f}  (target >= 0.5)")
    print(f"per event              : {1e6 / detect:>10.1f} µs daemon, {1e6 / raw:.1f} µs raw")


if __name__ == "__main__":
    main()
