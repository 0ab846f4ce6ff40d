"""An in-memory Kubernetes API server for the Kubernetes actions' tests (DESIGN §6: no real API server
can be installed here).

It speaks the real paths, JSON and Status errors for what the actions use: Deployments (get, JSON
patch, merge patch), ReplicaSets (list by label selector) and NetworkPolicies (create, get, delete).
It records every request (method, path, query, content type, body, Authorization header) so tests
assert exactly what was sent, lets a test inject an error answer, and stands in for the Deployment
controller: after a spec change, the N-th read of the Deployment shows it observed and (unless
``rollout_stuck``) rolled out, and a rolled-back-to ReplicaSet is re-numbered as the newest revision,
as the real controller does.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

REVISION = "deployment.kubernetes.io/revision"
HASH_LABEL = "pod-template-hash"
GROUPS = {"deployments": "apps", "replicasets": "apps", "networkpolicies": "networking.k8s.io"}
KINDS = {"deployments": "Deployment", "replicasets": "ReplicaSet", "networkpolicies": "NetworkPolicy"}
_PATH = re.compile(r"^/apis/(?P<group>[^/]+)/v1/namespaces/(?P<namespace>[^/]+)"
                   r"/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$")
_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "AlreadyExists",
            415: "UnsupportedMediaType", 422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
            503: "ServiceUnavailable"}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: Any
    authorization: str | None
    verb: str  # the RBAC verb: get, list, create, patch, delete


@dataclass
class _Fault:
    method: str
    plural: str
    status: int
    headers: dict[str, str]
    times: int | None  # None: every time


@dataclass
class FakeKubernetes:
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)  # (plural, ns, name)
    requests: list[Request] = field(default_factory=list)
    rollout_gets: int = 2  # the read of the Deployment, after a spec change, that shows it rolled out
    rollout_stuck: bool = False  # the controller observes the change but never finishes the rollout

    def __post_init__(self) -> None:
        self._faults: list[_Fault] = []
        self._holds: dict[tuple[str, str], threading.Event] = {}
        self._pending: dict[tuple[str, str], int] = {}  # Deployments changed and not yet observed -> reads
        self._version = 1000
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # ------------------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeKubernetes":
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="k8s-fake", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            for connection in list(self._connections):  # keep-alive connections the client still holds
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = None

    # -------------------------------------------------------------------------------- objects

    def add_deployment(self, namespace: str, name: str, *, image: str = "model:1", replicas: int = 3,
                       match_labels: dict[str, str] | None = None, selector: dict[str, Any] | None = None,
                       paused: bool = False, revision: int | None = None,
                       annotations: dict[str, str] | None = None) -> dict[str, Any]:
        """A Deployment as the controller leaves it after a finished rollout."""
        labels = match_labels if match_labels is not None else {"app": name}
        all_annotations = dict(annotations or {})
        if revision is not None:
            all_annotations[REVISION] = str(revision)
        deployment = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": self._metadata(namespace, name, labels=dict(labels), annotations=all_annotations,
                                       generation=1),
            "spec": {
                "replicas": replicas,
                "selector": selector if selector is not None else {"matchLabels": dict(labels)},
                "template": pod_template(labels, image),
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
                "revisionHistoryLimit": 10, "progressDeadlineSeconds": 600,
                **({"paused": True} if paused else {}),
            },
            "status": {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                       "readyReplicas": replicas, "availableReplicas": replicas},
        }
        with self._lock:
            self.objects[("deployments", namespace, name)] = deployment
        return copy.deepcopy(deployment)

    def add_replicaset(self, deployment: dict[str, Any], *, revision: int, image: str,
                       owner: dict[str, Any] | None = None,
                       annotations: dict[str, str] | None = None) -> dict[str, Any]:
        """A ReplicaSet of ``deployment`` (or controlled by ``owner``) at ``revision`` running ``image``."""
        owner = owner or deployment
        labels = dict(deployment["spec"]["template"]["metadata"]["labels"])
        pod_hash = uuid.uuid5(uuid.NAMESPACE_DNS, f"{owner['metadata']['name']}/{image}").hex[:10]
        labels[HASH_LABEL] = pod_hash
        namespace = deployment["metadata"]["namespace"]
        name = f"{owner['metadata']['name']}-{pod_hash}"
        all_annotations = {REVISION: str(revision), "deployment.kubernetes.io/desired-replicas": "3",
                           "deployment.kubernetes.io/max-replicas": "4", **(annotations or {})}
        replicaset = {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {
                **self._metadata(namespace, name, labels=labels, annotations=all_annotations, generation=1),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": owner["metadata"]["name"],
                                     "uid": owner["metadata"]["uid"], "controller": True,
                                     "blockOwnerDeletion": True}],
            },
            "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                     "template": pod_template(labels, image)},
            "status": {"replicas": 0, "observedGeneration": 1},
        }
        with self._lock:
            self.objects[("replicasets", namespace, name)] = replicaset
        return copy.deepcopy(replicaset)

    def deployment_with_history(self, namespace: str, name: str, images: list[str],
                                **deployment_options: Any) -> dict[str, Any]:
        """A Deployment rolled out once per image: revision i runs ``images[i-1]``; the last is current."""
        deployment = self.add_deployment(namespace, name, image=images[-1], revision=len(images),
                                         **deployment_options)
        for revision, image in enumerate(images, start=1):
            self.add_replicaset(deployment, revision=revision, image=image,
                                annotations={"kubernetes.io/change-cause": f"deploy {image}"})
        return deployment

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            found = self.objects.get((plural, namespace, name))
            return copy.deepcopy(found)

    def replicasets_of(self, namespace: str) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(obj) for (plural, ns, _), obj in self.objects.items()
                    if plural == "replicasets" and ns == namespace]

    # ------------------------------------------------------------------------ faults, records

    def fail(self, method: str, plural: str, status: int, *, headers: dict[str, str] | None = None,
             times: int | None = None) -> None:
        """Answer ``method`` on ``plural`` with ``status`` (a Status object), ``times`` times or always."""
        with self._lock:
            self._faults.append(_Fault(method, plural, status, dict(headers or {}), times))

    def hold(self, method: str, plural: str) -> threading.Event:
        """Apply ``method`` on ``plural`` but keep its answer until the returned event is set (a client
        killed meanwhile never learns that its write was done)."""
        gate = threading.Event()
        with self._lock:
            self._holds[(method, plural)] = gate
        return gate

    def _held(self, method: str, target: str) -> threading.Event | None:
        match = _PATH.match(urlsplit(target).path)
        with self._lock:
            return self._holds.get((method, match["plural"])) if match else None

    def writes(self) -> list[Request]:
        with self._lock:
            return [request for request in self.requests if request.method != "GET"]

    # ------------------------------------------------------------------------------- serving

    def _metadata(self, namespace: str, name: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                "resourceVersion": self._next_version(), "creationTimestamp": "2025-01-01T00:00:00Z",
                **{key: value for key, value in extra.items() if value}}

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def handle(self, method: str, target: str, headers: Any, raw: bytes) -> tuple[int, dict[str, str], Any]:
        parts = urlsplit(target)
        query = parse_qs(parts.query)
        content_type = headers.get("Content-Type")
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        match = _PATH.match(parts.path)
        plural = match["plural"] if match else ""
        name = match["name"] if match else None
        verb = {"GET": "get" if name else "list", "POST": "create", "PATCH": "patch", "DELETE": "delete",
                "PUT": "update"}.get(method, method.lower())
        with self._lock:
            self.requests.append(Request(method, parts.path, query, content_type, body,
                                         headers.get("Authorization"), verb))
            if not match or plural not in GROUPS or match["group"] != GROUPS[plural]:
                return 404, {}, status_object(404, f"the server could not find the requested resource ({parts.path})")
            namespace = match["namespace"]
            for fault in self._faults:
                if fault.method == method and fault.plural == plural and fault.times != 0:
                    if fault.times is not None:
                        fault.times -= 1
                    return fault.status, fault.headers, _fault_status(fault.status, verb, plural, namespace, name)
            return self._route(method, verb, plural, namespace, name, query, content_type, body)

    def _route(self, method: str, verb: str, plural: str, namespace: str, name: str | None,
               query: dict[str, list[str]], content_type: str | None, body: Any) -> tuple[int, dict[str, str], Any]:
        key = (plural, namespace, name)
        if verb == "list":
            selector = (query.get("labelSelector") or [""])[0]
            items = [copy.deepcopy(obj) for (p, ns, _), obj in sorted(self.objects.items())
                     if p == plural and ns == namespace
                     and selector_matches(selector, obj["metadata"].get("labels") or {})]
            return 200, {}, {"apiVersion": f"{GROUPS[plural]}/v1", "kind": f"{KINDS[plural]}List",
                             "metadata": {"resourceVersion": str(self._version)}, "items": items}
        if verb == "create":
            name = (body or {}).get("metadata", {}).get("name")
            key = (plural, namespace, name)
            if key in self.objects:
                return 409, {}, status_object(409, f'{plural}.{GROUPS[plural]} "{name}" already exists',
                                              reason="AlreadyExists", name=name, plural=plural)
            created = copy.deepcopy(body)
            created["metadata"].update({"namespace": namespace, "uid": str(uuid.uuid4()), "generation": 1,
                                        "resourceVersion": self._next_version(),
                                        "creationTimestamp": "2025-01-01T00:00:00Z"})
            self.objects[key] = created
            return 201, {}, created
        if key not in self.objects:
            return 404, {}, status_object(404, f'{plural}.{GROUPS[plural]} "{name}" not found',
                                          name=name, plural=plural)
        if verb == "get":
            if plural == "deployments":
                self._controller_reads(namespace, name)
            return 200, {}, copy.deepcopy(self.objects[key])
        if verb == "delete":
            del self.objects[key]
            return 200, {}, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                             "details": {"name": name, "group": GROUPS[plural], "kind": plural,
                                         "uid": "deleted"}}
        if verb == "patch":
            return self._patch(key, content_type, body)
        return 405, {}, status_object(405, f"{method} is not supported by the fake")

    def _patch(self, key: tuple[str, str, str], content_type: str | None, body: Any) -> tuple[int, dict[str, str], Any]:
        plural, namespace, name = key
        current = self.objects[key]
        media = (content_type or "").split(";")[0].strip()
        try:
            if media == "application/json-patch+json":
                patched = apply_json_patch(current, body)
            elif media == "application/merge-patch+json":
                patched = apply_merge_patch(current, body)
            else:
                return 415, {}, status_object(415, f"the fake does not implement {media or 'no content type'}",
                                              reason="UnsupportedMediaType")
        except PatchError as exc:
            return 422, {}, status_object(422, str(exc), reason="Invalid")
        if patched["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            return 409, {}, status_object(
                409, f'Operation cannot be fulfilled on {plural}.{GROUPS[plural]} "{name}": the object has been '
                     "modified; please apply your changes to the latest version and try again",
                reason="Conflict", name=name, plural=plural)
        for immutable in ("uid", "name", "namespace", "creationTimestamp", "generation"):
            patched["metadata"][immutable] = current["metadata"].get(immutable)
        patched["metadata"] = {k: v for k, v in patched["metadata"].items() if v is not None}
        patched["status"] = current.get("status", {})
        if patched.get("spec") != current.get("spec"):
            patched["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
            if plural == "deployments":
                self._pending[(namespace, name)] = 0
        patched["metadata"]["resourceVersion"] = self._next_version()
        self.objects[key] = patched
        return 200, {}, copy.deepcopy(patched)

    def _controller_reads(self, namespace: str, name: str) -> None:
        """The Deployment controller, as seen through reads: the N-th read after a change sees it done."""
        if (namespace, name) not in self._pending:
            return
        self._pending[(namespace, name)] += 1
        if self._pending[(namespace, name)] < self.rollout_gets:
            return
        del self._pending[(namespace, name)]
        deployment = self.objects[("deployments", namespace, name)]
        desired = deployment["spec"].get("replicas", 1)
        deployment["status"]["observedGeneration"] = deployment["metadata"]["generation"]
        self._renumber(deployment)
        if self.rollout_stuck:
            deployment["status"].update({"replicas": desired + 1, "updatedReplicas": min(1, desired),
                                         "availableReplicas": desired})
        else:
            deployment["status"].update({"replicas": desired, "updatedReplicas": desired,
                                         "readyReplicas": desired, "availableReplicas": desired})
        deployment["metadata"]["resourceVersion"] = self._next_version()

    def _renumber(self, deployment: dict[str, Any]) -> None:
        """A ReplicaSet whose template the Deployment now has becomes the newest revision."""
        namespace = deployment["metadata"]["namespace"]
        owned = [rs for (p, ns, _), rs in self.objects.items() if p == "replicasets" and ns == namespace
                 and any(ref["uid"] == deployment["metadata"]["uid"] for ref in rs["metadata"]["ownerReferences"])]
        newest = max((int(rs["metadata"]["annotations"][REVISION]) for rs in owned), default=0)
        for rs in owned:
            template = copy.deepcopy(rs["spec"]["template"])
            template["metadata"]["labels"].pop(HASH_LABEL, None)
            if template == deployment["spec"]["template"]:
                if int(rs["metadata"]["annotations"][REVISION]) != newest:
                    rs["metadata"]["annotations"][REVISION] = str(newest + 1)
                    deployment["metadata"].setdefault("annotations", {})[REVISION] = str(newest + 1)
                return


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server_fake: FakeKubernetes

    def setup(self) -> None:
        super().setup()
        with self.server_fake._lock:
            self.server_fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.server_fake._lock:
            self.server_fake._connections.discard(self.connection)
        super().finish()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, headers, body = self.server_fake.handle(self.command, self.path, self.headers, raw)
        gate = self.server_fake._held(self.command, self.path)
        if gate is not None:
            gate.wait(60)
        send_json(self, status, body, headers)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


# ---------------------------------------------------------------------------------- helpers


def send_json(handler: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str]) -> None:
    """Answer as the API server does: JSON with its length, and any extra headers (Retry-After)."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)

def pod_template(labels: dict[str, str], image: str) -> dict[str, Any]:
    """A pod template as the API returns it (Go's null creationTimestamp included)."""
    return {"metadata": {"creationTimestamp": None, "labels": dict(labels)},
            "spec": {"containers": [{"name": "model", "image": image, "resources": {},
                                     "terminationMessagePath": "/dev/termination-log",
                                     "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}],
                     "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
                     "securityContext": {}, "schedulerName": "default-scheduler"}}


def status_object(code: int, message: str, *, reason: str | None = None, name: str | None = None,
                  plural: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "message": message, "reason": reason or _REASONS.get(code, "Unknown"), "code": code}
    if name:
        status["details"] = {"name": name, "group": GROUPS.get(plural or "", ""), "kind": plural}
    return status


def _fault_status(code: int, verb: str, plural: str, namespace: str, name: str | None) -> dict[str, Any]:
    group = GROUPS[plural]
    subject = f'{plural}.{group} "{name}"' if name else f"{plural}.{group}"
    if code == 403:
        message = (f'{subject} is forbidden: User "system:serviceaccount:inferwatch:inferwatch" cannot {verb} '
                   f'resource "{plural}" in API group "{group}" in the namespace "{namespace}"')
    elif code == 401:
        message = "Unauthorized"
    elif code == 429:
        message = "Too many requests, please try again later."
    elif code >= 500:
        message = "the server is currently unable to handle the request"
    else:
        message = f"{subject}: injected {code}"
    return status_object(code, message, name=name, plural=plural)


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """A ``labelSelector`` query against labels: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``,
    ``k notin (a)``, ``k``, ``!k``."""
    for term in re.findall(r"[^,(]+(?:\([^)]*\))?", selector):
        term = term.strip()
        if not term:
            continue
        if found := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, operator, values = found[1], found[2], {v.strip() for v in found[3].split(",")}
            if (labels.get(key) in values) != (operator == "in") or (operator == "in" and key not in labels):
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = re.split(r"==?", term, maxsplit=1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class PatchError(Exception):
    pass


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def apply_json_patch(target: dict[str, Any], operations: Any) -> dict[str, Any]:
    """RFC 6902's add, replace, remove and test."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch is a list of operations")
    document = copy.deepcopy(target)
    for operation in operations:
        tokens = [token.replace("~1", "/").replace("~0", "~") for token in operation["path"].split("/")[1:]]
        parent = document
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent.get(token)
            if parent is None:
                raise PatchError(f"path {operation['path']}: missing parent")
        last = tokens[-1]
        op = operation["op"]
        if op in ("replace", "remove", "test") and (last not in parent if isinstance(parent, dict)
                                                      else int(last) >= len(parent)):
            raise PatchError(f"{op} {operation['path']}: the path does not exist")
        if op == "test":
            if parent[last] != operation["value"]:
                raise PatchError(f"test {operation['path']}: the value differs")
        elif op in ("add", "replace"):
            parent[last] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del parent[last]
        else:
            raise PatchError(f"operation {op!r} not implemented by the fake")
    return document
