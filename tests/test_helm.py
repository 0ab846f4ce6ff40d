"""The Helm chart (helm/inferwatch) renders, for its defaults and a matrix of options, manifests that
Kubernetes' schemas accept, RBAC holding only the verbs the enabled actions need, alerting rules that
promtool accepts and fires, and a config that ``inferwatch check`` accepts with the environment the
Deployment gives it.

Rendering and linting go through Helm's own Go SDK (``helm_python``, from the ``helm-python-sdk``
wheel): no helm binary, no cluster. Kubernetes kinds are validated with kubernetes-validate's strict
schemas; the Prometheus Operator's kinds with the subset in ``tests/helm_crd_schemas.py``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_schemas

from monitor.ops.metrics import Metrics
from tests.helm_crd_schemas import BY_KIND as CRD_SCHEMAS

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "inferwatch"
RELEASE, NAMESPACE = "iw", "inferwatch"
FULLNAME = "iw-inferwatch"
# The oldest Kubernetes the issue asks for, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29", kubernetes_schemas.latest_version())

EXISTING_SECRETS = {
    "secrets": {"slack": {"existingSecret": "slack"}, "pagerduty": {"existingSecret": "pagerduty"},
                "adminToken": {"existingSecret": "inferwatch-admin"},
                "extra": [{"env": "ALERTMANAGER_URL", "existingSecret": "alerting", "key": "url"}]},
    "kafka": {"sasl": {"enabled": True, "existingSecret": "kafka-user"},
              "tls": {"enabled": True, "existingSecret": "kafka-ca", "certKey": "tls.crt", "keyKey": "tls.key"}},
}

# name -> values given to the chart (over its defaults)
MATRIX: dict[str, dict[str, Any]] = {
    "default": {},
    "split": {"stages": {"split": True}},
    "split-without-playbooks": {"stages": {"split": True}, "playbooks": {"enabled": False}},
    "all-without-playbooks": {"playbooks": {"enabled": False}},
    "isolate-networkpolicy": {"actions": {"isolate": {"enabled": True}}, "rbac": {"targetNamespaces": ["ml"]}},
    "isolate-scale": {"actions": {"isolate": {"enabled": True, "modes": ["scale"]}}},
    "rollback": {"actions": {"rollback": {"enabled": True}}, "rbac": {"targetNamespaces": ["ml", "ml-canary"]}},
    "block-configmap": {"actions": {"blockClient": {"configMaps": [{"namespace": "gateway", "name": "denylist"},
                                                                   {"namespace": "gateway", "name": "denylist-eu"}]}}},
    "every-action-split": {"stages": {"split": True},
                           "actions": {"isolate": {"enabled": True, "modes": ["networkpolicy", "scale"]},
                                       "rollback": {"enabled": True},
                                       "blockClient": {"configMaps": [{"namespace": "gateway", "name": "denylist"}]}},
                           "rbac": {"targetNamespaces": ["ml"]}},
    "every-action-all-namespaces": {"actions": {"isolate": {"enabled": True, "modes": ["networkpolicy", "scale"]},
                                                "rollback": {"enabled": True}},
                                    "rbac": {"allNamespaces": True}},
    "existing-secrets": {**EXISTING_SECRETS, "config": {"respond": {"dry_run": False}}},
    # Numbers through Helm's values (JSON floats inside) must come out as the integers the daemon wants.
    "tuned-config": {"config": {
        "detectors": {"drift": {"ert": 1000000, "sample_every": 4, "shifts": [0.25, 1.0]},
                      "resource": {"client_ert": 10000000, "ok_statuses": ["ok", "200"]}, "probing": None},
        "models": {"watch": ["fraud-*"], "overrides": [
            {"model": "fraud-canary", "detectors": {"drift": False}, "labels": {"team": "payments"}}]},
        "limits": {"max_features": 8192}, "jobs": {"evict_idle_clients": "10m", "reference_refresh": "6h"}}},
    "existing-configmaps": {"existingConfigMap": "my-config", "playbooks": {"existingConfigMap": "my-playbooks"}},
    "own-playbooks-only": {"playbooks": {"examples": False, "files": {"page.yaml": {
        "name": "page-on-extraction", "match": {"detector": "probing", "kind": "model_extraction"},
        "steps": [{"id": "page", "action": "pagerduty", "with": {"routing_key": "${PD_ROUTING_KEY}"}}]}}},
        "secrets": {"pagerduty": {"existingSecret": "pagerduty"}}, "config": {"respond": {"dry_run": False}}},
    "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                   "prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}},
    "monitoring-split": {"stages": {"split": True}, "serviceMonitor": {"enabled": True},
                         "prometheusRule": {"enabled": True}},
    "persistence-restricted-egress": {"persistence": {"enabled": True, "storageClass": "fast"},
                                      "networkPolicy": {"egress": {"restrict": True},
                                                        "ingressFrom": [{"namespaceSelector": {"matchLabels": {
                                                            "kubernetes.io/metadata.name": "monitoring"}}}]},
                                      "actions": {"rollback": {"enabled": True}}},
}

# The least RBAC of each action as the action modules state it (checked against their comments by
# test_rbac_table_is_the_action_modules'): (API group, resource, verb).
ISOLATE_RULES = {
    "networkpolicy": {("apps", "deployments", "get"), ("networking.k8s.io", "networkpolicies", "get"),
                      ("networking.k8s.io", "networkpolicies", "create"),
                      ("networking.k8s.io", "networkpolicies", "delete")},
    "scale": {("apps", "deployments", "get"), ("apps", "deployments", "patch")},
}
ROLLBACK_RULES = {("apps", "deployments", "get"), ("apps", "deployments", "patch"), ("apps", "replicasets", "list")}
BLOCK_CONFIGMAP_VERBS = {"create", "patch"}


# ------------------------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=1)
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


@functools.lru_cache(maxsize=None)
def _render(values_json: str) -> tuple[dict[str, str], tuple[dict[str, Any], ...]]:
    files = chart().render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE)
    manifests = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return files, tuple(manifests)


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    return list(_render(json.dumps(values, sort_keys=True))[1])


def notes(values: dict[str, Any]) -> str:
    files = _render(json.dumps(values, sort_keys=True))[0]
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [m for m in of_kind(manifests, kind) if name is None or m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[m['metadata']['name'] for m in found]}"
    return found[0]


def deployments(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """stage (all, detect, respond) -> its Deployment"""
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in of_kind(manifests, "Deployment")}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env_names(deployment: dict[str, Any]) -> set[str]:
    return {e["name"] for e in container(deployment).get("env", [])}


def rendered_config(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(manifests, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])


def rbac_grants(manifests: list[dict[str, Any]]) -> dict[str, set[tuple[str, str, str]]]:
    """namespace ("*" for a ClusterRole) -> (group, resource, verb) granted, over every Role bound to
    the chart's service account."""
    roles = {(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]): r
             for r in manifests if r["kind"] in ("Role", "ClusterRole")}
    grants: dict[str, set[tuple[str, str, str]]] = {}
    for binding in manifests:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        role = roles[(ref["kind"], namespace if ref["kind"] == "Role" else None, ref["name"])]
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        grants.setdefault(namespace or "*", set()).add((group, resource, verb))
    return grants


# ------------------------------------------------------------------------------------ lint, schemas

@pytest.mark.parametrize("case", MATRIX)
def test_strict_lint_is_clean(case):
    report = helm_python.lint(CHART, MATRIX[case], strict=True, namespace=NAMESPACE)
    # Severity 1 is information ("icon is recommended": the project has no icon to point to).
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], problems or report["errors"]


@pytest.mark.parametrize("case", MATRIX)
def test_every_manifest_validates_against_its_schema(case):
    manifests = render(MATRIX[case])
    assert manifests, "nothing rendered"
    for manifest in manifests:
        where = f"{case}: {manifest['kind']} {manifest['metadata']['name']}"
        if manifest["kind"] in CRD_SCHEMAS:
            try:
                jsonschema.Draft202012Validator(CRD_SCHEMAS[manifest["kind"]]).validate(manifest)
            except jsonschema.ValidationError as exc:
                pytest.fail(f"{where}: {'.'.join(map(str, exc.absolute_path))}: {exc.message}")
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_schemas.validate(manifest, version, strict=True)
            except kubernetes_schemas.ValidationError as exc:
                pytest.fail(f"{where} (Kubernetes {version}): {'.'.join(map(str, exc.path))}: {exc.message}")
        _check_names_and_labels(manifest, where)


def _check_names_and_labels(manifest: dict[str, Any], where: str) -> None:
    """What the OpenAPI schemas leave to the API server: name and label formats."""
    name = manifest["metadata"]["name"]
    if manifest["kind"] in ("Service", "Deployment", "Namespace"):
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name), f"{where}: not a DNS-1035 label"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name), f"{where}: not a DNS-1123 subdomain"
    label_sets = [manifest["metadata"].get("labels", {})]
    template = manifest.get("spec", {}).get("template")
    if template:
        label_sets.append(template["metadata"]["labels"])
    for labels in label_sets:
        for key, value in labels.items():
            assert re.fullmatch(r"([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", key), where
            assert isinstance(value, str) and re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?",
                                                           value), f"{where}: label {key}={value!r}"


@pytest.mark.parametrize("values, complaint", [
    ({"stages": {"split": "yes"}}, "/stages/split"),
    ({"config": {"kafka": {"bootstrap_servers": ["kafka"]}}}, "/config/kafka/bootstrap_servers/0"),
    ({"config": {"kafak": {}}}, "kafak"),
    ({"actions": {"isolate": {"enabled": True, "modes": ["delete"]}}}, "/actions/isolate/modes/0"),
    ({"rbac": {"targetNamespaces": ["ML"]}}, "/rbac/targetNamespaces/0"),
    ({"secrets": {"slack": {"existingSecret": "s", "env": "SLACK-URL"}}}, "/secrets/slack/env"),
    ({"prometheusRule": {"detections": {"severities": ["fatal"]}}}, "/prometheusRule/detections/severities/0"),
])
def test_values_schema_rejects_a_wrong_value_naming_it(values, complaint):
    with pytest.raises(helm_python.HelmValuesError) as raised:
        chart().render(values, name=RELEASE, namespace=NAMESPACE)
    assert complaint in str(raised.value)


def test_values_schema_allows_every_config_section():
    """The schema closes `config` to catch a misspelt section; a section the daemon gains must be added."""
    import msgspec

    from monitor.config import Config

    sections = {field.encode_name for field in msgspec.structs.fields(Config)} - {"source"}  # source: not YAML
    allowed = set(chart().schema["properties"]["config"]["properties"])
    assert sections - allowed == set()


@pytest.mark.parametrize("values, complaint", [
    ({"persistence": {"enabled": True}, "stages": {"all": {"replicas": 2}}}, "stages.all.replicas"),
    ({"persistence": {"enabled": True, "accessModes": ["ReadWriteMany"]}, "stages": {"all": {"replicas": 2}}},
     "stages.all.replicas"),  # a shared journal: two replicas would both act
    ({"persistence": {"enabled": True}, "stages": {"split": True, "detect": {"replicas": 2}}}, "stages.detect.replicas"),
    ({"stages": {"all": {"replicas": 2}}}, "the respond stage runs one replica"),
    ({"stages": {"split": True, "respond": {"replicas": 2}}}, "stages.respond.replicas"),
    ({"kafka": {"sasl": {"enabled": True}}}, "kafka.sasl.existingSecret"),
    ({"kafka": {"tls": {"enabled": True}}}, "kafka.tls.existingSecret"),
    ({"playbooks": {"examples": False}}, "playbooks: enabled with no playbook"),
    ({"playbooks": {"files": {"../escape.yaml": "name: x"}}}, "playbooks.files"),
])
def test_inconsistent_values_fail_with_a_message(values, complaint):
    with pytest.raises(helm_python.HelmError) as raised:
        chart().render(values, name=RELEASE, namespace=NAMESPACE)
    assert complaint in str(raised.value)


# --------------------------------------------------------------------------------- the workloads

@pytest.mark.parametrize("case", ["default", "split", "existing-secrets", "persistence-restricted-egress"])
def test_pods_run_hardened_with_writable_state_and_tmp(case):
    manifests = render(MATRIX[case])
    for stage, deployment in deployments(manifests).items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        main = container(deployment)
        assert main["securityContext"] == {
            "runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
        assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert main["resources"]["requests"] and main["resources"]["limits"]
        # With a read-only root, everything the daemon writes is a volume: the state dir and /tmp.
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
        writable = {path for path, m in mounts.items() if not m.get("readOnly")}
        assert writable == {rendered_config(manifests)["state"]["dir"], "/tmp"}, stage
        for path in writable:
            volume = volumes[mounts[path]["name"]]
            assert "emptyDir" in volume or "persistentVolumeClaim" in volume


def test_default_runs_one_deployment_with_every_stage():
    manifests = render({})
    (stage,) = deployments(manifests)
    deployment = deployments(manifests)["all"]
    assert stage == "all" and deployment["spec"]["replicas"] == 1
    main = container(deployment)
    assert main["command"] == ["inferwatch"]
    assert main["args"][:2] == ["run", "--config=/etc/inferwatch/config.yaml"]
    assert "--stage=all" in main["args"] and "--playbooks=/etc/inferwatch/playbooks" in main["args"]
    config_mount = next(m for m in main["volumeMounts"] if m["name"] == "config")
    assert (config_mount["mountPath"], config_mount["subPath"]) == ("/etc/inferwatch/config.yaml", "config.yaml")
    # No action enabled: no API token in the pod, no Role anywhere.
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert rbac_grants(manifests) == {}
    assert "DRY RUN" in notes({})


def test_split_stages_get_a_deployment_each_and_only_respond_gets_playbooks_secrets_and_token():
    values = {**EXISTING_SECRETS, "stages": {"split": True, "detect": {"replicas": 3}},
              "actions": {"rollback": {"enabled": True}}}
    manifests = render(values)
    stages = deployments(manifests)
    assert set(stages) == {"detect", "respond"}
    detect, respond = stages["detect"], stages["respond"]
    assert detect["spec"]["replicas"] == 3 and respond["spec"]["replicas"] == 1
    assert "--stage=detect" in container(detect)["args"] and "--stage=respond" in container(respond)["args"]
    assert not any(a.startswith("--playbooks") for a in container(detect)["args"])
    assert "playbooks" not in {v["name"] for v in detect["spec"]["template"]["spec"]["volumes"]}
    # Both consume Kafka; only respond notifies, approves and acts.
    assert env_names(detect) >= {"KAFKA_SASL_PASSWORD"}
    assert not env_names(detect) & {"SLACK_WEBHOOK_URL", "PD_ROUTING_KEY", "ALERTMANAGER_URL", "INFERWATCH_ADMIN_TOKEN"}
    assert env_names(respond) >= {"KAFKA_SASL_PASSWORD", "SLACK_WEBHOOK_URL", "PD_ROUTING_KEY", "ALERTMANAGER_URL",
                                  "INFERWATCH_ADMIN_TOKEN"}
    assert detect["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert respond["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    # Each stage has its Service (admin on respond's) and its PodDisruptionBudget.
    services = {s["metadata"]["name"]: s["spec"]["selector"]["app.kubernetes.io/component"]
                for s in of_kind(manifests, "Service")}
    assert services == {f"{FULLNAME}-detect": "detect", f"{FULLNAME}-respond": "respond"}
    budgets = {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
               for p in of_kind(manifests, "PodDisruptionBudget")}
    assert budgets == {"detect", "respond"}


def test_split_without_playbooks_runs_detect_only():
    manifests = render(MATRIX["split-without-playbooks"])
    assert set(deployments(manifests)) == {"detect"}
    assert "playbooks" not in rendered_config(manifests)["respond"]
    assert not [c for c in of_kind(manifests, "ConfigMap") if c["metadata"]["name"].endswith("-playbooks")]


def test_existing_secrets_reach_the_environment_by_reference():
    manifests = render(MATRIX["existing-secrets"])
    main = container(deployments(manifests)["all"])
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in main["env"] if "valueFrom" in e}
    assert refs == {
        "KAFKA_SASL_PASSWORD": {"name": "kafka-user", "key": "password"},
        "SLACK_WEBHOOK_URL": {"name": "slack", "key": "webhook-url"},
        "PD_ROUTING_KEY": {"name": "pagerduty", "key": "routing-key"},
        "ALERTMANAGER_URL": {"name": "alerting", "key": "url"},
        "INFERWATCH_ADMIN_TOKEN": {"name": "inferwatch-admin", "key": "token"},
    }
    assert not of_kind(manifests, "Secret"), "the chart references Secrets, it never holds one"
    security = rendered_config(manifests)["kafka"]["security"]
    assert security == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "inferwatch",
        "sasl_plain_password": "${KAFKA_SASL_PASSWORD}", "ssl_cafile": "/etc/inferwatch/kafka-tls/ca.crt",
        "ssl_certfile": "/etc/inferwatch/kafka-tls/tls.crt", "ssl_keyfile": "/etc/inferwatch/kafka-tls/tls.key"}
    tls_mount = next(m for m in main["volumeMounts"] if m["name"] == "kafka-tls")
    assert tls_mount["mountPath"] == "/etc/inferwatch/kafka-tls" and tls_mount["readOnly"] is True


def test_existing_configmaps_replace_the_rendered_ones():
    manifests = render(MATRIX["existing-configmaps"])
    assert not of_kind(manifests, "ConfigMap")
    volumes = {v["name"]: v for v in deployments(manifests)["all"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "my-config"
    assert volumes["playbooks"]["configMap"]["name"] == "my-playbooks"
    # The chart's keys still hold: they are flags too.
    assert {"--http-port=9108", "--state-dir=/var/lib/inferwatch"} <= set(container(deployments(manifests)["all"])["args"])


def test_service_port_config_and_probes_agree():
    for case in ("default", "split", "monitoring-split"):
        manifests = render(MATRIX[case])
        port = rendered_config(manifests)["http"]["port"]
        for deployment in deployments(manifests).values():
            assert container(deployment)["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        for service in of_kind(manifests, "Service"):
            assert service["spec"]["ports"] == [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]


def test_networkpolicy_admits_only_the_http_port_and_restricts_egress_on_request():
    default = one(render({}), "NetworkPolicy")
    assert default["spec"]["policyTypes"] == ["Ingress"]
    assert default["spec"]["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    restricted = one(render(MATRIX["persistence-restricted-egress"]), "NetworkPolicy")
    assert restricted["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert restricted["spec"]["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    ports = {(p["port"], p["protocol"]) for rule in restricted["spec"]["egress"] for p in rule["ports"]}
    assert ports == {(53, "UDP"), (53, "TCP"), (9092, "TCP"), (9093, "TCP"), (443, "TCP"), (6443, "TCP")}


def test_persistence_gives_each_stage_a_claim_and_recreates_pods():
    manifests = render({**MATRIX["persistence-restricted-egress"], "stages": {"split": True}})
    claims = {c["metadata"]["name"]: c for c in of_kind(manifests, "PersistentVolumeClaim")}
    assert set(claims) == {f"{FULLNAME}-detect-state", f"{FULLNAME}-respond-state"}
    assert all(c["spec"]["storageClassName"] == "fast" for c in claims.values())
    for stage, deployment in deployments(manifests).items():
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        state = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "state")
        assert state["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-{stage}-state"


def test_detect_replicas_share_a_read_write_many_claim_and_roll():
    values = {**MATRIX["persistence-restricted-egress"], "persistence": {"enabled": True, "accessModes": ["ReadWriteMany"]},
              "stages": {"split": True, "detect": {"replicas": 3}}}
    manifests = render(values)
    detect = deployments(manifests)["detect"]
    assert detect["spec"]["replicas"] == 3 and "strategy" not in detect["spec"]  # a rolling update
    state = next(v for v in detect["spec"]["template"]["spec"]["volumes"] if v["name"] == "state")
    claim = next(c for c in of_kind(manifests, "PersistentVolumeClaim") if c["metadata"]["name"] == f"{FULLNAME}-detect-state")
    assert state["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_example_playbooks_are_the_repositorys():
    shipped = {p.name: p.read_text() for p in (ROOT / "playbooks").glob("*.yaml")}
    copied = {p.name: p.read_text() for p in (CHART / "files" / "playbooks").glob("*.yaml")}
    assert copied == shipped, "helm/inferwatch/files/playbooks/ is a copy of playbooks/: copy them again"
    rendered = one(render({}), "ConfigMap", f"{FULLNAME}-playbooks")["data"]
    assert {name: text.strip() for name, text in rendered.items()} == {n: t.strip() for n, t in shipped.items()}


# ------------------------------------------------------------------------------------------ RBAC

@pytest.mark.parametrize("case", MATRIX)
def test_rbac_grants_exactly_what_the_enabled_actions_need(case):
    values = MATRIX[case]
    manifests = render(values)
    actions = values.get("actions", {})
    needed: set[tuple[str, str, str]] = set()
    if actions.get("isolate", {}).get("enabled"):
        for mode in actions["isolate"].get("modes", ["networkpolicy"]):
            needed |= ISOLATE_RULES[mode]
    if actions.get("rollback", {}).get("enabled"):
        needed |= ROLLBACK_RULES
    expected: dict[str, set[tuple[str, str, str]]] = {}
    if needed:
        rbac = values.get("rbac", {})
        for namespace in ["*"] if rbac.get("allNamespaces") else rbac.get("targetNamespaces") or [NAMESPACE]:
            expected[namespace] = set(needed)
    for target in actions.get("blockClient", {}).get("configMaps", []):
        expected.setdefault(target["namespace"], set()).update(("", "configmaps", v) for v in BLOCK_CONFIGMAP_VERBS)
    assert rbac_grants(manifests) == expected
    for role in of_kind(manifests, "Role") + of_kind(manifests, "ClusterRole"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role["metadata"]["name"]
            if rule["resources"] == ["configmaps"] and "patch" in rule["verbs"]:
                # patch is limited to the denylist ConfigMaps (create cannot be limited by name).
                names = {t["name"] for t in actions["blockClient"]["configMaps"]
                         if t["namespace"] == role["metadata"]["namespace"]}
                assert set(rule["resourceNames"]) == names
    expect_cluster_role = bool(needed) and values.get("rbac", {}).get("allNamespaces", False)
    assert bool(of_kind(manifests, "ClusterRole")) == expect_cluster_role
    # The API token is mounted exactly where a Role is bound to it.
    token = {stage: d["spec"]["template"]["spec"]["automountServiceAccountToken"]
             for stage, d in deployments(manifests).items()}
    assert token == {stage: bool(expected) and stage != "detect" for stage in token}


def test_rbac_table_is_the_action_modules():
    """The least RBAC written at the top of the action modules is what this test (and the chart) grant."""
    source = (ROOT / "monitor" / "respond" / "actions" / "kubernetes.py").read_text()
    stated: dict[tuple[str, str], set[tuple[str, str, str]]] = {}
    key = None
    for line in source.splitlines():
        match = re.match(r"#\s+(k8s_\w+)?\s*(?:mode (\w+))?\s+([\w.]+)/(\w+): ([\w, ]+)$", line)
        if not match:
            continue
        action, mode, group, resource, verbs = match.groups()
        if action:
            key = (action, mode or "")
        stated.setdefault(key, set()).update((group, resource, v.strip()) for v in verbs.split(","))
    isolate = {mode: stated[("k8s_isolate", mode)] | stated[("k8s_release", mode)] for mode in ISOLATE_RULES}
    assert isolate == ISOLATE_RULES
    assert stated[("k8s_rollback", "")] == ROLLBACK_RULES
    block = (ROOT / "monitor" / "respond" / "actions" / "block.py").read_text()
    assert set(re.findall(r"^#\s+configmaps: (\w+)", block, re.M)) == BLOCK_CONFIGMAP_VERBS


# -------------------------------------------------------------------------------- inferwatch check

CHECK_CASES = ["default", "split", "existing-secrets", "own-playbooks-only", "tuned-config"]


@pytest.mark.parametrize("case", CHECK_CASES)
def test_rendered_config_and_playbooks_pass_inferwatch_check(case, tmp_path):
    manifests = render(MATRIX[case])
    config = tmp_path / "config.yaml"
    config.write_text(one(manifests, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    books = tmp_path / "playbooks"
    books.mkdir()
    for name, text in one(manifests, "ConfigMap", f"{FULLNAME}-playbooks")["data"].items():
        (books / name).write_text(text)
    # The environment the respond stage's container gets, no more: every ${VAR} the config and the
    # playbooks read must come from it, or check warns.
    respond = deployments(manifests).get("respond") or deployments(manifests)["all"]
    env = {k: v for k, v in os.environ.items() if not re.fullmatch(r"SLACK_.*|PD_.*|ALERTMANAGER_.*|KAFKA_.*", k)}
    env.update({name: "https://receiver.example.invalid/hook" if name.endswith("_URL") else "0123456789abcdef" * 2
                for name in env_names(respond)})
    result = subprocess.run([str(Path(sys.executable).with_name("inferwatch")), "check", "-c", str(config),
                             "-p", str(books)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"check warned:\n{result.stderr}"
    assert f"{config}: ok" in result.stdout and f"{books}: ok" in result.stdout


def test_check_warns_when_the_deployment_lacks_a_secret_the_config_reads(tmp_path):
    """The check above is not vacuous: without the Secret's variable, check names it."""
    manifests = render(MATRIX["existing-secrets"])
    config = tmp_path / "config.yaml"
    config.write_text(one(manifests, "ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_SASL_PASSWORD"}
    result = subprocess.run([str(Path(sys.executable).with_name("inferwatch")), "check", "-c", str(config),
                             "-p", str(ROOT / "playbooks")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0
    assert "${KAFKA_SASL_PASSWORD}" in result.stderr


# ---------------------------------------------------------------------------- Prometheus, Grafana

def metric_names() -> set[str]:
    """The sample names the daemon exposes (counters with _total, histograms with their series)."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}
    return {family.name + suffix for family in Metrics().registry.collect() for suffix in suffixes[family.type]}


def rule_groups(values: dict[str, Any]) -> list[dict[str, Any]]:
    return one(render(values), "PrometheusRule")["spec"]["groups"]


def test_monitoring_objects_only_when_asked():
    default = {m["kind"] for m in render({})}
    assert not default & {"ServiceMonitor", "PrometheusRule"}
    assert not [c for c in of_kind(render({}), "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    monitoring = render(MATRIX["monitoring"])
    assert {"ServiceMonitor", "PrometheusRule"} <= {m["kind"] for m in monitoring}


def test_servicemonitor_scrapes_every_stage_service_and_rules_select_their_jobs():
    manifests = render(MATRIX["monitoring-split"])
    monitor = one(manifests, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = of_kind(manifests, "Service")
    assert len(services) == 2
    for service in services:
        assert selector.items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    # job is the Service's name: every rule's selector names each Service.
    down = next(r for r in one(manifests, "PrometheusRule")["spec"]["groups"][0]["rules"] if r["alert"] == "InferWatchDown")
    job = re.search(r'job=~"([^"]+)"', down["expr"]).group(1)
    assert all(re.fullmatch(job, s["metadata"]["name"]) for s in services)
    labelled = one(render(MATRIX["monitoring"]), "ServiceMonitor")["metadata"]["labels"]
    assert labelled["release"] == "kube-prometheus-stack"  # what a Prometheus' serviceMonitorSelector picks


def test_rules_and_dashboard_use_only_the_daemons_metrics():
    known = metric_names()
    exprs = [rule["expr"] for group in rule_groups(MATRIX["monitoring"]) for rule in group["rules"]]
    dashboard = json.loads(dashboard_json())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = {name for expr in exprs for name in re.findall(r"\binferwatch_\w+", expr)}
    assert {"inferwatch_consumer_lag", "inferwatch_dead_letters_total", "inferwatch_detections_total"} <= used
    assert used - known == set()


def dashboard_json() -> str:
    dashboards = [c for c in of_kind(render(MATRIX["monitoring"]), "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    (dashboard,) = dashboards
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = dashboard["data"].values()
    return text


def test_dashboard_is_a_grafana_dashboard_on_a_prometheus_datasource_variable():
    dashboard = json.loads(dashboard_json())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "inferwatch"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"] == {**variables["datasource"], "type": "datasource", "query": "prometheus"}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all('namespace="$namespace"' in t["expr"] for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")


def write_rules(tmp_path: Path) -> Path:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups(MATRIX["monitoring"])}, sort_keys=False))
    return rules


@needs_promtool
def test_rules_pass_promtool_check(tmp_path):
    result = subprocess.run([PROMTOOL, "check", "rules", str(write_rules(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


TARGET = {"namespace": NAMESPACE, "job": FULLNAME, "pod": f"{FULLNAME}-5d9c7-x2x9q"}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    selector = ", ".join(f'{k}="{v}"' for k, v in {**TARGET, **labels}.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def alert_test(eval_time: str, name: str, alerts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"eval_time": eval_time, "alertname": name, "exp_alerts": alerts}


@needs_promtool
def test_promtool_proves_the_alerts_fire_and_stay_quiet_on_a_healthy_daemon(tmp_path):
    pod = TARGET["pod"]
    detection = dict(model="digits", detector="probing", kind="model_extraction")
    tests = [
        {   # a pod whose /metrics stopped answering, beside a healthy one
            "interval": "1m",
            "input_series": [series("up", "0x10"), series("up", "1x10", pod="other")],
            "alert_rule_test": [
                alert_test("6m", "InferWatchDown", [{
                    "exp_labels": {"severity": "critical", **TARGET},
                    "exp_annotations": {"summary": f"InferWatch pod {pod} cannot be scraped",
                                        "description": f"{FULLNAME} in {NAMESPACE}: its /metrics has not answered; "
                                                       "inference logs of its partitions are not watched."}}]),
                alert_test("6m", "InferWatchAbsent", []),
            ],
        },
        {   # no InferWatch target at all
            "interval": "1m",
            "input_series": [{"series": 'up{namespace="other", job="something-else"}', "values": "1x10"}],
            "alert_rule_test": [alert_test("6m", "InferWatchAbsent", [{
                "exp_labels": {"severity": "critical"},
                "exp_annotations": {"summary": f"No InferWatch pod of {FULLNAME} in {NAMESPACE} is up",
                                    "description": f"No inference log is watched; kubectl -n {NAMESPACE} get pods "
                                                   f"-l app.kubernetes.io/instance={RELEASE}"}}])],
        },
        {   # the first critical detection of a kind: a series that appears at 1, then stays
            "interval": "1m",
            "input_series": [series("inferwatch_detections_total", "_x5 1x30", severity="critical", **detection),
                             series("inferwatch_detections_total", "1+1x30", severity="warning", **detection)],
            "alert_rule_test": [
                alert_test("6m", "InferWatchDetection", [{
                    "exp_labels": {"severity": "warning", "namespace": NAMESPACE, "detection_severity": "critical",
                                   **detection},
                    "exp_annotations": {"summary": "critical model_extraction on model digits (probing)",
                                        "description": "The detections topic has the detail; the respond stage's "
                                                       "playbooks act on it."}}]),
                alert_test("30m", "InferWatchDetection", []),  # nothing new for 10 minutes
            ],
        },
        {   # 10% of the messages are dead letters, and 250k messages of lag
            "interval": "1m",
            "input_series": [series("inferwatch_events_total", "0+100x40", model="digits", outcome="processed"),
                             series("inferwatch_dead_letters_total", "0+10x40", reason="invalid_json"),
                             series("inferwatch_consumer_lag", "250000x40", topic="inference-logs", partition="0"),
                             series("inferwatch_consumer_lag", "250000x40", topic="inference-logs", partition="0",
                                    pod="other")],
            "alert_rule_test": [
                alert_test("25m", "InferWatchDeadLetters", [{
                    "exp_labels": {"severity": "warning", "namespace": NAMESPACE, "job": FULLNAME},
                    "exp_annotations": {
                        "summary": "10% of inference-log messages go to the dead-letter topic",
                        "description": "A model server writes malformed events; inferwatch_dead_letters_total{reason} "
                                       "and the inferwatch.reason header say why."}}]),
                alert_test("20m", "InferWatchConsumerLag", [{
                    "exp_labels": {"severity": "warning", "namespace": NAMESPACE, "job": FULLNAME,
                                   "topic": "inference-logs"},
                    "exp_annotations": {  # one partition reported by two pods counts once
                        "summary": f"InferWatch {FULLNAME} is 250k messages behind on inference-logs",
                        "description": "Detections come late. Add replicas (up to the topic's partitions) or turn "
                                       "heavy detectors off for trusted models."}}]),
            ],
        },
        {   # a healthy daemon: nothing fires
            "interval": "1m",
            "input_series": [series("up", "1x40"), series("inferwatch_ready", "1x40"),
                             series("inferwatch_events_total", "0+1000x40", model="digits", outcome="processed"),
                             series("inferwatch_dead_letters_total", "0+1x40", reason="invalid_json"),
                             series("inferwatch_consumer_lag", "150x40", topic="inference-logs", partition="0"),
                             series("inferwatch_approvals_pending", "0x40")],
            "alert_rule_test": [alert_test("35m", name, []) for name in (
                "InferWatchDown", "InferWatchAbsent", "InferWatchNotReady", "InferWatchConsumerLag",
                "InferWatchDeadLetters", "InferWatchDetection", "InferWatchApprovalPending")],
        },
    ]
    write_rules(tmp_path)
    spec = tmp_path / "tests.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests},
                                   sort_keys=False))
    result = subprocess.run([PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# ------------------------------------------------------------------------------- image and docs

def test_image_runs_as_the_charts_user_with_the_charts_paths():
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    assert len(stages) >= 2, "a multi-stage build"
    final = stages[-1]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    uid = defaults["podSecurityContext"]["runAsUser"]
    assert re.search(rf"^USER {uid}:{uid}$", final, re.M), "the final stage runs as the chart's numeric uid"
    assert not re.search(r"apt-get install|build-essential|gcc", final), "no build tools in the final stage"
    assert '"inferwatch"' in final and "ENTRYPOINT" in final
    assert defaults["state"]["mountPath"] in final
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= {line.strip("/") for line in ignored}


# Values documented as one row each, whatever they hold.
WHOLE_VALUES = {"config", "resources", "podSecurityContext", "securityContext", "livenessProbe", "readinessProbe",
                "startupProbe", "labels"}


def _leaf_keys(values: Any, prefix: str = "") -> list[str]:
    if isinstance(values, dict) and values and prefix.rsplit(".", 1)[-1] not in WHOLE_VALUES:
        return [key for name, value in values.items() for key in _leaf_keys(value, f"{prefix}.{name}".lstrip("."))]
    return [prefix]


def test_chart_readme_lists_every_value():
    section = (CHART / "README.md").read_text().split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    table = set(re.findall(r"^\| `([^`]+)` \|", section, re.M))
    keys = _leaf_keys(yaml.safe_load((CHART / "values.yaml").read_text()))
    assert [k for k in keys if k not in table] == []
    assert [k for k in table if k not in keys] == []
