"""Fixtures that start real processes: the embedded Kafka-protocol broker (behind a TCP proxy so a test
can take it away) and the daemon as a subprocess; every fixture stops what it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from monitor.broker import EmbeddedBroker, free_port
from monitor.detectors import ModelBatch
from tests.tcpproxy import TcpProxy

ROOT = Path(__file__).resolve().parent.parent


class Broker:
    """The embedded broker behind a proxy: ``down()`` and ``up()`` take it away and bring it back."""

    def __init__(self) -> None:
        self.proxy_port = free_port()
        self.broker = EmbeddedBroker(advertised_port=self.proxy_port)
        self.proxy = TcpProxy(self.proxy_port, self.broker.port)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.proxy_port}"

    def start(self) -> "Broker":
        self.broker.start()
        self.proxy.start()
        return self

    def down(self) -> None:
        self.proxy.stop()

    def up(self) -> None:
        self.proxy.start()

    def stop(self) -> None:
        self.proxy.stop()
        self.broker.stop()

    def topics(self, prefix: str = "t", partitions: int = 3) -> dict[str, str]:
        """Fresh topic names for one test, created on the broker."""
        tag = f"{prefix}-{uuid.uuid4().hex[:8]}"
        names = {"logs": f"{tag}.logs", "dead_letters": f"{tag}.dlq", "detections": f"{tag}.detections"}
        self.broker.create_topics({names["logs"]: partitions, names["dead_letters"]: 1,
                                   names["detections"]: partitions})
        return names

    def produce(self, topic: str, values: list[bytes], keys: list[bytes | None] | None = None) -> None:
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, max_request_size=8 * 1024 * 1024)
        for i, value in enumerate(values):
            producer.send(topic, key=keys[i] if keys else None, value=value)
        producer.flush(30)
        producer.close()

    def consume_all(self, topic: str, expect: int | None = None, timeout: float = 20.0) -> list[Any]:
        """Every record of ``topic`` (waiting until ``expect`` arrived, when given)."""
        consumer = KafkaConsumer(topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
                                 enable_auto_commit=False, group_id=None, consumer_timeout_ms=1500)
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                out.extend(consumer)
                if expect is None or len(out) >= expect:
                    break
        finally:
            consumer.close()
        return out


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    b = Broker().start()
    yield b
    b.stop()


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    """A broker for a test that takes it down."""
    b = Broker().start()
    yield b
    b.stop()


def event(i: int, model: str = "fraud", **fields: Any) -> dict[str, Any]:
    out = {"event_id": f"e{i}", "ts": 1_764_000_000.0 + i * 0.01, "model": model, "client_id": f"c{i % 7}",
           "confidence": 0.9, "latency_ms": 20.0}
    out.update(fields)
    return out


def features_batch(x: np.ndarray, start: int = 0, model: str = "m") -> ModelBatch:
    """A batch of model ``model`` whose events carry only the feature rows ``x`` (already parsed), at
    offsets and times ``start``, ``start + 1``, ...: the drift detector's charts without JSON."""
    events = [SimpleNamespace(ts=float(start + i), features=None, confidence=None, probabilities=None,
                              prediction=None, label=None, event_id=str(start + i), client_id=None,
                              model_version=None, latency_ms=None) for i in range(len(x))]
    batch = ModelBatch(model, events, [SimpleNamespace(topic="t", partition=0, offset=start + i)
                                       for i in range(len(x))])
    batch.__dict__["features"] = (x, np.ones(len(x), dtype=bool))
    return batch


def write_config(path: Path, bootstrap: str, topics: dict[str, str], state_dir: Path, **extra: Any) -> Path:
    config: dict[str, Any] = {
        "kafka": {"bootstrap_servers": [bootstrap], "topics": topics, "group_id": f"g-{uuid.uuid4().hex[:6]}",
                  # The embedded broker holds a group join for the rebalance timeout: keep it short.
                  "max_poll_interval_ms": 5000, "session_timeout_ms": 6000, "ack_timeout": "3s",
                  "poll": {"max_records": 2000, "timeout_ms": 200}},
        "http": {"host": "127.0.0.1", "port": 0},
        "state": {"dir": str(state_dir), "checkpoint_interval": "1s"},
        "logging": {"level": "INFO", "format": "json"},
    }
    for section, values in extra.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section].update(values)
        else:
            config[section] = values
    path.write_text(yaml.safe_dump(config))
    return path


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    """The offsets ``group`` committed on ``topic``'s partitions, summed (0 for a partition without)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum((consumer.committed(TopicPartition(topic, p)) or 0) for p in range(partitions))
    finally:
        consumer.close()


def http_json(url: str, method: str = "GET", body: dict | None = None,
              authorization: str | None = None) -> tuple[int, Any, dict[str, str]]:
    """One request to the daemon's HTTP API: status, the JSON answer ({} when empty) and the headers, errors included."""
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(url, method=method, data=data)
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read() or b"{}"), dict(answer.headers.items())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"{}"), dict(exc.headers.items())


class Daemon:
    """``inferwatch run`` as a subprocess, with its HTTP port and log captured."""

    def __init__(self, config: Path, log_path: Path, *extra: str):
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "-c", str(config), "--http-port", str(self.port), *extra],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode} waiting for {what}:\n{self.log()}")
            try:
                if predicate():
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-4000:]}")

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, body = self.get("/metrics")
        assert status == 200
        out = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Start daemons with ``daemons.append(Daemon(...))``; all are stopped after the test."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop(signal.SIGKILL if d.process.poll() is None else signal.SIGTERM, timeout=5)
