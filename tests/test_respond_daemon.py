"""The respond stage in the daemon: detections from the topic, incidents through the journal, and a
daemon killed in the middle of a playbook, then restarted: nothing duplicated, nothing lost."""

from __future__ import annotations

import json
import signal
import sqlite3
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.conftest import Broker, Daemon, write_config
from tests.contract_servers import PagerDutyServer, WebhookServer
from tests.k8s_fake import FakeKubernetes
from tests.test_respond import ROUTING_KEY, detection

PLAYBOOK = """\
    name: extraction-response
    match: {detector: probing, kind: model_extraction}
    dedup: {key: "{{ model }}/{{ client_id }}", cooldown: 30m}
    steps:
      - {id: note, action: webhook, with: {url: "HOOK"}}
      - {id: isolate, action: k8s_isolate, with: {namespace: ml, deployment: fraud, mode: networkpolicy}}
      - {id: page, action: pagerduty, with: {routing_key: "${PD_ROUTING_KEY}", url: "PD_URL"}}
"""


@pytest.fixture
def kubernetes(tmp_path: Path) -> Iterator[tuple[FakeKubernetes, Path]]:
    fake = FakeKubernetes().start()
    fake.add_deployment("ml", "fraud", match_labels={"app": "fraud"})
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "inferwatch", "user": {"token": "k8s-t0ken-secret"}}],
        "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "inferwatch"}}]}))
    yield fake, kubeconfig
    fake.stop()


def start(tmp_path: Path, broker: Broker, topics: dict[str, str], books: Path, kubeconfig: Path,
          monkeypatch: pytest.MonkeyPatch, name: str) -> Daemon:
    config = write_config(tmp_path / "config.yaml", broker.bootstrap, topics, tmp_path / "state",
                          respond={"playbooks": str(books), "group_id": "respond-test",
                                   "kubernetes": {"mode": "kubeconfig", "kubeconfig": str(kubeconfig)}})
    monkeypatch.setenv("PD_ROUTING_KEY", ROUTING_KEY)
    return Daemon(config, tmp_path / f"{name}.log", "--stage", "respond")


def steps(state: Path, incident: str | None = None) -> dict[str, str]:
    with sqlite3.connect(state / "journal.sqlite") as db:
        rows = db.execute("SELECT step_id, state FROM steps" + (" WHERE incident_id = ?" if incident else ""),
                          (incident,) if incident else ()).fetchall()
    return dict(rows)


@pytest.mark.slow
def test_killed_mid_playbook_and_restarted_nothing_duplicated_nothing_lost(
        tmp_path: Path, broker: Broker, kubernetes: tuple[FakeKubernetes, Path], monkeypatch: pytest.MonkeyPatch,
        daemons: list[Daemon]) -> None:
    fake, kubeconfig = kubernetes
    hook, pagerduty = WebhookServer().start(), PagerDutyServer().start()
    try:
        books = tmp_path / "books"
        books.mkdir()
        (books / "a.yaml").write_text(textwrap.dedent(PLAYBOOK).replace("HOOK", hook.url)
                                      .replace("PD_URL", pagerduty.url))
        topics = broker.topics("respond")
        broker.produce(topics["detections"], [json.dumps(detection(1)).encode()], [b"fraud-eu"])
        gate = fake.hold("POST", "networkpolicies")  # the policy is created, the answer never arrives
        first = start(tmp_path, broker, topics, books, kubeconfig, monkeypatch, "first")
        daemons.append(first)
        first.wait_for(lambda: any(r.method == "POST" for r in fake.requests), what="the isolation request")
        first.wait_for(lambda: len(hook.requests) == 1, what="the note delivered")
        first.process.send_signal(signal.SIGKILL)  # mid-step: the cluster has the policy, the journal says running
        first.process.wait(10)
        gate.set()
        assert steps(tmp_path / "state")["isolate"] == "running"

        second = start(tmp_path, broker, topics, books, kubeconfig, monkeypatch, "second")
        daemons.append(second)
        second.wait_for(lambda: steps(tmp_path / "state") == {"note": "delivered", "isolate": "done",
                                                               "page": "delivered"}, what="the playbook finished")
        posts = [r for r in fake.requests if r.method == "POST"]
        assert len(posts) == 1  # reconciled: the policy was found, not created twice
        assert len(hook.requests) == 1 and len(pagerduty.requests) == 1
        broker.produce(topics["detections"], [json.dumps(detection(2)).encode()], [b"fraud-eu"])
        second.wait_for(lambda: second.metric("inferwatch_incidents_total", playbook="extraction-response",
                                              outcome="joined") == 1, what="the second detection joined")
        with sqlite3.connect(tmp_path / "state" / "journal.sqlite") as db:
            assert db.execute("SELECT COUNT(*), SUM(detections) FROM incidents").fetchone() == (1, 2)
        log = (tmp_path / "first.log").read_text() + second.log()
        assert ROUTING_KEY not in log and "k8s-t0ken-secret" not in log
        assert "found done after a restart" in second.log()
        assert second.stop() == 0
    finally:
        hook.stop()
        pagerduty.stop()


@pytest.mark.slow
def test_sighup_reloads_and_inferwatch_approve_runs_the_gated_step(
        tmp_path: Path, broker: Broker, kubernetes: tuple[FakeKubernetes, Path], monkeypatch: pytest.MonkeyPatch,
        daemons: list[Daemon]) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    fake, kubeconfig = kubernetes
    hook = WebhookServer().start()
    try:
        books = tmp_path / "books"
        books.mkdir()
        (books / "a.yaml").write_text(f"name: first\nmatch: {{detector: drift}}\n"
                                      f"steps: [{{id: s, action: webhook, with: {{url: '{hook.url}'}}}}]\n")
        topics = broker.topics("approve")
        monkeypatch.setenv("INFERWATCH_ADMIN_TOKEN", "adm1n-t0ken")
        daemon = start(tmp_path, broker, topics, books, kubeconfig, monkeypatch, "daemon")
        daemons.append(daemon)
        daemon.wait_for(daemon.ready, what="ready")
        (books / "a.yaml").write_text(textwrap.dedent(f"""\
            name: gated
            match: {{detector: probing}}
            steps:
              - {{id: note, action: webhook, with: {{url: "{hook.url}"}}}}
              - {{id: isolate, action: k8s_isolate, approval: required, with: {{namespace: ml, deployment: fraud}}}}
        """))
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for(lambda: "playbooks reloaded: gated" in daemon.log(), what="the reload")
        broker.produce(topics["detections"], [json.dumps(detection(1)).encode()], [b"fraud-eu"])
        daemon.wait_for(lambda: steps(tmp_path / "state").get("isolate") == "awaiting_approval", what="the gate")

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "monitor", *args, "--url", f"http://127.0.0.1:{daemon.port}"],
                                  cwd=ROOT, capture_output=True, text=True, timeout=30)

        pending = cli("pending")
        assert pending.returncode == 0 and " isolate (k8s_isolate, playbook gated" in pending.stdout
        incident = pending.stdout.split()[0]
        assert not [r for r in fake.requests if r.method == "POST"]  # nothing done before the approval
        approved = cli("approve", incident, "isolate", "--by", "alice")
        assert approved.returncode == 0, approved.stderr
        daemon.wait_for(lambda: steps(tmp_path / "state").get("isolate") == "done", what="the isolation")
        assert len([r for r in fake.requests if r.method == "POST"]) == 1
        again = cli("approve", incident, "isolate")
        assert again.returncode == 1 and "is done, not awaiting approval" in again.stderr
        monkeypatch.setenv("INFERWATCH_ADMIN_TOKEN", "wrong")
        assert "missing or wrong bearer token" in cli("pending").stderr
        assert "adm1n-t0ken" not in daemon.log()
    finally:
        hook.stop()
