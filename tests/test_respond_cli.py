"""The respond stage from the command line: a file run whose detections run a playbook, `playbooks
test`, `check -p`, reloads (changed file, failed reload, SIGHUP) and the destructive budget."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from monitor.ops.metrics import Metrics
from monitor.respond.actions.base import Services
from monitor.respond.engine import Responder
from monitor.respond.journal import Journal
from tests.contract_servers import WebhookServer
from tests.k8s_fake import FakeKubernetes
from tests.test_files_and_cli import ROOT, confidence_drop, inferwatch, jsonl
from tests.test_respond import detection, write_playbooks


@pytest.fixture
def hook() -> Iterator[WebhookServer]:
    server = WebhookServer().start()
    yield server
    server.stop()


DRIFT_BOOK = """\
    name: drift-hook
    match: {detector: drift, severity: ">=info"}
    dedup: {key: "{{ model }}/{{ kind }}"}
    steps:
      - {id: tell, action: webhook, with: {url: "RECEIVER", secret: "${HOOK_SECRET}"}}
      - {id: evidence, action: snapshot, with: {last_events: 50, scope: model}}
"""


def test_a_file_run_hands_its_detections_to_the_playbooks(tmp_path: Path, hook: WebhookServer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    from monitor.respond.actions.snapshot import verify
    from monitor.respond.actions.webhook import sign

    monkeypatch.setenv("HOOK_SECRET", "s1gning-secret")
    books = write_playbooks(tmp_path / "books", DRIFT_BOOK.replace("RECEIVER", hook.url))
    events = tmp_path / "events.jsonl"
    events.write_bytes(jsonl(confidence_drop()))
    result = inferwatch("run", "--input", str(events), "--output", str(tmp_path / "d.jsonl"), "-p", str(books),
                        state=tmp_path / "state")
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert len(hook.requests) == 1, result.stderr.decode()[-3000:]
    request = hook.requests[0]
    body = json.loads(request["body"])
    assert body["status"] == "firing" and body["detection"]["kind"] == "prediction_drift"
    headers = {name.lower(): value for name, value in request["headers"].items()}  # names are case-blind
    expected = sign("s1gning-secret", headers["x-inferwatch-timestamp"], request["body"])
    assert hmac.compare_digest(headers["x-inferwatch-signature"], expected)
    [manifest] = (tmp_path / "state" / "evidence").rglob("*.manifest.json")
    assert verify(manifest)
    record = json.loads(manifest.read_text())
    lines = gzip.decompress((manifest.parent / record["file"]).read_bytes()).splitlines()
    assert json.loads(lines[0])["detection"]["kind"] == "prediction_drift"
    assert record["events"] == 50 and len(lines) == 51  # the model's last events before the detection
    assert b"s1gning-secret" not in result.stderr


def test_playbooks_test_shows_what_would_run_without_secrets(tmp_path: Path) -> None:
    books = write_playbooks(tmp_path / "books", """\
        name: probing
        match: {detector: probing}
        steps:
          - {id: tell, action: slack, with: {webhook: "${SLACK_WEBHOOK_URL}", text: "{{ client_id }} probes"}}
          - {id: page, action: pagerduty, when: {severity: critical}, with: {routing_key: "${PD_ROUTING_KEY}"}}
          - {id: cut, action: k8s_isolate, approval: required, with: {namespace: ml, deployment: "{{ model }}"}}
        ---
        name: other
        match: {detector: drift}
        steps: [{id: s, action: webhook, with: {url: "https://example.invalid/x"}}]
    """)
    found = tmp_path / "d.json"
    found.write_text(json.dumps(detection(severity="warning", client_id="<b>{{ 7*7 }}</b>")))
    result = subprocess.run([sys.executable, "-m", "monitor", "playbooks", "test", "-p", str(books),
                             "--detection", str(found)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "2 playbooks loaded" in out and "1 match probing/model_extraction on fraud-eu" in out
    assert "+ probing: matches" in out and "- other: no match" in out
    assert "1. tell (slack, notification): would run" in out
    assert 'webhook: "***"' in out and "&lt;b&gt;{{ 7*7 }}&lt;/b&gt; probes" in out
    assert "2. page (pagerduty): skipped, its when does not hold" in out
    assert "3. cut (k8s_isolate, destructive): awaits approval, then runs" in out
    assert 'deployment: "fraud-eu"' in out


def test_check_rejects_a_broken_playbook_with_exit_2(tmp_path: Path) -> None:
    books = write_playbooks(tmp_path / "books", "name: a\nmatch: {kind: x}\nsteps: [{id: s, action: k8s_rollback, "
                                                 "with: {namespace: ml, deployment: Fraud_1}}]\n")
    result = subprocess.run([sys.executable, "-m", "monitor", "check", "-p", str(books)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{books / 'book.yaml'}: playbook 'a' steps[0].with:" in result.stderr
    assert "deployment" in result.stderr


def test_shipped_playbooks_and_config_check(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "monitor", "check", "-c", "configs/inferwatch.yaml"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "playbooks: ok (6 playbooks" in result.stdout


def test_a_changed_file_reloads_and_a_broken_one_keeps_the_old_set(tmp_path: Path, hook: WebhookServer,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    books = write_playbooks(tmp_path / "books", f"""\
        name: first
        match: {{detector: probing}}
        steps: [{{id: s, action: webhook, with: {{url: "{hook.url}"}}}}]
    """)
    metrics = Metrics()
    responder = Responder(books, Journal(tmp_path / "j.sqlite"), Services(state_dir=tmp_path), metrics=metrics)
    try:
        (books / "book.yaml").write_text((books / "book.yaml").read_text().replace("first", "second"))
        (books / "more.yaml").write_text("name: third\nmatch: {}\nsteps: [{id: s, action: snapshot}]\n")
        responder.reload_if_changed()
        assert [b.name for b in responder.playbooks.playbooks] == ["second", "third"]
        (books / "more.yaml").write_text("name: third\nmatch: {}\nsteps: [{id: s, action: snapshot, with: {x: 1}}]\n")
        responder.reload_if_changed()
        assert [b.name for b in responder.playbooks.playbooks] == ["second", "third"]  # kept
        assert "playbook reload failed, keeping the 2 loaded playbooks" in caplog.text
        assert "unknown key 'x'" in caplog.text
        assert metrics.respond_playbook_reloads.labels(outcome="failed")._value.get() == 1
        assert metrics.playbooks_loaded._value.get() == 2
    finally:
        responder.journal.close()


def test_destructive_steps_beyond_the_hourly_budget_are_refused(tmp_path: Path) -> None:
    from kubernetes import client as k8s

    fake = FakeKubernetes().start()
    try:
        for name in ("a", "b", "c"):
            fake.add_deployment("ml", name, match_labels={"app": name})
        books = write_playbooks(tmp_path / "books", """\
            name: cut
            match: {}
            dedup: {key: "{{ model }}"}
            steps:
              - {id: isolate, action: k8s_isolate, with: {namespace: ml, deployment: "{{ model }}"}}
        """)
        configuration = k8s.Configuration(host=fake.url)
        services = Services(state_dir=tmp_path, kubernetes=lambda: k8s.ApiClient(configuration))
        metrics = Metrics()
        responder = Responder(books, Journal(tmp_path / "j.sqlite"), services, max_destructive_per_hour=2,
                              metrics=metrics).start()
        try:
            ids = [responder.handle(detection(n, model=name))[0] for n, name in enumerate("abc")]
            responder.wait_idle()
            states = [responder.journal.step(i, "isolate")["state"] for i in ids]
            assert sorted(states) == ["done", "done", "refused"]
            refused = next(i for i in ids if responder.journal.step(i, "isolate")["state"] == "refused")
            assert "reach the budget (respond.max_destructive_per_hour: 2)" in responder.journal.step(
                refused, "isolate")["error"]
            assert len([r for r in fake.requests if r.method == "POST"]) == 2
        finally:
            responder.stop()
            responder.journal.close()
    finally:
        fake.stop()


def test_model_labels_from_the_config_reach_the_playbooks(tmp_path: Path, hook: WebhookServer) -> None:
    import yaml

    books = write_playbooks(tmp_path / "books", f"""\
        name: payments-team
        match: {{labels: {{team: pay*}}}}
        steps: [{{id: tell, action: webhook, with: {{url: "{hook.url}"}}}}]
    """)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"models": {"overrides": [{"model": "fraud", "labels": {"team": "payments"}}]},
                                      "detectors": {"drift": {}}}))
    events = tmp_path / "events.jsonl"
    events.write_bytes(jsonl(confidence_drop()))
    result = inferwatch("run", "-c", str(config), "--input", str(events), "--output", str(tmp_path / "d.jsonl"),
                        "-p", str(books), state=tmp_path / "state")
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    found = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert found and found[0]["labels"] == {"team": "payments"}
    assert len(hook.requests) == 1
    assert json.loads(hook.requests[0]["body"])["detection"]["labels"] == {"team": "payments"}
