"""The respond stage: playbook language, guardrails, journal and the notification contracts, against
local HTTP servers that enforce PagerDuty's Events API v2 and Slack's incoming-webhook contracts."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client import generate_latest

from monitor.ops.metrics import Metrics
from monitor.respond import playbooks as pb
from monitor.respond.actions.base import Services
from monitor.respond.engine import Responder
from monitor.respond.journal import Journal
from tests.conftest import http_json
from tests.contract_servers import PagerDutyServer, SlackServer, WebhookServer

ROUTING_KEY = "R0UT1NGKEYR0UT1NGKEYR0UT1NGKEY32"  # 32 characters, as PagerDuty's


@pytest.fixture
def pagerduty() -> Iterator[PagerDutyServer]:
    server = PagerDutyServer().start()
    yield server
    server.stop()


@pytest.fixture
def slack() -> Iterator[SlackServer]:
    server = SlackServer().start()
    yield server
    server.stop()


@pytest.fixture
def hook() -> Iterator[WebhookServer]:
    server = WebhookServer().start()
    yield server
    server.stop()


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch, slack: SlackServer, pagerduty: PagerDutyServer) -> dict[str, str]:
    values = {"SLACK_WEBHOOK_URL": slack.url, "PD_ROUTING_KEY": ROUTING_KEY, "PD_URL": pagerduty.url}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def write_playbooks(directory: Path, text: str, name: str = "book.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(textwrap.dedent(text))
    return directory


def detection(n: int = 1, **fields: Any) -> dict[str, Any]:
    base = {"detection_id": f"d{n}", "ts": 1764230400.0 + n, "detector": "probing", "kind": "model_extraction",
            "model": "fraud-eu", "model_version": "v3", "client_id": "client-7", "severity": "critical",
            "score": 12.3, "threshold": 9.1, "summary": "client-7 sampled the input space", "evidence": {},
            "atlas": ["AML.T0024.002"], "owasp": ["ML05"], "labels": {}, "source": None}
    base.update(fields)
    return base


class Clock:
    def __init__(self, start: float = 1_800_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_responder(tmp_path: Path) -> Iterator[Any]:
    made: list[Responder] = []

    def make(directory: Path, clock: Any = time.time, start: bool = True, **kwargs: Any) -> Responder:
        journal = Journal(tmp_path / "state" / "journal.sqlite")
        services = Services(state_dir=tmp_path / "state", http_timeout=kwargs.pop("http_timeout", 2.0))
        responder = Responder(directory, journal, services, clock=clock, metrics=kwargs.pop("metrics", Metrics()),
                              **kwargs)
        made.append(responder)
        return responder.start() if start else responder

    yield make
    for responder in made:
        responder.stop()
        responder.journal.close()


def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


EXTRACTION = """\
    name: extraction-response
    match:
      detector: probing
      kind: [model_extraction, adversarial_probing]
      severity: ">=warning"
      model: "fraud-*"
    dedup: {key: "{{ model }}/{{ client_id }}", cooldown: 30m}
    limits: {max_runs: 3, per: 1h}
    resolve: {after: 10m}
    steps:
      - {id: tell, action: slack, with: {webhook: "${SLACK_WEBHOOK_URL}", text: "Probing by {{ client_id }} on {{ model }}: {{ summary }}"}}
      - {id: page, action: pagerduty, when: {severity: critical}, with: {routing_key: "${PD_ROUTING_KEY}", url: "${PD_URL}"}}
"""


# ------------------------------------------------------------------ the language


@pytest.mark.parametrize("text, expected", [
    ("name: a\nmatch: {detector: probing}\nsteps: [{id: s, action: slack, with: {webhook: 'https://x'}}]\nextra: 1\n",
     "book.yaml: playbook 'a': unknown key 'extra'; expected one of name, description, match, dedup, limits, resolve, dry_run, steps"),
    ("name: a\nmatch: {detector: probing}\nsteps: [{id: s, action: sms, with: {}}]\n",
     "playbook 'a' steps[0].action: unknown action 'sms'; expected one of"),
    ("name: a\nmatch: {detector: probing}\nsteps: [{id: s, action: slack, with: {webhok: 'https://x'}}]\n",
     "playbook 'a' steps[0].with: unknown key 'webhok'; expected one of webhook, text, blocks, resolve"),
    ("name: a\nmatch: {detector: probing}\nsteps: [{id: s, action: slack, with: {webhook: 'ftp://x'}}]\n",
     "playbook 'a' steps[0].with: webhook: expected an http(s) URL"),
    ("name: a\nmatch: {severity: '>=urgent'}\nsteps: [{id: s, action: slack, with: {webhook: 'https://x'}}]\n",
     "playbook 'a' match.severity: expected a level (info, warning, critical)"),
    ("name: a\nmatch: {}\ndedup: {cooldown: 5 minutes}\nsteps: [{id: s, action: slack, with: {webhook: 'https://x'}}]\n",
     "playbook 'a' dedup.cooldown:"),
    ("name: a\nmatch: {}\nsteps: [{id: s, action: slack, with: {webhook: 'https://x', text: '{{ model '}}]\n",
     "playbook 'a' steps[0].with: template error:"),
    ("name: a\nmatch: {}\nsteps: [{id: s, action: slack, with: {webhook: 'https://x', text: '{{ modle }}'}}]\n",
     "playbook 'a' steps[0].with: template fails on a sample detection: 'modle' is undefined"),
    ("name: a\nmatch: {}\nsteps: [{id: s, action: slack, with: {webhook: 'https://x'}}, "
     "{id: s, action: slack, with: {webhook: 'https://x'}}]\n",
     "playbook 'a' steps[1].id: 's' is used twice"),
    ("name: a\nmatch: {}\nsteps: [{id: s, action: slack, with: {webhook: '${NOT_SET_ANYWHERE}'}}]\n",
     "playbook 'a' steps[0].with: environment variable NOT_SET_ANYWHERE is not set"),
    ("name: a\nmatch: {}\nsteps: [{id: s, action: pagerduty, on_failure: retry, with: {routing_key: k}}]\n",
     "playbook 'a': steps[0].on_failure: Invalid enum value 'retry'; expected one of abort, continue"),
    ("name: a\nmatch: {}\nsteps: []\n", "playbook 'a' steps: at least one step is needed"),
    ("name: a\nmatch: {kind: []}\nsteps: [{id: s, action: snapshot}]\n",
     "playbook 'a' match.kind: an empty list matches nothing"),
    ("name: a\nmatch: {}\nlimits: {per: 0s}\nsteps: [{id: s, action: snapshot}]\n",
     "playbook 'a' limits.per: expected at least 1s"),
    ("name: a\nmatch: {}\nsteps: [{id: s, action: snapshot, approval: required, approval: none}]\n",
     "book.yaml: not valid YAML: key 'approval' is given twice"),
    ("name: 'a:b'\nmatch: {}\nsteps: [{id: s, action: snapshot}]\n", "book.yaml: name: expected letters, digits"),
])
def test_invalid_playbooks_are_refused_naming_file_playbook_and_field(tmp_path: Path, text: str,
                                                                     expected: str) -> None:
    write_playbooks(tmp_path, text)
    with pytest.raises(pb.PlaybookError) as caught:
        pb.load(tmp_path)
    assert str(tmp_path / "book.yaml") in str(caught.value)
    assert expected in str(caught.value)


def test_matching_follows_every_given_key(tmp_path: Path) -> None:
    write_playbooks(tmp_path, """\
        name: a
        match: {detector: [probing, resource], kind: model_extraction, severity: ">=warning", model: "fraud-*",
                client_id: "*", labels: {team: "pay*"}}
        steps: [{id: s, action: slack, with: {webhook: "https://hooks.example/x"}}]
    """)
    book = pb.load(tmp_path).playbooks[0]
    good = detection(labels={"team": "payments"})
    assert book.matches(good)
    assert not book.matches({**good, "severity": "info"})
    assert not book.matches({**good, "model": "credit-eu"})
    assert not book.matches({**good, "client_id": None})  # "*" asks for a client
    assert not book.matches({**good, "detector": "drift"})
    assert not book.matches({**good, "labels": {"team": "search"}})
    assert not book.matches({**good, "labels": {}})


@pytest.mark.parametrize("test, severity, holds", [
    ("warning", "warning", True), ("warning", "critical", False), (">=warning", "critical", True),
    (">warning", "warning", False), ("<critical", "info", True), ("!=info", "info", False),
])
def test_severity_comparisons(test: str, severity: str, holds: bool) -> None:
    assert pb._severity_holds(test, severity) is holds


def test_templates_are_sandboxed_and_detection_fields_stay_text(tmp_path: Path, secrets: dict[str, str]) -> None:
    write_playbooks(tmp_path, EXTRACTION)
    book = pb.load(tmp_path).playbooks[0]
    hostile = detection(client_id="{{ ''.__class__.__mro__ }} ${PD_ROUTING_KEY} <!channel>",
                        summary="{% for x in range(10**9) %}{% endfor %}")
    params = book.steps[0].render(pb.template_context(hostile))
    assert "{{ ''.__class__.__mro__ }}" in params.text  # inserted as text, never evaluated
    assert ROUTING_KEY not in params.text  # ${VAR} in a detection field is not a reference
    assert "&lt;!channel&gt;" in params.text and "<!channel>" not in params.text  # Slack markup inert
    assert params.webhook == secrets["SLACK_WEBHOOK_URL"]  # the author's ${VAR} is
    attack = write_playbooks(tmp_path / "attack", """\
        name: a
        match: {}
        steps: [{id: s, action: slack, with: {webhook: "https://x.example", text: "{{ detection.__class__ }}"}}]
    """)
    with pytest.raises(pb.PlaybookError, match="template fails on a sample detection"):
        pb.load(attack)


# ------------------------------------------------------------------ contracts


def test_pagerduty_trigger_then_resolve_share_one_dedup_key(tmp_path: Path, secrets: dict[str, str],
                                                           pagerduty: PagerDutyServer, slack: SlackServer,
                                                           make_responder: Any) -> None:
    clock = Clock()
    responder = make_responder(write_playbooks(tmp_path / "books", EXTRACTION), clock=clock)
    [incident] = responder.handle(detection())
    wait_for(lambda: len(pagerduty.requests) == 1 and len(slack.requests) == 1, what="alerts")
    trigger = pagerduty.bodies()[0]
    assert trigger["event_action"] == "trigger" and trigger["dedup_key"] == incident
    assert trigger["routing_key"] == ROUTING_KEY
    assert trigger["payload"]["severity"] == "critical" and trigger["payload"]["source"] == "fraud-eu"
    assert trigger["payload"]["custom_details"]["client_id"] == "client-7"
    assert slack.bodies()[0]["text"] == "Probing by client-7 on fraud-eu: client-7 sampled the input space"
    wait_for(lambda: {s["state"] for s in responder.journal.steps(incident)} == {"delivered"}, what="delivered")
    clock.now += 601  # quiet for longer than resolve.after
    responder.tick()
    wait_for(lambda: len(pagerduty.requests) == 2, what="resolve")
    resolve = pagerduty.bodies()[1]
    assert resolve == {"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": incident}
    wait_for(lambda: len(slack.requests) == 2, what="Slack all-clear")
    assert slack.bodies()[1]["text"].startswith("Resolved: model_extraction on fraud-eu by client-7")
    assert responder.journal.incident(incident)["state"] == "resolved"


def test_429_waits_for_retry_after_and_5xx_is_retried(tmp_path: Path, secrets: dict[str, str],
                                                     pagerduty: PagerDutyServer, slack: SlackServer,
                                                     make_responder: Any) -> None:
    slack.script = ["429:1"]
    pagerduty.script = ["500", "503"]
    responder = make_responder(write_playbooks(tmp_path / "books", EXTRACTION))
    [incident] = responder.handle(detection())
    wait_for(lambda: {s["state"] for s in responder.journal.steps(incident)} == {"delivered"}, timeout=30,
             what="both delivered")
    first, second = slack.requests
    assert second["at"] - first["at"] >= 0.95  # Retry-After: 1 honoured
    assert len(pagerduty.requests) == 3
    attempts = {row["step_id"]: row["attempts"] for row in responder.journal.outbox(incident)}
    assert attempts == {"tell": 2, "page": 3}


def test_400_is_final_and_reported_without_the_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     secrets: dict[str, str], pagerduty: PagerDutyServer,
                                                     slack: SlackServer, make_responder: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PD_ROUTING_KEY", "too-short-key-is-invalid")
    caplog.set_level(logging.DEBUG)
    responder = make_responder(write_playbooks(tmp_path / "books", EXTRACTION))
    [incident] = responder.handle(detection())
    wait_for(lambda: responder.journal.step(incident, "page")["state"] == "undelivered", what="page refused")
    time.sleep(0.3)
    assert len(pagerduty.requests) == 1  # not retried
    step = responder.journal.step(incident, "page")
    assert "400 (not retried)" in step["error"] and "'routing_key' is invalid" in step["error"]
    assert "too-short-key-is-invalid" not in step["error"]
    assert "too-short-key-is-invalid" not in caplog.text


def test_slack_rejections_are_final(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secrets: dict[str, str],
                                    slack: SlackServer, make_responder: Any) -> None:
    monkeypatch.setenv("SLACK_WEBHOOK_URL", slack.base + "/services/T000/B000/revoked-token")
    responder = make_responder(write_playbooks(tmp_path / "books", EXTRACTION))
    [incident] = responder.handle(detection(severity="warning"))
    wait_for(lambda: responder.journal.step(incident, "tell")["state"] == "undelivered", what="Slack refused")
    error = responder.journal.step(incident, "tell")["error"]
    assert "403 (not retried): invalid_token" in error
    assert "revoked-token" not in error and "/services/" not in error  # the URL is the secret


def test_a_receiver_that_does_not_answer_is_retried(tmp_path: Path, secrets: dict[str, str], slack: SlackServer,
                                                    make_responder: Any) -> None:
    slack.script = ["hang:1.5"]
    responder = make_responder(write_playbooks(tmp_path / "books", EXTRACTION), http_timeout=0.5)
    [incident] = responder.handle(detection(severity="warning"))
    wait_for(lambda: responder.journal.step(incident, "tell")["state"] == "delivered", timeout=30, what="delivered")
    [entry] = responder.journal.outbox(incident)
    assert entry["attempts"] >= 2


def test_secrets_never_reach_logs_journal_or_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     secrets: dict[str, str], pagerduty: PagerDutyServer,
                                                     slack: SlackServer, make_responder: Any,
                                                     capsys: pytest.CaptureFixture) -> None:
    from monitor.ops import logs

    logs.setup("DEBUG", "json")
    slack.script = ["500", "429:0"]
    pagerduty.script = ["500"]
    metrics = Metrics()
    books = write_playbooks(tmp_path / "books", EXTRACTION.replace("resolve: {after: 10m}",
                                                                   "resolve: {after: 10m}\n    dry_run: false"))
    responder = make_responder(books, metrics=metrics)
    [incident] = responder.handle(detection())
    wait_for(lambda: {s["state"] for s in responder.journal.steps(incident)} == {"delivered"}, timeout=30,
             what="delivered")
    responder.resolve(incident)
    wait_for(lambda: len(pagerduty.requests) == 3, what="resolve")
    captured = capsys.readouterr()
    stored = sqlite3.connect(responder.journal.path).iterdump()
    everything = captured.err + captured.out + "\n".join(stored) + generate_latest(metrics.registry).decode()
    assert "incident" in everything and "delivered" in everything  # what was captured is the real record
    for secret in (SlackServer.SECRET, ROUTING_KEY):
        assert secret not in everything
    logging.getLogger().handlers.clear()


# ------------------------------------------------------------------ guardrails


def test_same_key_joins_the_open_incident_and_cooldown_holds_after_it(tmp_path: Path, secrets: dict[str, str],
                                                                     slack: SlackServer, pagerduty: PagerDutyServer,
                                                                     make_responder: Any) -> None:
    clock = Clock()
    responder = make_responder(write_playbooks(tmp_path / "books", EXTRACTION.replace("after: 10m", "after: 1m")),
                               clock=clock)
    [first] = responder.handle(detection(1))
    assert responder.handle(detection(2)) == [first]
    assert responder.handle(detection(2)) == []  # the same detection again (redelivered): nothing
    assert responder.journal.incident(first)["detections"] == 2
    other = responder.handle(detection(3, client_id="client-8"))
    assert other and other != [first]  # another key, another incident
    clock.now += 120
    responder.tick()  # quiet: resolved
    assert responder.journal.incident(first)["state"] == "resolved"
    assert responder.handle(detection(4)) == []  # within the 30 min cooldown of the first
    clock.now += 1800
    assert len(responder.handle(detection(5))) == 1


def test_run_budget_per_playbook(tmp_path: Path, secrets: dict[str, str], slack: SlackServer,
                                 pagerduty: PagerDutyServer, make_responder: Any) -> None:
    clock = Clock()
    responder = make_responder(write_playbooks(tmp_path / "books", EXTRACTION), clock=clock)
    opened = [responder.handle(detection(n, client_id=f"c{n}")) for n in range(5)]
    assert [len(ids) for ids in opened] == [1, 1, 1, 0, 0]  # limits: max_runs 3 per hour
    assert len(responder.journal.incidents(state="limited")) == 2
    clock.now += 3601
    assert len(responder.handle(detection(9, client_id="c9"))) == 1


def test_dry_run_sends_nothing_and_shows_parameters_without_secrets(tmp_path: Path, secrets: dict[str, str],
                                                                    slack: SlackServer, pagerduty: PagerDutyServer,
                                                                    make_responder: Any) -> None:
    responder = make_responder(write_playbooks(tmp_path / "books", EXTRACTION), dry_run=True)
    [incident] = responder.handle(detection())
    responder.wait_idle()
    steps = responder.journal.steps(incident)
    assert [s["state"] for s in steps] == ["dry_run", "dry_run"]
    assert steps[0]["detail"]["webhook"] == "***" and steps[1]["detail"]["routing_key"] == "***"
    assert "Probing by client-7" in steps[0]["detail"]["text"]
    time.sleep(0.2)
    assert slack.requests == [] and pagerduty.requests == []


def test_a_playbook_in_dry_run_does_not_need_its_secrets(tmp_path: Path) -> None:
    books = write_playbooks(tmp_path, textwrap.dedent(EXTRACTION) + "dry_run: true\n")
    assert pb.load(books).playbooks[0].spec.dry_run  # no SLACK_WEBHOOK_URL here


def test_when_skips_a_step(tmp_path: Path, secrets: dict[str, str], slack: SlackServer, pagerduty: PagerDutyServer,
                           make_responder: Any) -> None:
    responder = make_responder(write_playbooks(tmp_path / "books", EXTRACTION))
    [incident] = responder.handle(detection(severity="warning"))
    wait_for(lambda: responder.journal.step(incident, "tell")["state"] == "delivered", what="delivered")
    assert responder.journal.step(incident, "page")["state"] == "skipped"
    assert pagerduty.requests == []


FAILING = """\
    name: failing
    match: {}
    dedup: {key: "{{ detection_id }}"}
    steps:
      - {id: first, action: webhook, with: {url: "http://127.0.0.1:9/unreachable"}}
      - {id: broken, action: block_client, on_failure: ON_FAILURE, with: {client_id: "", topic: ""}}
      - {id: after, action: webhook, with: {url: "WEBHOOK"}}
"""


@pytest.mark.parametrize("on_failure, after", [("abort", "aborted"), ("continue", "queued")])
def test_on_failure_aborts_or_continues(tmp_path: Path, hook: WebhookServer, make_responder: Any, on_failure: str,
                                        after: str) -> None:
    text = FAILING.replace("ON_FAILURE", on_failure).replace("WEBHOOK", hook.url)
    responder = make_responder(write_playbooks(tmp_path / "books", text))
    [incident] = responder.handle(detection())
    responder.wait_idle()
    states = {s["step_id"]: s["state"] for s in responder.journal.steps(incident)}
    assert states["broken"] == "failed"
    assert states["after"] in ((after, "delivered") if after == "queued" else (after,))


APPROVAL = """\
    name: isolate
    match: {}
    dedup: {key: "{{ model }}"}
    steps:
      - {id: note, action: webhook, with: {url: "HOOK"}}
      - {id: gate, action: webhook, approval: required, with: {url: "HOOK"}}
"""


def test_approval_through_the_authenticated_admin_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           hook: WebhookServer, make_responder: Any) -> None:
    from monitor.config import Config, Respond, State
    from monitor.ops.http import HttpServer
    from monitor.respond.stage import RespondStage

    monkeypatch.setenv("INFERWATCH_ADMIN_TOKEN", "t0ken-of-the-admins")
    books = write_playbooks(tmp_path / "books", APPROVAL.replace("HOOK", hook.url))
    config = Config(respond=Respond(playbooks=str(books)), state=State(dir=str(tmp_path / "st")))
    metrics = Metrics()
    stage = RespondStage(config, metrics)
    http = HttpServer("127.0.0.1", 0, metrics, lambda: (True, {}), lambda: (True, {}))
    stage.admin_routes(http)
    http.start()
    stage.responder.start()
    try:
        [incident] = stage.responder.handle(detection())
        wait_for(lambda: stage.journal.step(incident, "gate")["state"] == "awaiting_approval", what="gate")
        base = f"http://127.0.0.1:{http.port}"

        def call(path: str, token: str | None, body: dict | None = None) -> tuple[int, dict]:
            status, answer, _ = http_json(base + path, "POST" if body else "GET", body,
                                          f"Bearer {token}" if token else None)
            return status, answer

        assert call("/admin/pending", None)[0] == 401
        assert call("/admin/pending", "wrong")[0] == 401
        status, pending = call("/admin/pending", "t0ken-of-the-admins")
        assert status == 200 and pending["pending"][0]["incident"] == incident
        assert call("/admin/approve", "wrong", {"incident": incident, "step": "gate"})[0] == 401
        assert len(hook.requests) == 1  # only the note so far
        status, answer = call("/admin/approve", "t0ken-of-the-admins", {"incident": incident, "step": "gate",
                                                                       "by": "alice"})
        assert status == 200 and answer["ok"]
        wait_for(lambda: len(hook.requests) == 2, what="approved step")
        assert stage.journal.step(incident, "gate")["decided_by"] == "alice"
        assert call("/admin/approve", "t0ken-of-the-admins", {"incident": incident, "step": "gate"})[0] == 409
    finally:
        http.stop()
        stage.stop()


def test_rejected_step_aborts_the_rest_and_closing_expires_a_pending_one(tmp_path: Path, hook: WebhookServer,
                                                                         make_responder: Any) -> None:
    text = APPROVAL.replace("HOOK", hook.url) + "      - {id: last, action: webhook, with: {url: \"" + hook.url + "\"}}\n"
    responder = make_responder(write_playbooks(tmp_path / "books", text))
    [first] = responder.handle(detection(1))
    [second] = responder.handle(detection(2, model="other"))
    wait_for(lambda: responder.journal.step(second, "gate")["state"] == "awaiting_approval", what="gate")
    assert responder.decide(first, "gate", approve=False, who="bob")[0]
    responder.wait_idle()
    assert responder.journal.step(first, "last")["state"] == "aborted"
    assert responder.resolve(second)
    assert responder.journal.step(second, "gate")["state"] == "expired"
    assert responder.pending() == []


# ------------------------------------------------------------------ races, restarts, reloads


@pytest.fixture
def cluster() -> Iterator[Any]:
    from kubernetes import client as k8s

    from tests.k8s_fake import FakeKubernetes

    fake = FakeKubernetes().start()
    fake.add_deployment("ml", "fraud-eu", match_labels={"app": "fraud-eu"})
    fake.api = lambda: k8s.ApiClient(k8s.Configuration(host=fake.url))
    yield fake
    fake.stop()


def cluster_responder(tmp_path: Path, books: Path, cluster: Any, **kwargs: Any) -> Responder:
    services = Services(state_dir=tmp_path / "state", kubernetes=cluster.api)
    return Responder(books, Journal(tmp_path / "state" / "journal.sqlite"), services, metrics=Metrics(), **kwargs)


@contextlib.contextmanager
def running(tmp_path: Path, books: Path, cluster: Any, **kwargs: Any) -> Iterator[Responder]:
    """A started ``cluster_responder``, stopped and its journal closed afterwards."""
    responder = cluster_responder(tmp_path, books, cluster, **kwargs).start()
    try:
        yield responder
    finally:
        responder.stop()
        responder.journal.close()


ISOLATE_THEN_HOOK = """\
    name: cut
    match: {}
    dedup: {key: "{{ model }}"}
    steps:
      - {id: isolate, action: k8s_isolate, APPROVAL with: {namespace: ml, deployment: "{{ model }}"}}
      - {id: after, action: webhook, with: {url: "HOOK"}}
"""


def stopped_at_the_gate(tmp_path: Path, cluster: Any, hook: WebhookServer) -> tuple[Path, str, Responder]:
    """An incident whose isolation awaits approval, and the responder that opened it, stopped (its
    journal still open) as a crash would leave it."""
    books = write_playbooks(tmp_path / "books", ISOLATE_THEN_HOOK.replace("APPROVAL", "approval: required,")
                            .replace("HOOK", hook.url))
    first = cluster_responder(tmp_path, books, cluster).start()
    [incident] = first.handle(detection())
    wait_for(lambda: first.journal.step(incident, "isolate")["state"] == "awaiting_approval", what="the gate")
    first.stop()
    return books, incident, first


def test_closing_an_incident_stops_its_playbook_between_steps(tmp_path: Path, cluster: Any,
                                                              hook: WebhookServer) -> None:
    books = write_playbooks(tmp_path / "books", ISOLATE_THEN_HOOK.replace("APPROVAL ", "").replace("HOOK", hook.url))
    with running(tmp_path, books, cluster) as responder:
        gate = cluster.hold("POST", "networkpolicies")
        [incident] = responder.handle(detection())
        wait_for(lambda: any(r.method == "POST" for r in cluster.requests), what="the isolation under way")
        assert responder.resolve(incident)  # while the isolation is in flight
        gate.set()
        assert responder.wait_idle()
        states = {s["step_id"]: s["state"] for s in responder.journal.steps(incident)}
        assert states == {"isolate": "done", "after": "expired"}  # what happened is recorded; nothing after
        responder.deliver_due()
        assert hook.requests == []


def test_an_approval_given_just_before_a_crash_is_not_lost(tmp_path: Path, cluster: Any,
                                                           hook: WebhookServer) -> None:
    books, incident, first = stopped_at_the_gate(tmp_path, cluster, hook)
    # the workers are gone: the approval below is recorded and nobody acts on it
    assert first.decide(incident, "isolate", approve=True, who="alice")[0]
    first.journal.close()
    with running(tmp_path, books, cluster) as second:
        wait_for(lambda: second.journal.step(incident, "isolate")["state"] == "done", what="the approved step")
        assert second.journal.step(incident, "isolate")["decided_by"] == "alice"


def test_a_step_changed_by_a_reload_before_a_restart_is_not_run_on_an_old_approval(
        tmp_path: Path, cluster: Any, hook: WebhookServer) -> None:
    books, incident, first = stopped_at_the_gate(tmp_path, cluster, hook)
    first.journal.close()
    text = (books / "book.yaml").read_text().replace("k8s_isolate,", "k8s_rollback,")
    (books / "book.yaml").write_text(text)
    with running(tmp_path, books, cluster) as second:
        assert second.decide(incident, "isolate", approve=True, who="alice")[0]
        assert second.wait_idle()
        step = second.journal.step(incident, "isolate")
        assert step["state"] == "failed" and "the playbook changed or was removed" in step["error"]
        assert second.journal.step(incident, "after")["state"] == "aborted"
        assert not [r for r in cluster.requests if r.method != "GET"]


def test_a_dry_run_switched_on_at_a_restart_holds_open_incidents(tmp_path: Path, cluster: Any,
                                                                 hook: WebhookServer) -> None:
    books, incident, first = stopped_at_the_gate(tmp_path, cluster, hook)
    first.journal.close()
    with running(tmp_path, books, cluster, dry_run=True) as second:
        assert second.decide(incident, "isolate", approve=True, who="alice")[0]
        assert second.wait_idle()
        second.deliver_due()
        assert [s["state"] for s in second.journal.steps(incident)] == ["dry_run", "dry_run"]
        assert not [r for r in cluster.requests if r.method != "GET"] and hook.requests == []


def test_a_playbook_failing_on_one_detection_does_not_stop_the_others(tmp_path: Path, hook: WebhookServer,
                                                                      make_responder: Any) -> None:
    books = write_playbooks(tmp_path / "books", f"""\
        name: by-client
        match: {{}}
        dedup: {{key: "{{{{ client_id.upper() }}}}"}}
        steps: [{{id: s, action: webhook, with: {{url: "{hook.url}"}}}}]
        ---
        name: by-model
        match: {{}}
        dedup: {{key: "{{{{ model }}}}"}}
        steps: [{{id: s, action: webhook, with: {{url: "{hook.url}"}}}}]
    """)
    metrics = Metrics()
    responder = make_responder(books, metrics=metrics)
    opened = responder.handle(detection(client_id=None))  # the first key cannot render without a client
    assert len(opened) == 1 and responder.journal.incident(opened[0])["playbook"] == "by-model"
    assert metrics.respond_incidents.labels(playbook="by-client", outcome="error")._value.get() == 1
    assert responder.handle(detection(client_id=None)) == []  # handled: not retried forever


def test_the_destructive_budget_holds_under_concurrent_workers(tmp_path: Path, cluster: Any) -> None:
    for n in range(6):
        cluster.add_deployment("ml", f"m{n}", match_labels={"app": f"m{n}"})
    books = write_playbooks(tmp_path / "books", """\
        name: cut
        match: {}
        dedup: {key: "{{ model }}"}
        steps: [{id: isolate, action: k8s_isolate, with: {namespace: ml, deployment: "{{ model }}"}}]
    """)
    with running(tmp_path, books, cluster, max_destructive_per_hour=1, workers=4) as responder:
        for n in range(6):
            responder.handle(detection(n, model=f"m{n}"))
        assert responder.wait_idle()
        assert len([r for r in cluster.requests if r.method == "POST"]) == 1


def test_alerts_queued_at_a_crash_are_delivered_after_the_restart(tmp_path: Path, hook: WebhookServer,
                                                                  make_responder: Any) -> None:
    books = write_playbooks(tmp_path / "books", f"""\
        name: tell
        match: {{}}
        steps: [{{id: s, action: webhook, with: {{url: "{hook.url}"}}}}]
    """)
    hook.script = ["503:600"]  # the receiver is down and asks for ten minutes
    first = make_responder(books)
    [incident] = first.handle(detection())
    wait_for(lambda: len(hook.requests) == 1, what="the first attempt")
    first.stop()  # as a crash would: the alert is in the outbox, not delivered
    assert [e["state"] for e in first.journal.outbox(incident)] == ["queued"]
    first.journal.close()
    with sqlite3.connect(tmp_path / "state" / "journal.sqlite") as db:  # ten minutes later
        db.execute("UPDATE outbox SET next_at = next_at - 600")
    second = make_responder(books)
    wait_for(lambda: second.journal.step(incident, "s")["state"] == "delivered", what="delivered after the restart")
    assert len(hook.requests) == 2


def test_closed_incidents_leave_the_journal_after_the_retention(tmp_path: Path, hook: WebhookServer,
                                                                make_responder: Any) -> None:
    books = write_playbooks(tmp_path / "books", f"""\
        name: tell
        match: {{}}
        dedup: {{key: "{{{{ detection_id }}}}"}}
        resolve: {{after: 1m}}
        steps: [{{id: s, action: webhook, with: {{url: "{hook.url}"}}}}]
    """)
    clock = Clock()
    responder = make_responder(books, clock=clock, retention=86400.0)
    [old] = responder.handle(detection(1))
    wait_for(lambda: responder.journal.step(old, "s")["state"] == "delivered", what="delivered")
    clock.now += 120
    responder.tick()  # closes it
    clock.now += 86400 + 3601
    [fresh] = responder.handle(detection(2))
    responder.tick()
    assert responder.journal.incident(old) is None and responder.journal.steps(old) == []
    assert responder.journal.incident(fresh)["state"] == "open"
