"""Crash safety of the whole daemon (issue 9's crash test): 200,000 events of real models' traffic with
a probing client and a drift, the daemon (detect and respond stages) killed with SIGKILL at random
points five times and restarted each time; at the end every event was processed (committed), the
attacker and the drift were detected, the isolation ran once and every notification was delivered."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, Broker, Daemon, committed, write_config
from tests.contract_servers import WebhookServer
from tests.test_replay import lines, produce
from tests.test_respond_daemon import kubernetes  # noqa: F401 (fixture: the fake Kubernetes API)

PLAYBOOKS = {
    "probing.yaml": """\
        name: extraction
        match: {detector: probing, client_id: mallory}
        dedup: {key: "{{ model }}/{{ client_id }}", cooldown: 1h}
        steps:
          - {id: note, action: webhook, with: {url: "HOOK"}}
          - {id: isolate, action: k8s_isolate, with: {namespace: ml, deployment: digits, mode: networkpolicy}}
        """,
    "drift.yaml": """\
        name: drift
        match: {kind: feature_drift}
        dedup: {key: "{{ model }}", cooldown: 1h}
        steps:
          - {id: note, action: webhook, with: {url: "HOOK"}}
        """,
}


@pytest.fixture(scope="module")
def big_traffic(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    import gzip

    from monitor.demo.traffic import TrafficGenerator, TrafficPlan

    path = tmp_path_factory.mktemp("crash") / "traffic.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as out:
        TrafficGenerator(lambda key, value: out.write(value + b"\n"), TrafficPlan(duration=100, rate=2000)).simulate()
    return [line for line in lines(path) if line.strip()]


@pytest.mark.slow
def test_killed_five_times_nothing_lost_nothing_done_twice(
        tmp_path: Path, broker: Broker, big_traffic: list[bytes], kubernetes: Any,  # noqa: F811
        daemons: list[Daemon]) -> None:
    fake, kubeconfig = kubernetes
    fake.add_deployment("ml", "digits", match_labels={"app": "digits"})
    hook = WebhookServer().start()
    try:
        books = tmp_path / "books"
        books.mkdir()
        for name, text in PLAYBOOKS.items():
            (books / name).write_text(textwrap.dedent(text).replace("HOOK", hook.url))
        assert len(big_traffic) >= 200_000
        topics = broker.topics("crash", partitions=3)
        produce(broker, topics["logs"], big_traffic)
        shipped = yaml.safe_load((ROOT / "configs/inferwatch.yaml").read_text())
        config = write_config(
            tmp_path / "config.yaml", broker.bootstrap, topics, tmp_path / "state", detectors=shipped["detectors"],
            respond={"playbooks": str(books), "group_id": f"respond-{topics['logs']}",
                     "kubernetes": {"mode": "kubeconfig", "kubeconfig": str(kubeconfig)}})
        group = yaml.safe_load(config.read_text())["kafka"]["group_id"]

        rng = random.Random(int(os.environ.get("CRASH_SEED", "9")))
        for n in range(5):
            daemon = Daemon(config, tmp_path / f"run{n}.log")
            daemons.append(daemon)
            before = committed(broker.bootstrap, group, topics["logs"], 3)
            # kill once it has committed some progress, at a random moment after that
            daemon.wait_for(lambda: committed(broker.bootstrap, group, topics["logs"], 3) > before, timeout=120,
                            what=f"progress in run {n}")
            time.sleep(rng.uniform(0.0, 3.0))
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait(10)

        last = Daemon(config, tmp_path / "last.log")
        daemons.append(last)
        last.wait_for(lambda: committed(broker.bootstrap, group, topics["logs"], 3) == len(big_traffic),
                      timeout=300, what="every event processed and committed")
        respond_group = yaml.safe_load(config.read_text())["respond"]["group_id"]
        last.wait_for(lambda: committed(broker.bootstrap, respond_group, topics["detections"], 3)
                      == len(broker.consume_all(topics["detections"])), timeout=60, what="every detection handled")
        journal = tmp_path / "state" / "journal.sqlite"

        def unfinished() -> list[Any]:
            with sqlite3.connect(journal) as db:
                return db.execute("SELECT 1 FROM steps JOIN incidents ON incidents.id = steps.incident_id WHERE "
                                  "incidents.state != 'limited' AND steps.state NOT IN ('delivered', 'done', "
                                  "'skipped')").fetchall()

        last.wait_for(lambda: not unfinished(), timeout=60, what="every step finished")
        assert last.stop() == 0
        with sqlite3.connect(journal) as db:
            incidents = db.execute("SELECT id, playbook, key FROM incidents WHERE state != 'limited'").fetchall()
            isolations = [json.loads(d) for (d,) in db.execute("SELECT detail FROM steps WHERE step_id = 'isolate'")]

        found = [json.loads(r.value) for r in broker.consume_all(topics["detections"])]
        assert any(d["kind"] == "model_extraction" and d["client_id"] == "mallory" for d in found)
        assert any(d["kind"] == "feature_drift" and d["model"] == "digits" for d in found)
        keys = {key for _, _, key in incidents}
        assert "extraction:digits/mallory" in keys and "drift:digits" in keys
        assert len(incidents) == len(keys), "one incident per key: a redelivered detection joined, not reopened"

        # The isolation happened once: one policy, one step that changed the cluster. (A retry after a
        # lost answer may ask again and be told 409: that changes nothing.)
        policies = [key for key in fake.objects if key[0] == "networkpolicies"]
        assert len(policies) == 1 and len(isolations) == 1
        assert isolations[0].get("changed") or isolations[0].get("reconciled"), isolations
        noted = {json.loads(r["body"])["incident"]["id"] for r in hook.requests}
        assert noted == {incident_id for incident_id, _, _ in incidents}, "no notification lost"
    finally:
        hook.stop()
