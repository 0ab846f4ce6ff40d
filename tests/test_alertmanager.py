"""The alertmanager action against a real Alertmanager (Debian's prometheus-alertmanager, started on a
loopback port by the fixture): the alert arrives with its labels, and the all-clear resolves it."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from monitor.broker import free_port
from monitor.ops.metrics import Metrics
from monitor.respond.actions.base import Services
from monitor.respond.engine import Responder
from monitor.respond.journal import Journal
from tests.test_respond import detection, wait_for, write_playbooks

BINARY = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
pytestmark = pytest.mark.skipif(BINARY is None, reason="needs Debian's prometheus-alertmanager "
                                                       "(apt-get install prometheus-alertmanager; .ci/run does)")


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    config = tmp_path / "alertmanager.yml"
    config.write_text("route:\n  receiver: devnull\nreceivers:\n  - name: devnull\n")
    port = free_port()
    process = subprocess.Popen(
        [BINARY, f"--config.file={config}", f"--storage.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "alertmanager.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError((tmp_path / "alertmanager.log").read_text()[-2000:])
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def alerts(url: str, active: bool = True) -> list[dict[str, Any]]:
    query = "active=true&silenced=false&inhibited=false&unprocessed=true" if active else "active=false"
    with urllib.request.urlopen(f"{url}/api/v2/alerts?{query}", timeout=5) as answer:
        return json.loads(answer.read())


def test_alert_is_raised_then_resolved_in_a_real_alertmanager(tmp_path: Path, alertmanager: str) -> None:
    books = write_playbooks(tmp_path / "books", f"""\
        name: to-alertmanager
        match: {{detector: probing}}
        resolve: {{after: 1s}}
        steps:
          - {{id: alert, action: alertmanager, with: {{url: "{alertmanager}", labels: {{team: ml-platform}}}}}}
    """)
    responder = Responder(books, Journal(tmp_path / "journal.sqlite"), Services(state_dir=tmp_path),
                          metrics=Metrics()).start()
    try:
        [incident] = responder.handle(detection())
        wait_for(lambda: responder.journal.step(incident, "alert")["state"] == "delivered", what="delivered")
        [alert] = alerts(alertmanager)
        assert alert["labels"] == {"alertname": "InferWatchIncident", "incident": incident,
                                   "playbook": "to-alertmanager", "model": "fraud-eu", "kind": "model_extraction",
                                   "severity": "critical", "client_id": "client-7", "team": "ml-platform"}
        assert alert["annotations"]["summary"] == "client-7 sampled the input space"
        assert alert["status"]["state"] == "active"
        time.sleep(1.1)
        responder.tick()  # quiet for resolve.after: the all-clear sets endsAt to now
        wait_for(lambda: [e["state"] for e in responder.journal.outbox(incident)] == ["delivered", "delivered"],
                 what="all-clear delivered")
        wait_for(lambda: alerts(alertmanager) == [], what="the alert resolved in Alertmanager")
    finally:
        responder.stop()
        responder.journal.close()


def test_an_incident_open_longer_than_the_ttl_keeps_its_alert_firing(tmp_path: Path, alertmanager: str) -> None:
    books = write_playbooks(tmp_path / "books", f"""\
        name: long
        match: {{detector: probing}}
        resolve: {{after: 1h}}
        steps:
          - {{id: alert, action: alertmanager, with: {{url: "{alertmanager}", ttl: 2s}}}}
    """)
    responder = Responder(books, Journal(tmp_path / "journal.sqlite"), Services(state_dir=tmp_path),
                          metrics=Metrics()).start()
    try:
        [incident] = responder.handle(detection())
        wait_for(lambda: responder.journal.step(incident, "alert")["state"] == "delivered", what="delivered")
        first_end = responder.journal.step(incident, "alert")["detail"]["endsAt"]
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # the scheduler's tick, every few seconds in the daemon
            responder.tick()
            time.sleep(0.3)
        assert responder.journal.step(incident, "alert")["detail"]["endsAt"] > first_end
        [alert] = alerts(alertmanager)  # 4 s after it was first sent with a 2 s ttl: still firing
        assert alert["labels"]["incident"] == incident and alert["status"]["state"] == "active"
    finally:
        responder.stop()
        responder.journal.close()
