"""The operator surface: the model inventory, the risk register, /api/* behind the admin token,
``inferwatch status`` and ``inferwatch register export``; live on the real broker with two models and an
incident, across a restart, and offline from the state directory."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest

from monitor.broker import free_port
from monitor.config import load_config
from monitor.detections import make_detection
from monitor.ops import inventory as inventory_module
from monitor.ops.api import OperatorSurface
from monitor.ops.hll import HyperLogLog
from monitor.ops.http import HttpServer
from monitor.ops.inventory import Inventory
from monitor.ops.metrics import Metrics
from monitor.ops.register import RiskRegister, csv_text, export
from monitor.pipeline import Pipeline
from monitor.sources.files import FileRecord
from tests.conftest import ROOT, Broker, Daemon, http_json, write_config

TOKEN = "0perator-t0ken"
T0 = 1_764_000_000.0


# -- the stream: two models, one of which drifts -----------------------------------------------------


def events(model: str, n: int, *, change_at: int | None = None, clients: int, version: Any = None,
           start: int = 0, seed: int = 7) -> list[dict[str, Any]]:
    """``model``'s events: confident predictions, unsure ones from ``change_at`` on (a drift of the
    confidence stream); ``version`` a name or a function of the event's index."""
    rng = random.Random(seed)
    out = []
    for i in range(start, start + n):
        unsure = change_at is not None and i >= change_at
        confidence = rng.gauss(0.62, 0.06) if unsure else rng.gauss(0.93, 0.02)
        e = {"event_id": f"{model}-{i}", "ts": T0 + i * 0.01, "model": model, "client_id": f"{model}-c{i % clients}",
             "confidence": min(1.0, max(0.0, confidence)), "latency_ms": 20.0}
        named = version(i) if callable(version) else version
        if named is not None:
            e["model_version"] = named
        out.append(e)
    return out


def encoded(rows: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(r).encode() for r in rows]


PLAYBOOK = """\
    name: drift-watch
    match: {detector: drift, model: fraud}
    dedup: {key: "{{ model }}", cooldown: 30m}
    dry_run: true
    steps:
      - {id: tell, action: webhook, with: {url: "http://127.0.0.1:9/never-called"}}
      - {id: isolate, action: k8s_isolate, with: {namespace: ml, deployment: fraud}}
"""


def operator_config(tmp_path: Path, broker: Broker, topics: dict[str, str]) -> Path:
    reference = tmp_path / "reference.jsonl"
    reference.write_bytes(b"\n".join(encoded(events("fraud", 2000, clients=7, seed=8)
                                             + events("churn", 2000, clients=50, seed=9))) + b"\n")
    books = tmp_path / "books"
    books.mkdir()
    (books / "drift.yaml").write_text(textwrap.dedent(PLAYBOOK))
    return write_config(tmp_path / "config.yaml", broker.bootstrap, topics, tmp_path / "state",
                        detectors={"drift": {"reference": str(reference)},
                                   # never learnt within the test: shows the learning phase
                                   "confidence": {"reference_size": 100_000}},
                        respond={"playbooks": str(books), "group_id": f"respond-{topics['logs']}"})


def get(daemon: Daemon, path: str, token: str | None = TOKEN) -> tuple[int, Any, dict[str, str]]:
    return http_json(f"http://127.0.0.1:{daemon.port}{path}", authorization=f"Bearer {token}" if token else None)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def by_model(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["model"]: m for m in view["models"]}


def phases(model: dict[str, Any]) -> dict[str, str]:
    return {d["detector"]: d["phase"] for d in model["detectors"]}


@pytest.mark.slow
def test_live_inventory_register_and_incidents_survive_a_restart(tmp_path: Path, broker: Broker, daemons: list[Daemon],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERWATCH_ADMIN_TOKEN", TOKEN)
    # One partition: the events reach the detectors in event-time order however they are polled, so
    # the detections, and so the drift detector's phase at the end, are the same on every run.
    topics = broker.topics("operator", partitions=1)
    config = operator_config(tmp_path, broker, topics)
    fraud = events("fraud", 6000, change_at=4000, clients=7, version=lambda i: "v1" if i < 3000 else "v2")
    churn = events("churn", 3000, clients=50, version="2024-06")
    broker.produce(topics["logs"], encoded(fraud + churn), [r["client_id"].encode() for r in fraud + churn])

    first = Daemon(config, tmp_path / "first.log")
    daemons.append(first)
    state = tmp_path / "state"

    def incidents_in_journal() -> list[tuple]:
        if not (state / "journal.sqlite").exists():
            return []
        with sqlite3.connect(state / "journal.sqlite") as db:
            try:
                return db.execute("SELECT id, state FROM incidents").fetchall()
            except sqlite3.OperationalError:  # the file is there, its tables not yet
                return []

    def settled() -> bool:
        status, view, _ = get(first, "/api/models")
        models = by_model(view)
        return (status == 200 and models.get("fraud", {}).get("events") == 6000
                and models.get("churn", {}).get("events") == 3000 and models["fraud"]["open_incidents"] == 1)

    first.wait_for(lambda: len(incidents_in_journal()) == 1, what="the playbook's incident")
    first.wait_for(settled, what="both models in the inventory with the incident")
    detections = [json.loads(r.value) for r in broker.consume_all(topics["detections"])]
    assert detections and {d["model"] for d in detections} == {"fraud"}

    # -- the inventory: counts, versions, distinct clients, detectors' phases ----------------------
    status, view, _ = get(first, "/api/models")
    models = by_model(view)
    assert sorted(models) == ["churn", "fraud"]
    fraud_row, churn_row = models["fraud"], models["churn"]
    assert [(v["version"], v["events"]) for v in fraud_row["versions"]] == [("v1", 3000), ("v2", 3000)]
    assert [(v["version"], v["events"]) for v in churn_row["versions"]] == [("2024-06", 3000)]
    assert abs(fraud_row["clients_estimate"] - 7) <= 1 and abs(churn_row["clients_estimate"] - 50) <= 2
    assert fraud_row["first_seen"] == T0 and fraud_row["last_seen"] == pytest.approx(T0 + 59.99)
    assert phases(fraud_row) == {"drift": "alarming", "confidence": "learning"}
    assert phases(churn_row) == {"drift": "armed", "confidence": "learning"}
    assert fraud_row["detections"] == len(detections) and churn_row["detections"] == 0
    assert fraud_row["last_detection"]["detector"] == "drift"
    assert fraud_row["last_detection"]["ts"] == max(d["ts"] for d in detections)
    assert (fraud_row["open_incidents"], churn_row["open_incidents"], view["open_incidents"]) == (1, 0, 1)

    # -- the register: per technique and day, and the incident with what its steps did -------------
    status, one, _ = get(first, "/api/models/fraud")
    assert status == 200
    register = one["register"]
    assert register["detections"] == len(detections)
    assert register["atlas"]["AML.T0015"]["total"] == len(detections)  # the taxonomy of drift kinds
    assert register["atlas"]["AML.T0015"]["days"] == {"2025-11-24": len(detections)}
    assert register["atlas"]["AML.T0015"]["name"] == "Evade AI Model"
    assert register["incidents"] == {"open": 1, "closed": 0}
    [incident] = one["incidents"]
    assert (incident["playbook"], incident["state"], incident["dry_run"]) == ("drift-watch", "open", True)
    assert [(s["step"], s["action"], s["state"]) for s in incident["steps"]] == [
        ("tell", "webhook", "dry_run"), ("isolate", "k8s_isolate", "dry_run")]
    status, listed, _ = get(first, "/api/incidents")
    assert [i["id"] for i in listed["incidents"]] == [incident["id"]]
    assert get(first, "/api/models/nope")[0] == 404

    # -- a Prometheus info series per model and version ------------------------------------------
    metrics = first.metrics()
    info = {labels: value for (name, labels), value in metrics.items() if name == "inferwatch_model_info"}
    assert info == {(("detectors", "confidence,drift"), ("model", m), ("version", v)): 1.0
                    for m, v in [("fraud", "v1"), ("fraud", "v2"), ("churn", "2024-06")]}

    # -- the commands, against the running daemon --------------------------------------------------
    url = f"http://127.0.0.1:{first.port}"
    table = cli("status", "--url", url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("2 models watched, 1 open incident (daemon at")
    fraud_line = next(line for line in lines if line.startswith("fraud "))
    assert fraud_line.split()[:3] == ["fraud", "6,000", str(fraud_row["clients_estimate"])]
    assert "drift=alarming confidence=learning" not in fraud_line  # sorted by name:
    assert "confidence=learning drift=alarming" in fraud_line and fraud_line.endswith("1/1")
    assert any(line.split()[:2] == ["v1", "3,000"] for line in lines)
    assert any(line.startswith(f"  fraud  {incident['id']}  drift-watch (dry run)") for line in lines)
    as_json = cli("status", "--url", url, "--json")
    assert by_model(json.loads(as_json.stdout))["fraud"]["events"] == 6000
    exported = cli("register", "export", "--url", url, "--format", "csv")
    assert exported.returncode == 0, exported.stderr
    live_csv = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert sum(int(r["count"]) for r in live_csv if r["record"] == "detections") == len(detections)

    # -- a restart: everything is still there, and counting goes on ------------------------------
    assert first.stop() == 0
    second = Daemon(config, tmp_path / "second.log")
    daemons.append(second)
    second.wait_for(second.ready, what="ready after the restart")
    status, after, _ = get(second, "/api/models")
    restored = by_model(after)
    for model in ("fraud", "churn"):
        for key in ("events", "clients_estimate", "first_seen", "last_seen", "versions", "detections", "last_detection",
                    "open_incidents"):
            assert restored[model][key] == models[model][key], (model, key)
    assert phases(restored["fraud"])["drift"] == "alarming"  # as saved: its detector has seen no event yet
    more = events("churn", 1000, clients=60, version="2024-07", start=3000, seed=10)
    broker.produce(topics["logs"], encoded(more), [r["client_id"].encode() for r in more])
    second.wait_for(lambda: by_model(get(second, "/api/models")[1])["churn"]["events"] == 4000,
                    what="the new events counted on top of the restored ones")
    churn_now = by_model(get(second, "/api/models")[1])["churn"]
    assert [(v["version"], v["events"]) for v in churn_now["versions"]] == [("2024-06", 3000), ("2024-07", 1000)]
    assert abs(churn_now["clients_estimate"] - 60) <= 2  # clients 0..49 seen before, 0..59 now
    assert second.stop() == 0

    # -- offline, from the state directory: the same register ------------------------------------
    offline = cli("register", "export", "-c", str(config), "--format", "csv")
    assert offline.returncode == 0, offline.stderr
    rows = list(csv.DictReader(io.StringIO(offline.stdout)))
    assert [r for r in rows if r["record"] == "detections"] == [r for r in live_csv if r["record"] == "detections"]
    [incident_row] = [r for r in rows if r["record"] == "incident"]
    assert incident_row["incident"] == incident["id"] and incident_row["model"] == "fraud"
    assert incident_row["actions"] == "tell:webhook=dry_run; isolate:k8s_isolate=dry_run"
    assert incident_row["atlas"] == "AML.T0015" and incident_row["dry_run"] == "true"
    offline_status = json.loads(cli("status", "-c", str(config), "--json").stdout)
    assert by_model(offline_status)["churn"]["events"] == 4000
    assert offline_status["source"] == f"state directory {state}"
    assert TOKEN not in (tmp_path / "first.log").read_text() + second.log()


@pytest.mark.slow
def test_the_api_refuses_a_missing_or_wrong_token(tmp_path: Path, broker: Broker, daemons: list[Daemon],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERWATCH_ADMIN_TOKEN", TOKEN)
    topics = broker.topics("operator-auth")
    config = write_config(tmp_path / "config.yaml", broker.bootstrap, topics, tmp_path / "state")
    d = Daemon(config, tmp_path / "daemon.log")
    daemons.append(d)
    d.wait_for(d.ready, what="ready")
    for path in ("/api/models", "/api/models/fraud", "/api/incidents", "/api/register"):
        for token in (None, "wrong", TOKEN + "x", ""):
            status, body, headers = get(d, path, token)
            assert status == 401, (path, token)
            assert body == {"error": "missing or wrong bearer token"}
            assert headers["WWW-Authenticate"].startswith("Bearer")
        assert get(d, path)[0] in (200, 404)
    url = f"http://127.0.0.1:{d.port}"
    refused = cli("status", "--url", url, env={"INFERWATCH_ADMIN_TOKEN": "wrong"})
    assert refused.returncode == 2
    assert "answered 401 to /api/models: missing or wrong bearer token" in refused.stderr


# -- in-process: no token configured, methods --------------------------------------------------------


@pytest.fixture
def surface(tmp_path: Path) -> Any:
    config = load_config(None, {"state.dir": str(tmp_path / "state"), "http.host": "127.0.0.1", "http.port": 0,
                                "respond.admin_token_env": "OPERATOR_TEST_TOKEN"})
    metrics = Metrics()
    operator = OperatorSurface(config, metrics)
    http = HttpServer("127.0.0.1", 0, metrics, lambda: (True, {}), lambda: (True, {}))
    operator.routes(http)
    http.start()
    yield operator, f"http://127.0.0.1:{http.port}"
    http.stop()


def fetch(url: str, token: str | None = None, method: str = "GET") -> tuple[int, dict[str, Any]]:
    status, body, _ = http_json(url, method, authorization=f"Bearer {token}" if token else None)
    return status, body


def test_the_api_is_off_with_503_while_no_token_is_configured(surface: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, url = surface
    monkeypatch.delenv("OPERATOR_TEST_TOKEN", raising=False)
    for path in ("/api/models", "/api/models/fraud", "/api/incidents", "/api/register"):
        status, body = fetch(url + path, "anything")
        assert status == 503 and "set OPERATOR_TEST_TOKEN" in body["error"]


def test_the_api_answers_get_only(surface: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, url = surface
    monkeypatch.setenv("OPERATOR_TEST_TOKEN", TOKEN)
    assert fetch(url + "/api/models", TOKEN, "POST")[0] == 405
    status, body = fetch(url + "/api/models", TOKEN)
    assert status == 200 and body["models"] == [] and body["open_incidents"] == 0


# -- the inventory on the pipeline ---------------------------------------------------------------------


def records(rows: list[dict[str, Any]]) -> list[FileRecord]:
    return [FileRecord(json.dumps(r).encode(), None, "logs", 0, i, None) for i, r in enumerate(rows)]


def fed_pipeline(tmp_path: Path, rows: list[dict[str, Any]], **overrides: Any) -> tuple[Pipeline, OperatorSurface, Metrics]:
    config = load_config(None, {"state.dir": str(tmp_path / "state"), "event_time.tick": None, **overrides})
    metrics = Metrics()
    operator = OperatorSurface(config, metrics)
    p = Pipeline(config, metrics)
    p.after_batch = operator.after_batch
    for start in range(0, len(rows), 1000):
        for d in p.process(records(rows[start:start + 1000])).detections:
            operator.on_detection(d)
    return p, operator, metrics


def test_the_inventory_counts_each_version_and_keeps_it_across_a_save(tmp_path: Path) -> None:
    rows = events("fraud", 3000, clients=40, version=lambda i: "v1" if i % 3 else None) + events("churn", 500, clients=3)
    _, operator, _ = fed_pipeline(tmp_path, rows)
    operator.save()
    assert (tmp_path / "state" / "inventory.json").stat().st_mode & 0o777 == 0o600
    again = OperatorSurface(load_config(None, {"state.dir": str(tmp_path / "state")}), Metrics())
    models = {m["model"]: m for m in again.inventory.summaries()}
    assert models == {m["model"]: m for m in operator.inventory.summaries()}
    # in order of first sight; events without a model_version are a version of their own
    assert [(v["version"], v["events"]) for v in models["fraud"]["versions"]] == [(None, 1000), ("v1", 2000)]
    # distinct clients are estimated (HyperLogLog): within one of the truth at these counts
    assert all(abs(v["clients_estimate"] - 40) <= 1 for v in models["fraud"]["versions"])
    assert models["churn"]["events"] == 500 and models["churn"]["clients_estimate"] == 3
    # drift learns its reference from a model's first 2000 events
    assert phases(models["fraud"]) == {"drift": "armed"} and phases(models["churn"]) == {"drift": "learning"}


def test_versions_per_model_are_bounded_and_their_info_series_go_with_them(tmp_path: Path) -> None:
    n = inventory_module.MAX_VERSIONS + 4
    rows = [e for k in range(n) for e in events("fraud", 10, clients=2, version=f"r{k}", start=k * 10)]
    _, operator, metrics = fed_pipeline(tmp_path, rows)
    [fraud] = operator.inventory.summaries()
    assert fraud["events"] == 10 * n  # the totals keep what evicted versions counted
    assert [v["version"] for v in fraud["versions"]] == [f"r{k}" for k in range(4, n)]
    series = [s.labels["version"] for s in metrics.registry.collect() if s.name == "inferwatch_model"
              for s in s.samples]
    assert sorted(series) == sorted(f"r{k}" for k in range(4, n))


def test_a_damaged_inventory_is_kept_aside_and_the_daemon_starts_with_an_empty_one(tmp_path: Path) -> None:
    (tmp_path / "inventory.json").write_text("{not json")
    assert Inventory.load(tmp_path).models == {}
    assert [p.name.split(".broken-")[0] for p in tmp_path.glob("inventory.json.broken-*")] == ["inventory.json"]


# -- the register ------------------------------------------------------------------------------------


def detection(kind: str, ts: float, model: str = "fraud", severity: str = "warning") -> Any:
    return make_detection(detector="probing", kind=kind, model=model, window_start=ts, ts=ts, severity=severity,
                          model_version="v3", client_id="mallory", summary=f"{kind} by mallory")


def test_the_register_groups_detections_per_day_and_technique_and_exports_csv(tmp_path: Path) -> None:
    register = RiskRegister()
    day = 86400.0
    for ts in (T0, T0 + 10, T0 + day):
        register.record(detection("model_extraction", ts))
    register.record(detection("query_flood", T0 + 20))
    register.save(tmp_path)
    document = export(RiskRegister.load(tmp_path), tmp_path / "journal.sqlite")
    fraud = document["models"]["fraud"]
    assert fraud["detections"] == 4
    assert fraud["atlas"]["AML.T0024.002"] == {"name": "Extract AI Model", "total": 3,
                                               "days": {"2025-11-24": 2, "2025-11-25": 1}}
    assert fraud["owasp"]["ML05"]["total"] == 4  # extraction and flood both map to model theft
    assert fraud["incidents"] == {"open": 0, "closed": 0} and document["incidents"] == []
    rows = list(csv.DictReader(io.StringIO(csv_text(document))))
    assert [(r["day"], r["kind"], r["count"], r["atlas"]) for r in rows] == [
        ("2025-11-24", "model_extraction", "2", "AML.T0024.002"),
        ("2025-11-24", "query_flood", "1", "AML.T0029 AML.T0034.000"),
        ("2025-11-25", "model_extraction", "1", "AML.T0024.002")]
    assert rows[0]["first_ts"] == "2025-11-24T16:00:00.000Z" and rows[0]["last_ts"] == "2025-11-24T16:00:10.000Z"


def test_incidents_the_journal_forgot_stay_in_the_register(tmp_path: Path) -> None:
    from monitor.respond.journal import Journal

    journal = Journal(tmp_path / "journal.sqlite")
    d = msgspec.to_builtins(detection("model_extraction", T0))
    journal.open("inc-1", "extraction-response", "fraud/mallory", d, False,
                 [("block", "block_client", True, "h")], now=T0)
    journal.set_step("inc-1", "block", "done", now=T0 + 1)
    journal.resolve("inc-1", "quiet", T0 + 60)
    register = RiskRegister()
    from monitor.ops.register import read_incidents

    register.archive(read_incidents(tmp_path / "journal.sqlite"))
    assert journal.forget_before(T0 + 3600) == 1  # the journal's retention
    journal.close()
    [incident] = register.all_incidents(tmp_path / "journal.sqlite")
    assert (incident["id"], incident["state"], incident["model"], incident["resolved_why"]) == (
        "inc-1", "resolved", "fraud", "quiet")
    assert [(s["step"], s["action"], s["state"]) for s in incident["steps"]] == [("block", "block_client", "done")]


# -- HyperLogLog -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 10, 200, 5_000, 200_000])
def test_hyperloglog_estimates_within_three_standard_errors(n: int) -> None:
    sketch = HyperLogLog()
    for start in range(0, n, 50_000):
        sketch.add({f"client-{i}" for i in range(start, min(n, start + 50_000))})
    error = 1.04 / (len(sketch.registers) ** 0.5)
    assert abs(sketch.estimate() - n) <= max(1.0, 3 * error * n)


def test_hyperloglog_merges_as_a_union_and_ignores_repeats() -> None:
    a, b = HyperLogLog(), HyperLogLog()
    a.add({f"c{i}" for i in range(3000)})
    b.add({f"c{i}" for i in range(2000, 6000)})
    before = a.estimate()
    a.add({f"c{i}" for i in range(3000)})
    assert a.estimate() == before
    a.merge(b)
    assert abs(a.estimate() - 6000) < 6000 * 0.07


def test_hyperloglog_registers_are_the_same_in_another_process() -> None:
    """Python's hash() changes per process; a restored sketch must keep counting the same clients."""
    code = ("from monitor.ops.hll import HyperLogLog; s = HyperLogLog(); s.add({f'c{i}' for i in range(500)}); "
            "import sys; sys.stdout.write(s.to_bytes().hex())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(runs) == 1


# -- the commands, when nothing answers ---------------------------------------------------------------


def test_status_says_when_neither_a_daemon_nor_a_state_directory_is_there(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    nothing = cli("status", "--url", url, env={"INFERWATCH_ADMIN_TOKEN": TOKEN})
    assert nothing.returncode == 2
    assert f"cannot reach the daemon at {url}" in nothing.stderr and "--state-dir DIR" in nothing.stderr
    missing = cli("register", "export", "--state-dir", str(tmp_path / "nope"))
    assert missing.returncode == 2 and f"state directory {tmp_path / 'nope'}: not found" in missing.stderr
    empty = cli("status", "--state-dir", str(tmp_path))
    assert empty.returncode == 2 and "no inventory.json, register.json or journal.sqlite yet" in empty.stderr
    no_token = cli("status", "--url", url, env={"INFERWATCH_ADMIN_TOKEN": ""})
    assert no_token.returncode == 2 and "INFERWATCH_ADMIN_TOKEN is not set" in no_token.stderr


def test_status_reads_the_state_directory_when_the_daemon_cannot_be_reached(tmp_path: Path) -> None:
    register = RiskRegister()
    register.record(detection("model_extraction", T0))
    register.save(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    fallback = cli("status", "--url", url, "--state-dir", str(tmp_path), env={"INFERWATCH_ADMIN_TOKEN": TOKEN})
    assert fallback.returncode == 0, fallback.stderr
    assert f"the daemon at {url} cannot be reached" in fallback.stderr and f"reading {tmp_path} instead" in fallback.stderr
    assert fallback.stdout.startswith(f"0 models watched, 0 open incidents (state directory {tmp_path};")
