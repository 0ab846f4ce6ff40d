"""The scheduled jobs: the scrape of model servers' Prometheus endpoints (against a local HTTP server
serving prometheus_client's real exposition of a real process), failures counted and survived, and the
jobs of a running daemon visible in /metrics."""

from __future__ import annotations

import http.server
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, generate_latest

from monitor.config import ScrapeTarget, load_config
from monitor.errors import ConfigError
from monitor.ops.metrics import Metrics
from monitor.ops.scheduler import Jobs
from monitor.ops.scrape import Scraper, read_figures
from monitor.pipeline import Pipeline
from tests import resource_workload as workload
from tests.conftest import Daemon, free_port, write_config

# A real process whose memory the test grows on request: its figures are read from /proc by
# prometheus_client's ProcessCollector, as a model server's own /metrics would report them.
CHILD = """
import sys
hold = []
for line in sys.stdin:
    hold.append(bytearray(int(line)))  # zero-filled pages: committed, so resident
    sys.stdout.write("ok\\n"); sys.stdout.flush()
"""


class Exposition:
    """A local HTTP server answering /metrics with a registry's real text exposition (401 without the
    ``authorization`` header when one is required)."""

    def __init__(self, registry: CollectorRegistry, authorization: str | None = None):
        registry_ = registry

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if authorization is not None and self.headers.get("Authorization") != authorization:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = generate_latest(registry_) if self.path == "/metrics" else b"not found"
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server_process():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    yield child
    child.kill()
    child.wait()


@pytest.fixture
def exposition(server_process):
    registry = CollectorRegistry()
    ProcessCollector(pid=lambda: server_process.pid, registry=registry)
    gpu = Gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilisation (%)", ["gpu"], registry=registry)
    gpu.labels("0").set(30)
    gpu.labels("1").set(50)
    served = Exposition(registry)
    yield served
    served.close()


def resident_mb(pid: int) -> float:
    import os

    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_the_exposition_of_a_real_process_is_read(exposition, server_process):
    import urllib.request

    for _ in range(20):  # a process still starting grows between its exposition and /proc: read again
        text = urllib.request.urlopen(exposition.url, timeout=5).read().decode()
        figures = read_figures(text, ScrapeTarget(url=exposition.url, model="m"))
        if abs(figures["memory_bytes"] / 2**20 - resident_mb(server_process.pid)) < 2:
            break
        time.sleep(0.25)
    assert abs(figures["memory_bytes"] / 2**20 - resident_mb(server_process.pid)) < 2
    assert figures["cpu_seconds"] >= 0
    assert figures["gpu_utilization"] == 40  # the mean over the two GPUs


def test_scraped_figures_feed_the_resource_detector_and_a_memory_rise_is_reported(tmp_path, exposition,
                                                                                  server_process):
    config = load_config(None, {"detectors": {"resource": {"server_reference": 128}}})
    metrics = Metrics()
    pipeline = Pipeline(config, metrics)
    scraper = Scraper([ScrapeTarget(url=exposition.url, model="digits", name="digits-0")], 5.0, metrics)
    found = []

    def scrape(rounds: int) -> None:
        for _ in range(rounds):
            assert scraper.run()
            for model, target, ts, figures in scraper.drain():
                found.extend(pipeline.server_figures(model, target, ts, figures))

    scrape(131)  # the baseline (128 scrapes) and a few more
    assert found == []
    detector = pipeline.routes["digits"].detectors[0]
    server = detector.describe()["servers"]["digits-0"]
    assert server["state"] == "armed"
    assert abs(server["last"]["memory_mb"] - resident_mb(server_process.pid)) < 2
    assert metrics.registry.get_sample_value("inferwatch_scrape_up", {"target": "digits-0"}) == 1
    assert metrics.registry.get_sample_value(
        "inferwatch_server_resource", {"model": "digits", "target": "digits-0", "figure": "gpu_utilization"}) == 40

    before = resident_mb(server_process.pid)
    server_process.stdin.write(f"{400 * 2**20}\n")  # the server's memory grows by 400 MB, and stays
    server_process.stdin.flush()
    assert server_process.stdout.readline().strip() == "ok"
    for _ in range(40):
        scrape(1)
        if found:
            break
    assert len(found) == 1, found
    d = found[0]
    assert d.detector == "resource" and d.kind == "resource_anomaly" and d.model == "digits"
    assert d.evidence["server"] == "digits-0" and d.evidence["figure"] == "memory_mb"
    assert d.evidence["observed"]["median"] > before + 350
    assert d.evidence["ratio"] == pytest.approx(d.evidence["observed"]["median"] / d.evidence["baseline"]["median"], rel=1e-3)
    assert d.atlas and "digits-0" in d.summary


def test_a_failing_target_is_counted_the_others_still_read_and_no_credential_is_logged(exposition, caplog):
    metrics = Metrics()
    dead = f"http://user:s3cret@127.0.0.1:{free_port()}/metrics"
    scraper = Scraper([ScrapeTarget(url=dead, model="m", name="down"), ScrapeTarget(url=exposition.url, model="m")],
                      1.0, metrics)
    with caplog.at_level("WARNING"):
        assert scraper.run() is False
        assert scraper.run() is False
    assert metrics.registry.get_sample_value("inferwatch_scrape_up", {"target": "down"}) == 0
    up = ScrapeTarget(url=exposition.url, model="m").label()
    assert metrics.registry.get_sample_value("inferwatch_scrape_up", {"target": up}) == 1
    assert [s[1] for s in scraper.drain()] == [up, up]
    failures = [r for r in caplog.records if "scraping down failed" in r.getMessage()]
    assert len(failures) == 1  # logged when it starts failing, not every round
    assert "s3cret" not in caplog.text


def test_credentials_go_in_headers_and_never_reach_the_log(server_process, monkeypatch, caplog):
    import base64

    registry = CollectorRegistry()
    ProcessCollector(pid=lambda: server_process.pid, registry=registry)
    basic = Exposition(registry, "Basic " + base64.b64encode(b"scraper:s3cret/pw").decode())
    bearer = Exposition(registry, "Bearer tok-123")
    try:
        monkeypatch.setenv("SCRAPE_TOKEN", "tok-123")
        port = basic.url.split(":")[2].split("/")[0]
        targets = [ScrapeTarget(url=f"http://scraper:s3cret%2Fpw@127.0.0.1:{port}/metrics", model="m", name="a"),
                   ScrapeTarget(url=bearer.url, model="m", name="b", bearer_token="${SCRAPE_TOKEN}"),
                   ScrapeTarget(url=f"http://scraper:wrong-pw@127.0.0.1:{port}/metrics", model="m", name="c")]
        metrics = Metrics()
        with caplog.at_level("WARNING"):
            scraper = Scraper(targets, 2.0, metrics)
            assert scraper.run() is False
        assert [s[1] for s in scraper.drain()] == ["a", "b"]
        assert metrics.registry.get_sample_value("inferwatch_scrape_up", {"target": "c"}) == 0
        assert "scraping c failed: HTTP 401" in caplog.text
        # the daemon's log formatter hides every credential the targets carry
        from monitor.ops.logs import JsonFormatter, RedactingFormatter

        formatter = RedactingFormatter(JsonFormatter())
        for secret in ("s3cret/pw", "s3cret%2Fpw", "wrong-pw", "tok-123"):
            record = logging.LogRecord("t", logging.WARNING, __file__, 1, "leak: %s", (secret,), None)
            assert secret not in formatter.format(record)
    finally:
        basic.close()
        bearer.close()


def test_a_missing_environment_variable_in_a_target_is_a_config_error(monkeypatch):
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    with pytest.raises(ConfigError, match="NOT_SET_HERE is not set"):
        Scraper([ScrapeTarget(url="http://a:1/metrics", model="m", bearer_token="${NOT_SET_HERE}")], 1.0, Metrics())


def test_a_job_that_raises_is_logged_and_counted_and_runs_again(caplog):
    metrics = Metrics()
    jobs = Jobs(metrics)
    calls = []

    def broken() -> bool:
        calls.append(1)
        raise RuntimeError("boom")

    jobs.run_every("broken", 0.05, broken)
    jobs.start()
    try:
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        jobs.stop()
    assert len(calls) >= 3
    assert metrics.registry.get_sample_value("inferwatch_job_failures_total", {"job": "broken"}) >= 3
    assert "scheduled job broken failed" in caplog.text


@pytest.mark.parametrize("jobs, error", [
    ({"scrape": {"targets": [{"url": "ftp://x/metrics", "model": "m"}]}}, "$.jobs.scrape.targets[0].url"),
    ({"scrape": {"targets": [{"url": "http://a:1/metrics", "model": "m"}, {"url": "http://a:1/m", "model": "m"}]}},
     "two targets named 'a:1'"),
    ({"scrape": {"every": "0.5s"}}, "$.jobs.scrape.every"),
    ({"scrape": {"every": "10s", "timeout": "10s"}}, "less than every"),
    ({"reference_refresh": "soon"}, "$.jobs.reference_refresh"),
    ({"scrape": {"targets": [{"url": "http://a:1/metrics"}]}}, "model"),
])
def test_bad_job_settings_are_config_errors(jobs, error):
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"detectors": {"resource": {}}, "jobs": jobs})
    assert error in str(caught.value)


def test_a_scrape_for_a_model_without_the_resource_detector_is_a_config_error():
    with pytest.raises(ConfigError, match="the resource detector does not run on 'm'"):
        load_config(None, {"jobs": {"scrape": {"targets": [{"url": "http://a:1/metrics", "model": "m"}]}}})


def test_the_daemon_reports_real_traffic_runs_its_jobs_survives_a_failing_one_and_shows_them(broker, tmp_path,
                                                                                           daemons, exposition):
    topics = broker.topics("jobs")
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    config = write_config(
        tmp_path / "c.yaml", broker.bootstrap, topics, tmp_path / "state",
        detectors={"resource": {}},
        jobs={"evict_idle_clients": "1s", "reference_refresh": "1s",
              "scrape": {"every": "1s", "timeout": "0.5s", "targets": [
                  {"url": exposition.url, "model": "fraud", "name": "fraud-0"},
                  {"url": dead, "model": "fraud", "name": "fraud-down"}]}})
    # real model traffic (tests/resource_workload.py), keyed by client: a slower v2 canary from event
    # 3000, and a client sending 8x-costlier requests from event 1500
    events = workload.events(workload.load(), n=6000, seed=5, model="fraud", v2_from=3000, v2_share=0.2,
                             sponge_client="sponger", sponge_from=1500, sponge_share=0.03)
    broker.produce(topics["logs"], [json.dumps(e).encode() for e in events],
                   [e["client_id"].encode() for e in events])
    d = Daemon(config, tmp_path / "daemon.log")
    daemons.append(d)
    d.wait_for(lambda: d.metric("inferwatch_events_total", model="fraud", outcome="processed") == 6000,
               what="events processed")
    found = [json.loads(r.value) for r in broker.consume_all(topics["detections"], expect=2)]
    assert sorted((f["kind"], f["client_id"], f["model_version"]) for f in found) == [
        ("latency_anomaly", None, "v2"), ("resource_anomaly", "sponger", "v1")], [f["summary"] for f in found]
    d.wait_for(lambda: all(d.metric("inferwatch_job_last_run_timestamp_seconds", job=job) > 0
                           for job in ("checkpoint", "evict_idle_clients", "reference_refresh")), what="jobs ran")
    d.wait_for(lambda: d.metric("inferwatch_job_failures_total", job="scrape") >= 2, what="scrape failures counted")
    assert d.metric("inferwatch_job_last_run_timestamp_seconds", job="scrape") > 0  # it runs, one target failing
    assert d.metric("inferwatch_scrape_up", target="fraud-0") == 1
    assert d.metric("inferwatch_scrape_up", target="fraud-down") == 0
    assert d.metric("inferwatch_server_resource", model="fraud", target="fraud-0", figure="memory_mb") > 0
    assert d.ready()
    assert d.get("/healthz")[0] == 200
    assert d.stop() == 0
    warnings = [r for r in d.log_records() if "scraping fraud-down failed" in r.get("msg", "")]
    assert len(warnings) == 1
