"""The /metrics exposition after real work passes Prometheus' own linter, `promtool check metrics`, and
carries the metric families dashboards and alerts are built on."""

from __future__ import annotations

import json
import random
import shutil
import subprocess

import pytest
from prometheus_client import generate_latest

from monitor.config import load_config
from monitor.ops.api import OperatorSurface
from monitor.ops.metrics import Metrics
from monitor.ops.scheduler import Jobs
from monitor.pipeline import Pipeline
from monitor.sources.files import FileRecord

REQUIRED = {
    "inferwatch_events_total": "counter",
    "inferwatch_dead_letters_total": "counter",
    "inferwatch_detections_total": "counter",
    "inferwatch_batch_seconds": "histogram",
    "inferwatch_consumer_lag": "gauge",
    "inferwatch_last_event_timestamp_seconds": "gauge",
}


def worked_metrics() -> Metrics:
    """Metrics after batches like the daemon's: good events with a confidence drop, bad messages, a
    model over the limit, a failing detector, a checkpoint, and the lag of a partition."""
    metrics = Metrics()
    metrics.build.info({"version": "test"})
    config = load_config(None, {"limits.max_models": 2, "detectors": {"drift": {}, "confidence": {"reference_size": 1000}}})
    pipeline = Pipeline(config, metrics)
    operator = OperatorSurface(config, metrics, persist=False)  # the daemon's model inventory
    pipeline.after_batch = operator.after_batch
    rng = random.Random(5)
    events = [{"event_id": f"e{i}", "ts": 1_764_000_000 + i * 0.01, "model": "fraud",
               "confidence": min(1.0, rng.gauss(0.93, 0.02)) if i < 3000 else rng.gauss(0.6, 0.05)}
              for i in range(4500)]
    events += [{"event_id": "x", "ts": 1_764_000_000, "model": name, "confidence": 0.9} for name in ("credit", "churn")]
    raw = [json.dumps(e).encode() for e in events] + [b"not json", b"[1]", b'{"ts": 1}', b""]
    records = [FileRecord(value, None, "logs", 0, i, None) for i, value in enumerate(raw)]
    processed = 0
    for start in range(0, len(records), 1000):
        batch = records[start:start + 1000]
        with metrics.batch_seconds.time():
            processed += pipeline.process(batch).processed
        metrics.batch_events.observe(len(batch))
    processed += pipeline.flush().processed
    assert processed == 4500 + 1  # fraud's events and credit's one; churn is over limits.max_models
    credit = pipeline.routes["credit"].detectors[0]
    credit.update = lambda batch: 1 / 0  # a detector bug, to count
    pipeline.process([FileRecord(json.dumps({**events[-2], "event_id": "y"}).encode(), None, "logs", 0, 0, None)])
    pipeline.flush()  # the end of the input: the newest ticks run too
    jobs = Jobs(metrics)
    jobs.done("checkpoint", True)
    operator.save()
    jobs.done("checkpoint", False)
    metrics.scrape_up.labels("fraud-0").set(1)  # what the scrape job sets (tests/test_scrape_and_jobs.py)
    metrics.server_resource.labels("fraud", "fraud-0", "memory_mb").set(512.0)
    metrics.checkpoint_seconds.set(0.004)
    metrics.consumer_lag.labels("logs", "0").set(12)
    metrics.broker_up.set(1)
    metrics.ready.set(1)
    metrics.publish_failures.inc()
    metrics.commit_failures.inc()
    from tests.test_respond import detection

    respond(metrics, [detection()])
    return metrics


def respond(metrics: Metrics, detections: list[dict]) -> None:
    """The respond stage's work: a playbook delivering to a real receiver, a reload that fails."""
    import tempfile
    from pathlib import Path

    from monitor.respond.actions.base import Services
    from monitor.respond.engine import Responder
    from monitor.respond.journal import Journal
    from tests.contract_servers import WebhookServer

    hook = WebhookServer().start()
    with tempfile.TemporaryDirectory() as tmp:
        books = Path(tmp) / "books"
        books.mkdir()
        (books / "a.yaml").write_text(f"name: a\nmatch: {{}}\nsteps: [{{id: s, action: webhook, with: {{url: '{hook.url}'}}}}]\n")
        responder = Responder(books, Journal(Path(tmp) / "j.sqlite"), Services(state_dir=Path(tmp)),
                              metrics=metrics).start()
        assert detections and all(responder.handle(d) for d in detections[:1])
        assert responder.wait_idle()
        responder.deliver_due()
        (books / "a.yaml").write_text("name: a\nmatch: {}\nsteps: []\n")
        responder.reload()  # fails: counted, the old set kept
        responder.tick()
        responder.stop()
        responder.journal.close()
    hook.stop()


@pytest.fixture(scope="module")
def exposition() -> str:
    return generate_latest(worked_metrics().registry).decode()


def declared_types(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            out[name] = kind
    return out


def has_samples(text: str, family: str) -> bool:
    return any(line.startswith(family) and not line.startswith("#") for line in text.splitlines())


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian/Ubuntu: apt-get install prometheus)")
def test_exposition_passes_promtool_check_metrics(exposition):
    result = subprocess.run([shutil.which("promtool"), "check", "metrics"], input=exposition.encode(),
                            capture_output=True, timeout=60)
    report = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, f"promtool check metrics failed:\n{report}\n--- exposition ---\n{exposition}"


def test_required_metric_families_are_exposed_with_their_types(exposition):
    types = declared_types(exposition)
    assert {name: types.get(name) for name in REQUIRED} == REQUIRED


def test_every_metric_family_has_samples_after_work(exposition):
    empty = [name for name in declared_types(exposition) if not has_samples(exposition, name)]
    assert empty == []


def test_work_shows_in_the_counters(exposition):
    assert 'inferwatch_events_total{model="fraud",outcome="processed"} 4500.0' in exposition
    assert 'inferwatch_events_total{model="__other__",outcome="untracked"} 1.0' in exposition
    assert 'inferwatch_dead_letters_total{reason="empty_message"} 1.0' in exposition
    assert 'inferwatch_detections_total{detector="drift",kind="prediction_drift",model="fraud"' in exposition
    assert 'inferwatch_detector_errors_total{detector="drift"} 1.0' in exposition
