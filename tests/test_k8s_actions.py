"""The Kubernetes actions with the real ``kubernetes`` client against an in-memory API server
(``tests/k8s_fake.py``): the exact requests each action sends, what it refuses, how API errors become
Transient or Final, and how a step interrupted by a crash is reconciled from the cluster's state."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from monitor.respond.actions import kubernetes as k8s
from monitor.respond.actions.base import Final, Incident, Services, Transient
from tests.k8s_fake import REVISION, FakeKubernetes

TOKEN = "sa-token-5f1d0c9e7b"  # the bearer token the client sends; no message may contain it
INCIDENT = Incident(id="inc-7f3a", playbook="extraction-response", key="fraud/client-9", opened_at=0.0,
                    detection={"model": "fraud"})
DEPLOYMENT = "/apis/apps/v1/namespaces/ml/deployments/fraud"
POLICIES = "/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies"


@pytest.fixture
def fake() -> Iterator[FakeKubernetes]:
    server = FakeKubernetes().start()
    yield server
    server.stop()


def _services(host: str, state_dir: Path) -> tuple[Services, Any]:
    from kubernetes import client

    configuration = client.Configuration(host=host, api_key={"BearerToken": TOKEN},
                                         api_key_prefix={"BearerToken": "Bearer"})
    api_client = client.ApiClient(configuration)
    return Services(state_dir=state_dir, http_timeout=5.0, kubernetes=lambda: api_client), api_client


@pytest.fixture
def services(fake: FakeKubernetes, tmp_path: Path) -> Iterator[Services]:
    services, api_client = _services(fake.url, tmp_path)
    yield services
    api_client.close()


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(k8s, "ROLLOUT_POLL_SECONDS", 0.01)


def isolate(mode: str = "networkpolicy") -> Any:
    return k8s.Isolate.Params(namespace="ml", deployment="fraud", mode=mode)


def rollback(**options: Any) -> Any:
    return k8s.Rollback.Params(namespace="ml", deployment="fraud", **{"wait": False, **options})


def without_hash(template: dict[str, Any]) -> dict[str, Any]:
    template = json.loads(json.dumps(template))
    del template["metadata"]["labels"]["pod-template-hash"]
    return template


def replicaset(fake: FakeKubernetes, image: str) -> dict[str, Any]:
    return next(rs for rs in fake.replicasets_of("ml")
                if rs["spec"]["template"]["spec"]["containers"][0]["image"] == image)


# --------------------------------------------------------------------------------- isolate

def test_isolate_creates_a_deny_all_policy_on_the_deployments_pod_labels(fake, services):
    fake.add_deployment("ml", "fraud", match_labels={"app": "fraud", "tier": "model"})

    detail = k8s.Isolate().run(isolate(), INCIDENT, services)

    assert [(r.method, r.path) for r in fake.requests] == [("GET", DEPLOYMENT), ("POST", POLICIES)]
    create = fake.requests[1]
    assert create.content_type == "application/json"
    assert create.query == {"fieldManager": ["inferwatch"]}
    assert create.body == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": "inferwatch-isolate-fraud",
            "namespace": "ml",
            "labels": {"app.kubernetes.io/managed-by": "inferwatch"},
            "annotations": {"inferwatch.io/incident": "inc-7f3a", "inferwatch.io/playbook": "extraction-response",
                            "inferwatch.io/deployment": "fraud"},
        },
        "spec": {"podSelector": {"matchLabels": {"app": "fraud", "tier": "model"}},
                 "policyTypes": ["Ingress", "Egress"]},  # no ingress or egress rule: nothing allowed
    }
    assert all(r.authorization == f"Bearer {TOKEN}" for r in fake.requests)
    assert detail == {"namespace": "ml", "deployment": "fraud", "mode": "networkpolicy",
                      "networkpolicy": "inferwatch-isolate-fraud",
                      "pod_selector": {"matchLabels": {"app": "fraud", "tier": "model"}}, "changed": True}


def test_isolating_twice_is_done_the_second_time(fake, services):
    fake.add_deployment("ml", "fraud")
    k8s.Isolate().run(isolate(), INCIDENT, services)

    detail = k8s.Isolate().run(isolate(), INCIDENT, services)  # the API answers 409 AlreadyExists

    assert [r.method for r in fake.writes()] == ["POST", "POST"]
    assert detail["changed"] is False
    assert fake.get("networkpolicies", "ml", "inferwatch-isolate-fraud") is not None


@pytest.mark.parametrize("selector", [{}, {"matchExpressions": [{"key": "app", "operator": "Exists"}]}],
                         ids=["empty", "expressions-only"])
def test_isolate_refuses_a_selector_without_match_labels(fake, services, selector):
    fake.add_deployment("ml", "fraud", selector=selector)

    with pytest.raises(Final, match="without matchLabels"):
        k8s.Isolate().run(isolate(), INCIDENT, services)
    assert fake.writes() == []


def test_release_deletes_the_policy(fake, services):
    fake.add_deployment("ml", "fraud")
    k8s.Isolate().run(isolate(), INCIDENT, services)

    detail = k8s.Release().run(isolate(), INCIDENT, services)

    assert (fake.requests[-1].method, fake.requests[-1].path) == ("DELETE", f"{POLICIES}/inferwatch-isolate-fraud")
    assert fake.get("networkpolicies", "ml", "inferwatch-isolate-fraud") is None
    assert detail["changed"] is True


def test_release_when_not_isolated_is_done(fake, services):
    detail = k8s.Release().run(isolate(), INCIDENT, services)  # the API answers 404

    assert [r.method for r in fake.writes()] == ["DELETE"]
    assert detail == {"namespace": "ml", "deployment": "fraud", "mode": "networkpolicy",
                      "networkpolicy": "inferwatch-isolate-fraud", "changed": False}


def test_scale_isolate_writes_the_count_and_zero_in_one_patch(fake, services):
    version = fake.add_deployment("ml", "fraud", replicas=3)["metadata"]["resourceVersion"]

    detail = k8s.Isolate().run(isolate("scale"), INCIDENT, services)

    [patch] = fake.writes()
    assert (patch.method, patch.path, patch.content_type) == ("PATCH", DEPLOYMENT, "application/merge-patch+json")
    assert patch.body == {"metadata": {"annotations": {"inferwatch.io/replicas-before-isolate": "3"},
                                       "resourceVersion": version},
                          "spec": {"replicas": 0}}
    assert fake.get("deployments", "ml", "fraud")["spec"]["replicas"] == 0
    assert detail == {"namespace": "ml", "deployment": "fraud", "mode": "scale", "replicas_before": 3,
                      "changed": True}


def test_scale_isolate_twice_writes_once(fake, services):
    fake.add_deployment("ml", "fraud", replicas=3)
    k8s.Isolate().run(isolate("scale"), INCIDENT, services)

    detail = k8s.Isolate().run(isolate("scale"), INCIDENT, services)

    assert len(fake.writes()) == 1
    assert detail["replicas_before"] == 3 and detail["changed"] is False


def test_scale_release_restores_the_count_and_drops_the_annotation(fake, services):
    fake.add_deployment("ml", "fraud", replicas=3, annotations={"team": "risk"})
    k8s.Isolate().run(isolate("scale"), INCIDENT, services)
    version = fake.get("deployments", "ml", "fraud")["metadata"]["resourceVersion"]

    detail = k8s.Release().run(isolate("scale"), INCIDENT, services)

    patch = fake.writes()[-1]
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body == {"metadata": {"annotations": {"inferwatch.io/replicas-before-isolate": None},
                                       "resourceVersion": version},
                          "spec": {"replicas": 3}}
    deployment = fake.get("deployments", "ml", "fraud")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["metadata"]["annotations"] == {"team": "risk"}
    assert detail["replicas"] == 3 and detail["changed"] is True


def test_scale_isolate_conflicting_with_another_writer_is_transient(fake, services):
    fake.add_deployment("ml", "fraud", replicas=3)
    fake.fail("PATCH", "deployments", 409, times=1)  # someone wrote between our read and our patch

    with pytest.raises(Transient, match="changed while InferWatch was writing"):
        k8s.Isolate().run(isolate("scale"), INCIDENT, services)


# -------------------------------------------------------------------------------- rollback

def test_rollback_patches_in_the_previous_revisions_template(fake, services):
    fake.deployment_with_history("ml", "fraud", ["fraud:1", "fraud:2", "fraud:3"],
                                 annotations={"kubectl.kubernetes.io/last-applied-configuration": "{}"})
    previous = replicaset(fake, "fraud:2")

    detail = k8s.Rollback().run(rollback(), INCIDENT, services)

    listing = next(r for r in fake.requests if r.path.endswith("/replicasets"))
    assert listing.query == {"labelSelector": ["app=fraud"]}
    [patch] = fake.writes()
    assert (patch.method, patch.path, patch.content_type) == ("PATCH", DEPLOYMENT, "application/json-patch+json")
    assert patch.query == {"fieldManager": ["inferwatch"]}
    record = {"incident": "inc-7f3a", "revision": "2", "from_revision": "3",
              "replicaset": previous["metadata"]["name"]}
    assert patch.body == [
        {"op": "replace", "path": "/spec/template", "value": without_hash(previous["spec"]["template"])},
        # kubectl's annotation rule: the skipped ones stay the Deployment's, the others become the ReplicaSet's
        {"op": "replace", "path": "/metadata/annotations", "value": {
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
            REVISION: "3",
            "kubernetes.io/change-cause": "deploy fraud:2",
            "inferwatch.io/rollback": json.dumps(record, sort_keys=True),
        }},
    ]
    assert detail == {"namespace": "ml", "deployment": "fraud", "revision": "2", "from_revision": "3",
                      "replicaset": previous["metadata"]["name"], "changed": True}


def test_rollback_to_previous_waits_for_the_controller_to_observe_the_latest_change(fake, services):
    fake.deployment_with_history("ml", "fraud", ["fraud:1", "fraud:2"])
    # A new template just written: its ReplicaSet may not exist yet, so "previous" cannot be told.
    fake.objects[("deployments", "ml", "fraud")]["metadata"]["generation"] = 2

    with pytest.raises(Transient, match="not observed yet"):
        k8s.Rollback().run(rollback(), INCIDENT, services)
    assert fake.writes() == []


def test_rollback_to_a_given_revision(fake, services):
    fake.deployment_with_history("ml", "fraud", ["fraud:1", "fraud:2", "fraud:3"])

    detail = k8s.Rollback().run(rollback(to="1"), INCIDENT, services)

    [patch] = fake.writes()
    assert patch.body[0]["value"]["spec"]["containers"][0]["image"] == "fraud:1"
    assert detail["revision"] == "1" and detail["replicaset"] == replicaset(fake, "fraud:1")["metadata"]["name"]


def test_rollback_refuses_a_paused_deployment(fake, services):
    fake.deployment_with_history("ml", "fraud", ["fraud:1", "fraud:2"], paused=True)

    with pytest.raises(Final, match="paused"):
        k8s.Rollback().run(rollback(), INCIDENT, services)
    assert fake.writes() == []


def test_rollback_without_a_previous_revision_is_refused(fake, services):
    fake.deployment_with_history("ml", "fraud", ["fraud:1"])

    with pytest.raises(Final, match="no rollout history found for deployment ml/fraud"):
        k8s.Rollback().run(rollback(), INCIDENT, services)
    assert fake.writes() == []


def test_rollback_to_a_revision_not_in_the_history_is_refused(fake, services):
    fake.deployment_with_history("ml", "fraud", ["fraud:1", "fraud:2"])

    with pytest.raises(Final, match=r"no revision 7 to roll back to \(revisions: 1, 2\)"):
        k8s.Rollback().run(rollback(to="7"), INCIDENT, services)
    assert fake.writes() == []


def test_rollback_ignores_replicasets_of_another_deployment(fake, services):
    ours = fake.deployment_with_history("ml", "fraud", ["fraud:1", "fraud:2", "fraud:3"])
    # A second Deployment whose pods carry the same labels: its ReplicaSet matches our selector.
    canary = fake.add_deployment("ml", "fraud-canary", match_labels={"app": "fraud"}, image="canary:9")
    fake.add_replicaset(ours, revision=4, image="canary:9", owner=canary)

    detail = k8s.Rollback().run(rollback(), INCIDENT, services)

    [patch] = fake.writes()
    assert patch.body[0]["value"]["spec"]["containers"][0]["image"] == "fraud:2"
    assert detail["revision"] == "2"


def test_rollback_waits_for_the_rollout(fake, services):
    fake.deployment_with_history("ml", "fraud", ["fraud:1", "fraud:2", "fraud:3"])
    fake.rollout_gets = 3  # the controller finishes on the third read after the patch

    detail = k8s.Rollback().run(rollback(wait=True), INCIDENT, services)

    after_patch = fake.requests[[r.method for r in fake.requests].index("PATCH") + 1:]
    assert [(r.method, r.path) for r in after_patch] == [("GET", DEPLOYMENT)] * 3
    assert detail["rolled_out"] is True
    status = fake.get("deployments", "ml", "fraud")["status"]
    assert status["updatedReplicas"] == status["availableReplicas"] == 3


def test_rollback_times_out_when_the_rollout_never_finishes(fake, services):
    fake.deployment_with_history("ml", "fraud", ["fraud:1", "fraud:2", "fraud:3"])
    fake.rollout_stuck = True

    with pytest.raises(Final, match=r"rolled back to revision 2 .* did not finish within 300ms: "
                                    r"1 out of 3 new replicas have been updated"):
        k8s.Rollback().run(rollback(wait=True, timeout="300ms"), INCIDENT, services)
    assert [r.method for r in fake.writes()] == ["PATCH"]


def test_rollback_run_again_after_a_lost_answer_does_not_roll_back_twice(fake, services):
    fake.deployment_with_history("ml", "fraud", ["fraud:1", "fraud:2", "fraud:3"])
    first = k8s.Rollback().run(rollback(wait=True), INCIDENT, services)
    # The controller re-numbered fraud:2 as revision 4: "previous" would now name fraud:3, the bad one.
    assert replicaset(fake, "fraud:2")["metadata"]["annotations"][REVISION] == "4"

    again = k8s.Rollback().run(rollback(wait=True), INCIDENT, services)

    assert [r.method for r in fake.writes()] == ["PATCH"]
    assert {key: again[key] for key in ("revision", "replicaset")} == \
        {key: first[key] for key in ("revision", "replicaset")}
    assert again["changed"] is False


# ------------------------------------------------------------------------ reconcile after a crash

def test_reconcile_finds_the_policy_created_before_the_crash(fake, services):
    fake.add_deployment("ml", "fraud")
    k8s.Isolate().run(isolate(), INCIDENT, services)
    fake.requests.clear()

    detail = k8s.Isolate().reconcile(isolate(), INCIDENT, services, {})

    assert detail["networkpolicy"] == "inferwatch-isolate-fraud" and detail["reconciled"] is True
    assert fake.writes() == []


def test_reconcile_finds_the_scale_to_zero_done_before_the_crash(fake, services):
    fake.add_deployment("ml", "fraud", replicas=2)
    k8s.Isolate().run(isolate("scale"), INCIDENT, services)
    fake.requests.clear()

    detail = k8s.Isolate().reconcile(isolate("scale"), INCIDENT, services, {})

    assert detail["replicas_before"] == 2 and detail["reconciled"] is True
    assert fake.writes() == []


def test_reconcile_finds_the_rollback_done_before_the_crash(fake, services):
    fake.deployment_with_history("ml", "fraud", ["fraud:1", "fraud:2", "fraud:3"])
    k8s.Rollback().run(rollback(wait=True), INCIDENT, services)  # and then the daemon died
    fake.requests.clear()

    detail = k8s.Rollback().reconcile(rollback(), INCIDENT, services, {})

    assert detail["revision"] == "2" and detail["from_revision"] == "3" and detail["reconciled"] is True
    assert detail["replicaset"] == replicaset(fake, "fraud:2")["metadata"]["name"]
    assert fake.writes() == []


def test_reconcile_before_the_rollback_reached_the_cluster_runs_it_again(fake, services):
    fake.deployment_with_history("ml", "fraud", ["fraud:1", "fraud:2", "fraud:3"])

    assert k8s.Rollback().reconcile(rollback(), INCIDENT, services, {}) is None
    assert fake.writes() == []


# ---------------------------------------------------------------------------------- errors

def test_forbidden_is_final_and_names_the_rbac_needed(fake, services):
    fake.add_deployment("ml", "fraud")
    fake.fail("PATCH", "deployments", 403)

    with pytest.raises(Final) as raised:
        k8s.Isolate().run(isolate("scale"), INCIDENT, services)

    message = str(raised.value)
    assert message.startswith("forbidden: the service account needs RBAC "
                              'verb "patch" on resource "deployments" in API group "apps" in namespace ml')
    assert "cannot patch resource" in message  # the API server's own words follow
    assert fake.requests[-1].authorization == f"Bearer {TOKEN}"
    assert TOKEN not in message and TOKEN not in repr(raised.value)


def test_unavailable_api_is_transient(fake, services):
    fake.fail("GET", "deployments", 503)

    with pytest.raises(Transient, match="answered 503") as raised:
        k8s.Isolate().run(isolate(), INCIDENT, services)
    assert raised.value.retry_after is None
    assert TOKEN not in str(raised.value)


def test_too_many_requests_is_transient_after_retry_after(fake, services):
    fake.add_deployment("ml", "fraud")
    fake.fail("POST", "networkpolicies", 429, headers={"Retry-After": "7"})

    with pytest.raises(Transient, match="answered 429") as raised:
        k8s.Isolate().run(isolate(), INCIDENT, services)
    assert raised.value.retry_after == 7.0


def test_missing_deployment_is_final(fake, services):
    with pytest.raises(Final, match=r"^deployment ml/fraud not found$"):
        k8s.Rollback().run(rollback(), INCIDENT, services)


def test_unreachable_api_is_transient(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    services, api_client = _services(f"http://127.0.0.1:{port}", tmp_path)
    try:
        with pytest.raises(Transient, match="the Kubernetes API did not answer") as raised:
            k8s.Isolate().run(isolate(), INCIDENT, services)
    finally:
        api_client.close()
    assert TOKEN not in str(raised.value)


def test_no_kubernetes_connection_is_final(tmp_path):
    with pytest.raises(Final, match="no Kubernetes connection configured"):
        k8s.Rollback().run(rollback(), INCIDENT, Services(state_dir=tmp_path))


# ------------------------------------------------------------------------------ load time

@pytest.mark.parametrize("params, field", [
    (dict(to="0"), "to"), (dict(to="latest"), "to"), (dict(to="-1"), "to"), (dict(timeout="soon"), "timeout"),
    (dict(namespace="ML"), "namespace"), (dict(deployment="fraud/../x"), "deployment"),
    (dict(namespace="a" * 64), "namespace"), (dict(timeout="-5s"), "timeout"),
])
def test_check_rejects_bad_parameters_at_load(params, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        k8s.Rollback().check(k8s.Rollback.Params(**{"namespace": "ml", "deployment": "fraud", **params}))


@pytest.mark.parametrize("params", [dict(to="previous"), dict(to="3"), dict(to=3), dict(to="{{ revision }}"),
                                    dict(deployment="{{ model }}"), dict(timeout="90s"),
                                    dict(timeout=300)])
def test_check_accepts_good_and_templated_parameters(params):
    k8s.Rollback().check(k8s.Rollback.Params(**{"namespace": "ml", "deployment": "fraud", **params}))


def test_importing_the_module_does_not_import_the_client():
    code = "import sys, monitor.respond.actions.kubernetes; print('kubernetes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False"
