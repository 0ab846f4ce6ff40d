"""Kubernetes actions: isolate a model's Deployment, release it, and roll it back (DESIGN §5).

``k8s_isolate`` cuts the model's pods off the network with a deny-all NetworkPolicy on the pods'
labels, or scales the Deployment to zero keeping the old count in an annotation; ``k8s_release``
undoes either. ``k8s_rollback`` is kubectl's ``rollout undo`` (``pkg/polymorphichelpers/rollback.go``,
``DeploymentRollbacker``) followed, if asked, by kubectl's ``rollout status`` wait.

Each write carries its own proof of being done, so a step interrupted by a crash is reconciled by
reading the cluster, never by guessing: the policy exists; the Deployment is at zero with the count
annotation; the Deployment's template is the target ReplicaSet's, and the rollback annotation names
the incident. Reads and writes go through the ``kubernetes`` client as raw JSON
(``_preload_content=False``), so fields the client's models do not know survive a template copy.
"""

# Least RBAC each action needs (the Helm chart's Role is built from this list):
#
#   k8s_isolate  mode networkpolicy  apps/deployments: get
#                                    networking.k8s.io/networkpolicies: create, get
#   k8s_isolate  mode scale          apps/deployments: get, patch
#   k8s_release  mode networkpolicy  networking.k8s.io/networkpolicies: delete, get
#   k8s_release  mode scale          apps/deployments: get, patch
#   k8s_rollback                     apps/deployments: get, patch
#                                    apps/replicasets: list
#
# (``get`` on networkpolicies is only for reconciling after a crash.) Replicas are patched on the
# Deployment itself, not through deployments/scale, because the count annotation must be written in
# the same request.

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
from typing import Any, Callable, Literal, NamedTuple

from monitor.config import Duration, parse_duration
from monitor.respond.actions import base
from monitor.respond.actions.base import Final, Incident, Services, Transient
from monitor.respond.delivery import retry_after

MANAGER = "inferwatch"  # the field manager of our writes and the managed-by label of what we create
MANAGED_BY = "app.kubernetes.io/managed-by"
POLICY_PREFIX = "inferwatch-isolate-"
REPLICAS_ANNOTATION = "inferwatch.io/replicas-before-isolate"
ROLLBACK_ANNOTATION = "inferwatch.io/rollback"  # {"incident", "revision", "from_revision", "replicaset"}
INCIDENT_ANNOTATION = "inferwatch.io/incident"
PLAYBOOK_ANNOTATION = "inferwatch.io/playbook"
DEPLOYMENT_ANNOTATION = "inferwatch.io/deployment"

REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
HASH_LABEL = "pod-template-hash"
# kubectl's annotationsToSkip: kept from the Deployment, never copied from the ReplicaSet.
KUBECTL_SKIPPED_ANNOTATIONS = frozenset({
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION_ANNOTATION,
    "deployment.kubernetes.io/revision-history",
    "deployment.kubernetes.io/desired-replicas",
    "deployment.kubernetes.io/max-replicas",
    "deprecated.deployment.rollback.to",
})
# Ours are kept from the Deployment too: a rollback must not drop the count of a scale-mode isolation
# (the controller copies Deployment annotations onto ReplicaSets, so an old one may carry stale ones).
KEPT_ANNOTATIONS = KUBECTL_SKIPPED_ANNOTATIONS | {REPLICAS_ANNOTATION, ROLLBACK_ANNOTATION}

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"

ROLLOUT_POLL_SECONDS = 2.0  # between reads of the Deployment while waiting for a rollout; tests shorten it

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class Isolate(base.Action):
    """Cut a Deployment's pods off: a deny-all NetworkPolicy on their labels, or scale to zero.

    ``mode: networkpolicy`` creates ``inferwatch-isolate-<deployment>`` selecting the Deployment's
    pods, with both policy types and no rule, so nothing goes in or out (where the cluster's network
    plugin enforces NetworkPolicies). ``mode: scale`` writes the replica count to
    ``inferwatch.io/replicas-before-isolate`` and sets replicas to 0 in one patch. Both are idempotent.

    Parameters: ``namespace``, ``deployment``, ``mode`` (``networkpolicy`` or ``scale``).

    >>> Isolate().check(Isolate.Params(namespace="ml", deployment="fraud"))
    >>> Isolate().check(Isolate.Params(namespace="ML", deployment="fraud"))
    Traceback (most recent call last):
    ...
    ValueError: namespace: 'ML' is not a namespace name (DNS-1123 label: lowercase letters, digits and '-', at most 63)
    """

    name = "k8s_isolate"
    destructive = True

    class Params(base.Params):
        namespace: str
        deployment: str
        mode: Literal["networkpolicy", "scale"] = "networkpolicy"

    def check(self, params: Params) -> None:
        _check_names(params)

    def run(self, params: Params, incident: Incident, services: Services) -> dict[str, Any]:
        _require_names(params)
        cluster = _Cluster(services)
        if params.mode == "networkpolicy":
            return _isolate_by_policy(cluster, params, incident)
        return _isolate_by_scale(cluster, params)

    def reconcile(self, params: Params, incident: Incident, services: Services,
                  attempt: dict[str, Any]) -> dict[str, Any] | None:
        _require_names(params)
        cluster = _Cluster(services)
        detail = _detail(params)
        if params.mode == "networkpolicy":
            policy = cluster.policy(params.namespace, _policy_name(params.deployment))
            if policy is None:
                return None
            return {**detail, "pod_selector": policy.get("spec", {}).get("podSelector"), "reconciled": True}
        deployment = cluster.deployment(params.namespace, params.deployment)
        before = _replicas_before(deployment, params)
        if before is None or _replicas(deployment) != 0:
            return None
        return {**detail, "replicas_before": before, "reconciled": True}


class Release(base.Action):
    """Undo ``k8s_isolate``: delete its NetworkPolicy, or restore the annotated replica count.

    Parameters are ``k8s_isolate``'s. Releasing what is not isolated is done, not an error.
    """

    name = "k8s_release"
    destructive = True
    Params = Isolate.Params  # release undoes isolate, so it names the same thing the same way

    def check(self, params: Isolate.Params) -> None:
        _check_names(params)

    def run(self, params: Isolate.Params, incident: Incident, services: Services) -> dict[str, Any]:
        _require_names(params)
        cluster = _Cluster(services)
        detail = _detail(params)
        if params.mode == "networkpolicy":
            deleted = cluster.delete_policy(params.namespace, _policy_name(params.deployment))
            return {**detail, "changed": deleted}
        deployment = cluster.deployment(params.namespace, params.deployment)
        before = _replicas_before(deployment, params)
        if before is None:
            return {**detail, "changed": False}
        # The resourceVersion makes the patch conditional: if someone wrote in between, 409 and retry.
        cluster.patch_deployment(params.namespace, params.deployment, {
            "metadata": {"annotations": {REPLICAS_ANNOTATION: None},
                         "resourceVersion": deployment["metadata"]["resourceVersion"]},
            "spec": {"replicas": before},
        }, MERGE_PATCH)
        return {**detail, "replicas": before, "changed": True}

    def reconcile(self, params: Isolate.Params, incident: Incident, services: Services,
                  attempt: dict[str, Any]) -> dict[str, Any] | None:
        _require_names(params)
        cluster = _Cluster(services)
        detail = _detail(params)
        if params.mode == "networkpolicy":
            if cluster.policy(params.namespace, _policy_name(params.deployment)) is not None:
                return None
            return {**detail, "reconciled": True}
        deployment = cluster.deployment(params.namespace, params.deployment)
        if _replicas_before(deployment, params) is not None:
            return None
        return {**detail, "replicas": _replicas(deployment), "reconciled": True}


class Rollback(base.Action):
    """Roll a Deployment back to an earlier ReplicaSet's pod template: ``kubectl rollout undo``.

    The ReplicaSets the Deployment controls are its history, numbered by their
    ``deployment.kubernetes.io/revision`` annotation; ``to: previous`` is the second newest (kubectl's
    rule), ``to: "3"`` is revision 3. A paused Deployment, or a history without the target, is
    refused. The Deployment's ``spec.template`` is replaced by the target's (without its
    ``pod-template-hash`` label) and its annotations by the target's, as kubectl does, in one JSON
    patch that also records the incident in ``inferwatch.io/rollback``. With ``wait``, returns once
    the rollout finished as ``kubectl rollout status`` judges it; past ``timeout`` it fails (Final:
    the template is already rolled back, and a stuck rollout needs a person, not another wait).

    Parameters: ``namespace``, ``deployment``, ``to`` (``previous`` or a revision number),
    ``timeout`` (a duration), ``wait``.

    >>> Rollback().check(Rollback.Params(namespace="ml", deployment="fraud", to="3", timeout="90s"))
    >>> Rollback().check(Rollback.Params(namespace="ml", deployment="fraud", to="latest"))
    Traceback (most recent call last):
    ...
    ValueError: to: expected "previous" or a revision number (1 or more), got 'latest'
    """

    name = "k8s_rollback"
    destructive = True

    class Params(base.Params):
        namespace: str
        deployment: str
        to: str | int = "previous"
        timeout: Duration = "5m"
        wait: bool = True

    def check(self, params: Params) -> None:
        _check_names(params)
        if not _templated(params.to):
            _revision_wanted(params.to)
        if not _templated(params.timeout):
            _timeout(params.timeout)

    def run(self, params: Params, incident: Incident, services: Services) -> dict[str, Any]:
        _require_names(params)
        try:
            wanted = _revision_wanted(params.to)
            timeout = _timeout(params.timeout)
        except ValueError as exc:
            raise Final(str(exc)) from None
        cluster = _Cluster(services)
        where = f"{params.namespace}/{params.deployment}"
        deployment = cluster.deployment(params.namespace, params.deployment)
        history = _history(cluster, deployment)

        # A retry after the patch went through (an answer lost on the way back) finds its own
        # annotation; looking for "previous" again would then find the template it rolled away from.
        done = _applied_for(incident, deployment, history)
        if done is not None:
            detail = {**_detail(params, mode=False), **done, "changed": False}
        else:
            if deployment.get("spec", {}).get("paused"):
                raise Final(f"deployment {where} is paused: InferWatch does not roll back a paused deployment; "
                            f"resume it (kubectl rollout resume deployment/{params.deployment} -n {params.namespace})")
            if not wanted and _unobserved(deployment):
                # The newest template may have no ReplicaSet yet: "previous" would be one too far back.
                raise Transient(f"deployment {where} has a change its controller has not observed yet; "
                                "the history is read again on the next try")
            target = _target(history, wanted, where)
            detail = {**_detail(params, mode=False), "revision": str(_revision(target)),
                      "from_revision": _annotations(deployment).get(REVISION_ANNOTATION),
                      "replicaset": target["metadata"]["name"]}
            changed = not _same_template(target["spec"]["template"], deployment["spec"]["template"])
            if changed:
                cluster.patch_deployment(params.namespace, params.deployment,
                                         _rollback_patch(deployment, target, incident, detail), JSON_PATCH)
            detail["changed"] = changed
        if params.wait:
            _wait_for_rollout(cluster, params, services, timeout, detail)
            detail["rolled_out"] = True
        return detail

    def reconcile(self, params: Params, incident: Incident, services: Services,
                  attempt: dict[str, Any]) -> dict[str, Any] | None:
        """Done when the Deployment runs the target's template. The target is found by our annotation
        first: once the controller has re-numbered the restored ReplicaSet as the newest revision,
        "previous" (or "3") would name a different one."""
        _require_names(params)
        cluster = _Cluster(services)
        deployment = cluster.deployment(params.namespace, params.deployment)
        history = _history(cluster, deployment)
        done = _applied_for(incident, deployment, history)
        if done is not None:
            return {**_detail(params, mode=False), **done, "reconciled": True}
        try:
            target = _target(history, _revision_wanted(params.to), f"{params.namespace}/{params.deployment}")
        except (Final, ValueError):
            return None
        if not _same_template(target["spec"]["template"], deployment["spec"]["template"]):
            return None
        return {**_detail(params, mode=False), "revision": str(_revision(target)),
                "from_revision": _annotations(deployment).get(REVISION_ANNOTATION),
                "replicaset": target["metadata"]["name"], "reconciled": True}


# ------------------------------------------------------------------------------------- isolate

def _isolate_by_policy(cluster: _Cluster, params: Isolate.Params, incident: Incident) -> dict[str, Any]:
    deployment = cluster.deployment(params.namespace, params.deployment)
    selector = _pod_selector(deployment, f"{params.namespace}/{params.deployment}")
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": _policy_name(params.deployment),
            "namespace": params.namespace,
            "labels": {MANAGED_BY: MANAGER},
            "annotations": {INCIDENT_ANNOTATION: incident.id, PLAYBOOK_ANNOTATION: incident.playbook,
                            DEPLOYMENT_ANNOTATION: params.deployment},
        },
        # Both policy types and no rule: no traffic in, none out.
        "spec": {"podSelector": selector, "policyTypes": ["Ingress", "Egress"]},
    }
    created = cluster.create_policy(params.namespace, policy)
    return {**_detail(params), "pod_selector": selector, "changed": created}


def _isolate_by_scale(cluster: _Cluster, params: Isolate.Params) -> dict[str, Any]:
    deployment = cluster.deployment(params.namespace, params.deployment)
    replicas = _replicas(deployment)
    before = _replicas_before(deployment, params)
    if before is not None and replicas == 0:
        return {**_detail(params), "replicas_before": before, "changed": False}
    # Count and zero in one patch, so no crash can leave the Deployment at zero with the count lost.
    # Already annotated but scaled up since (by hand, by an autoscaler): the first count is kept.
    metadata: dict[str, Any] = {"resourceVersion": deployment["metadata"]["resourceVersion"]}
    if before is None:
        before = replicas
        metadata["annotations"] = {REPLICAS_ANNOTATION: str(replicas)}
    cluster.patch_deployment(params.namespace, params.deployment,
                             {"metadata": metadata, "spec": {"replicas": 0}}, MERGE_PATCH)
    return {**_detail(params), "replicas_before": before, "changed": True}


def _pod_selector(deployment: dict[str, Any], where: str) -> dict[str, Any]:
    """The Deployment's own selector, refused unless it pins at least one label: a policy with an
    empty selector, or one of only expressions such as ``tier notin (db)``, could cut off much more of
    the namespace than this model."""
    selector = deployment.get("spec", {}).get("selector") or {}
    if not selector.get("matchLabels"):
        raise Final(f"deployment {where} selects its pods without matchLabels ({json.dumps(selector)}): "
                    "InferWatch isolates only pods pinned by at least one exact label; use mode: scale")
    return {key: selector[key] for key in ("matchLabels", "matchExpressions") if selector.get(key)}


def _policy_name(deployment: str) -> str:
    """``inferwatch-isolate-<deployment>``, shortened with a hash if it would pass 253 characters.

    >>> _policy_name("fraud")
    'inferwatch-isolate-fraud'
    >>> len(_policy_name("a" * 253))
    253
    """
    name = POLICY_PREFIX + deployment
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(deployment.encode()).hexdigest()[:10]
    return f"{name[:253 - 11]}-{digest}"


def _replicas(deployment: dict[str, Any]) -> int:
    replicas = deployment.get("spec", {}).get("replicas")
    return 1 if replicas is None else int(replicas)  # the API's default


def _replicas_before(deployment: dict[str, Any], params: Isolate.Params) -> int | None:
    value = _annotations(deployment).get(REPLICAS_ANNOTATION)
    if value is None:
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise Final(f"deployment {params.namespace}/{params.deployment} has {REPLICAS_ANNOTATION}={value!r}, "
                    "not a replica count: set the replicas and remove the annotation by hand")
    return count


# ------------------------------------------------------------------------------------ rollback

def _history(cluster: _Cluster, deployment: dict[str, Any]) -> list[dict[str, Any]]:
    """The ReplicaSets the Deployment controls (its selector, then its uid as controller), as kubectl's
    ``deploymentutil.GetAllReplicaSets``: a ReplicaSet of another Deployment with matching labels is
    not history."""
    metadata = deployment["metadata"]
    selector = _selector_string(deployment["spec"]["selector"])
    listed = cluster.replicasets(metadata["namespace"], selector)
    return [rs for rs in listed
            if any(ref.get("uid") == metadata["uid"] and ref.get("controller")
                   for ref in rs["metadata"].get("ownerReferences") or [])]


def _revision(replicaset: dict[str, Any]) -> int | None:
    try:
        return int(_annotations(replicaset)[REVISION_ANNOTATION])
    except (KeyError, ValueError):
        return None


def _target(history: list[dict[str, Any]], wanted: int, where: str) -> dict[str, Any]:
    """kubectl's ``deploymentRevision``: revision ``wanted``, or for 0 the second newest."""
    numbered = sorted((rs for rs in history if _revision(rs) is not None), key=_revision)
    if wanted:
        for rs in numbered:
            if _revision(rs) == wanted:
                return rs
        known = ", ".join(str(_revision(rs)) for rs in numbered) or "none"
        raise Final(f"deployment {where} has no revision {wanted} to roll back to (revisions: {known})")
    if len(numbered) < 2:
        raise Final(f"no rollout history found for deployment {where}: it has "
                    f"{len(numbered)} revision(s) and no previous one to roll back to")
    return numbered[-2]


def _rollback_patch(deployment: dict[str, Any], target: dict[str, Any], incident: Incident,
                    detail: dict[str, Any]) -> list[dict[str, Any]]:
    """kubectl's ``getDeploymentPatch``: replace the template (without the hash label) and the
    annotations (the Deployment's skipped ones, the ReplicaSet's others), plus our record."""
    template = copy.deepcopy(target["spec"]["template"])
    labels = template.get("metadata", {}).get("labels") or {}
    labels.pop(HASH_LABEL, None)
    current = _annotations(deployment)
    annotations = {key: value for key, value in current.items() if key in KEPT_ANNOTATIONS}
    annotations.update({key: value for key, value in _annotations(target).items() if key not in KEPT_ANNOTATIONS})
    annotations[ROLLBACK_ANNOTATION] = json.dumps(
        {"incident": incident.id, **{key: detail[key] for key in ("revision", "from_revision", "replicaset")}},
        sort_keys=True)
    # "replace" needs the member to exist (RFC 6902); a Deployment the controller has seen always
    # has annotations, one created a moment ago may not.
    return [
        {"op": "replace", "path": "/spec/template", "value": template},
        {"op": "replace" if "annotations" in deployment["metadata"] else "add",
         "path": "/metadata/annotations", "value": annotations},
    ]


def _applied_for(incident: Incident, deployment: dict[str, Any],
                 history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What our rollback for this incident recorded, if the Deployment still runs its target."""
    try:
        record = json.loads(_annotations(deployment)[ROLLBACK_ANNOTATION])
    except (KeyError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("incident") != incident.id:
        return None
    for rs in history:
        if rs["metadata"]["name"] == record.get("replicaset"):
            if _same_template(rs["spec"]["template"], deployment["spec"]["template"]):
                return {key: record.get(key) for key in ("revision", "from_revision", "replicaset")}
    return None


def _same_template(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """kubectl's ``equalIgnoreHash``: equal but for the ``pod-template-hash`` label, with absent, null
    and empty treated alike (as apimachinery's semantic equality does).

    >>> _same_template({"metadata": {"labels": {"app": "a", "pod-template-hash": "5d9c"}, "creationTimestamp": None}},
    ...                {"metadata": {"labels": {"app": "a"}}, "spec": {"volumes": []}})
    True
    """
    return _pruned(_without_hash(first)) == _pruned(_without_hash(second))


def _without_hash(template: dict[str, Any]) -> dict[str, Any]:
    metadata = template.get("metadata") or {}
    labels = {k: v for k, v in (metadata.get("labels") or {}).items() if k != HASH_LABEL}
    return {**template, "metadata": {**metadata, "labels": labels}}


def _pruned(value: Any) -> Any:
    if isinstance(value, dict):
        pruned = {key: _pruned(item) for key, item in value.items()}
        return {key: item for key, item in pruned.items() if item not in (None, {}, [])}
    if isinstance(value, list):
        return [_pruned(item) for item in value]
    return value


def _wait_for_rollout(cluster: _Cluster, params: Rollback.Params, services: Services, timeout: float,
                      detail: dict[str, Any]) -> None:
    """Poll until ``kubectl rollout status`` would say "successfully rolled out"; a failed read is
    tried again until the deadline."""
    deadline = services.now() + timeout
    where = f"{params.namespace}/{params.deployment}"
    shown = params.timeout if isinstance(params.timeout, str) else f"{params.timeout:g}s"
    while True:
        try:
            finished, progress = _rollout_progress(cluster.deployment(params.namespace, params.deployment))
        except Transient as exc:
            finished, progress = False, f"last read failed: {exc}"
        if finished:
            return
        if services.now() >= deadline:
            raise Final(f"deployment {where}: rolled back to revision {detail['revision']} "
                        f"({detail['replicaset']}) but the rollout did not finish within {shown}: {progress}")
        time.sleep(ROLLOUT_POLL_SECONDS)


def _unobserved(deployment: dict[str, Any]) -> bool:
    status = deployment.get("status") or {}
    return deployment["metadata"].get("generation", 0) > status.get("observedGeneration", 0)


def _rollout_progress(deployment: dict[str, Any]) -> tuple[bool, str]:
    """kubectl's ``DeploymentStatusViewer.Status``: (finished, what it waits for).

    >>> _rollout_progress({"metadata": {"name": "fraud", "generation": 4}, "spec": {"replicas": 3},
    ...     "status": {"observedGeneration": 4, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 2}})
    (False, '2 of 3 updated replicas are available')
    """
    status = deployment.get("status") or {}
    name = deployment["metadata"]["name"]
    if _unobserved(deployment):
        return False, "the deployment controller has not observed the new template yet"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            raise Final(f"deployment {deployment['metadata'].get('namespace')}/{name} exceeded its progress "
                        f"deadline: {condition.get('message', '')}".rstrip(": "))
    desired = _replicas(deployment)
    updated = status.get("updatedReplicas", 0)
    if updated < desired:
        return False, f"{updated} out of {desired} new replicas have been updated"
    if status.get("replicas", 0) > updated:
        return False, f"{status.get('replicas', 0) - updated} old replicas are pending termination"
    if status.get("availableReplicas", 0) < updated:
        return False, f"{status.get('availableReplicas', 0)} of {updated} updated replicas are available"
    return True, "successfully rolled out"


# ---------------------------------------------------------------------------------- parameters

def _templated(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def _check_names(params: Any) -> None:
    namespace, deployment = params.namespace, params.deployment
    if not _templated(namespace) and not (_DNS1123_LABEL.match(namespace) and len(namespace) <= 63):
        raise ValueError(f"namespace: {namespace!r} is not a namespace name "
                         "(DNS-1123 label: lowercase letters, digits and '-', at most 63)")
    if not _templated(deployment) and not (_DNS1123_SUBDOMAIN.match(deployment) and len(deployment) <= 253):
        raise ValueError(f"deployment: {deployment!r} is not a deployment name "
                         "(DNS-1123 subdomain: lowercase letters, digits, '-' and '.', at most 253)")


def _require_names(params: Any) -> None:
    """The rendered names, checked again: a template may have produced anything."""
    if _templated(params.namespace) or _templated(params.deployment):
        raise Final("namespace and deployment must be rendered before the step runs")
    try:
        _check_names(params)
    except ValueError as exc:
        raise Final(str(exc)) from None


def _revision_wanted(to: str | int) -> int:
    """0 for ``previous``, else the revision number.

    >>> _revision_wanted("previous"), _revision_wanted("3"), _revision_wanted(3)
    (0, 3, 3)
    """
    if to == "previous":
        return 0
    text = str(to).strip()
    if not isinstance(to, bool) and text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f'to: expected "previous" or a revision number (1 or more), got {to!r}')


def _timeout(text: str | float) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ValueError(f"timeout: {exc}") from None


def _detail(params: Any, mode: bool = True) -> dict[str, Any]:
    detail: dict[str, Any] = {"namespace": params.namespace, "deployment": params.deployment}
    if mode:
        detail["mode"] = params.mode
        if params.mode == "networkpolicy":
            detail["networkpolicy"] = _policy_name(params.deployment)
    return detail


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    return obj.get("metadata", {}).get("annotations") or {}


def _selector_string(selector: dict[str, Any]) -> str:
    """A LabelSelector as the ``labelSelector`` query (apimachinery's ``LabelSelectorAsSelector``).

    >>> _selector_string({"matchLabels": {"app": "fraud", "tier": "model"},
    ...                   "matchExpressions": [{"key": "track", "operator": "In", "values": ["b", "a"]},
    ...                                        {"key": "canary", "operator": "DoesNotExist"}]})
    'app=fraud,tier=model,track in (a,b),!canary'
    """
    parts = [f"{key}={value}" for key, value in sorted((selector.get("matchLabels") or {}).items())]
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = ",".join(sorted(expression.get("values") or []))
        parts.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})",
                      "Exists": key, "DoesNotExist": f"!{key}"}[operator])
    return ",".join(parts)


# ----------------------------------------------------------------------------- the API server

class _Resource(NamedTuple):
    plural: str
    group: str  # "" for the core group
    kind: str  # as messages name one

    def rbac(self, verb: str, namespace: str) -> str:
        return f'verb "{verb}" on resource "{self.plural}" in API group "{self.group}" in namespace {namespace}'


DEPLOYMENTS = _Resource("deployments", "apps", "deployment")
REPLICASETS = _Resource("replicasets", "apps", "replicaset")
NETWORKPOLICIES = _Resource("networkpolicies", "networking.k8s.io", "networkpolicy")


class _Cluster:
    """The few API calls these actions make, answered as JSON dicts, with the API's errors turned into
    ``Transient`` (429, 5xx, no answer) and ``Final`` (anything else)."""

    def __init__(self, services: Services):
        if services.kubernetes is None:
            raise Final("no Kubernetes connection configured: Kubernetes actions need the daemon to run "
                        "in a cluster (service account) or a kubeconfig")
        from kubernetes import client  # here, so playbooks without Kubernetes steps never import it

        api_client = services.kubernetes()
        self._apps = client.AppsV1Api(api_client)
        self._networking = client.NetworkingV1Api(api_client)
        self._timeout = services.http_timeout
        self._now = services.now

    def deployment(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call("get", DEPLOYMENTS, namespace, name,
                          self._apps.read_namespaced_deployment, name, namespace)

    def patch_deployment(self, namespace: str, name: str, patch: Any, content_type: str) -> dict[str, Any]:
        return self._call("patch", DEPLOYMENTS, namespace, name, self._apps.patch_namespaced_deployment,
                          name, namespace, patch, field_manager=MANAGER, _content_type=content_type)

    def replicasets(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        listed = self._call("list", REPLICASETS, namespace, None,
                            self._apps.list_namespaced_replica_set, namespace, label_selector=selector)
        return listed.get("items") or []

    def policy(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call("get", NETWORKPOLICIES, namespace, name,
                          self._networking.read_namespaced_network_policy, name, namespace, none_on=404)

    def create_policy(self, namespace: str, policy: dict[str, Any]) -> bool:
        """True when created, False when it was there already (409)."""
        created = self._call("create", NETWORKPOLICIES, namespace, policy["metadata"]["name"],
                             self._networking.create_namespaced_network_policy, namespace, policy,
                             field_manager=MANAGER, none_on=409,
                             # this client version sends a create's body without a Content-Type
                             _headers={"Content-Type": "application/json"})
        return created is not None

    def delete_policy(self, namespace: str, name: str) -> bool:
        """True when deleted, False when there was none (404)."""
        deleted = self._call("delete", NETWORKPOLICIES, namespace, name,
                             self._networking.delete_namespaced_network_policy, name, namespace, none_on=404)
        return deleted is not None

    def _call(self, verb: str, resource: _Resource, namespace: str, name: str | None,
              call: Callable[..., Any], *args: Any, none_on: int | None = None, **kwargs: Any) -> Any:
        """``call`` as raw JSON; None when the API answers ``none_on``, which the caller expects."""
        where = f"{resource.kind} {namespace}/{name}" if name else f"{resource.plural} in namespace {namespace}"
        return call_raw(call, *args, verb=verb, where=where, timeout=self._timeout, none_on=none_on,
                        error=lambda exc: self._error(exc, verb, resource, namespace, where), **kwargs)

    def _error(self, exc: Any, verb: str, resource: _Resource, namespace: str, where: str) -> Exception:
        status = exc.status or 0
        said = status_message(exc.body)
        headers = exc.headers or {}
        if status == 404:
            return Final(f"{where} not found")
        if status == 401:
            return Final(f"unauthorized: the Kubernetes API rejected InferWatch's credentials trying to "
                         f"{verb} {where} (is the service account token mounted and current?)")
        if status == 403:
            return Final(f"forbidden: the service account needs RBAC {resource.rbac(verb, namespace)} "
                         f"to {verb} {where}{said}")
        if status == 409:
            return Transient(f"conflict: {where} changed while InferWatch was writing it; "
                             f"it is read again on the next try{said}")
        if status == 429 or status >= 500 or status == 0:
            wait = retry_after(headers.get("Retry-After"), self._now())
            return Transient(f"cannot {verb} {where}: the Kubernetes API answered {status or 'nothing'}{said}",
                             retry_after=wait)
        return Final(f"cannot {verb} {where}: the Kubernetes API answered {status}{said}")


def call_raw(call: Callable[..., Any], *args: Any, verb: str, where: str, timeout: Any,
             error: Callable[[Any], Exception], none_on: int | None = None, **kwargs: Any) -> Any:
    """A kubernetes client ``call`` as raw JSON (``_preload_content=False``: fields the client's models
    do not know survive); None when the API answers ``none_on``; ``error`` maps any other API answer
    to Transient or Final; no answer at all is Transient."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    try:
        response = call(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
        try:
            return json.loads(response.data or b"{}")
        finally:
            response.release_conn()
    except ApiException as exc:
        if exc.status == none_on:
            return None
        raise error(exc) from None
    except urllib3.exceptions.HTTPError as exc:
        # Timeouts, refused connections, TLS failures; their text names the host, never the token.
        raise Transient(f"cannot {verb} {where}: the Kubernetes API did not answer "
                        f"({type(exc).__name__}: {short(str(exc))})") from None


def status_message(body: Any) -> str:
    """The ``message`` of the API's Status object, for the end of an error message."""
    try:
        message = json.loads(body).get("message")
    except (TypeError, ValueError, AttributeError):
        message = None
    return f"; the API said: {short(message)}" if message else ""


def short(text: Any) -> str:
    """One line of at most 300 characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= 300 else text[:297] + "..."
