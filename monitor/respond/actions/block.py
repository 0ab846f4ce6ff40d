"""``block_client``: deny a client a model for a while, through a compacted Kafka topic and/or a
ConfigMap that the model's gateway reads; lift the block when it expires.

The denylist entry (UTF-8 JSON, epoch seconds)::

    {"client_id": "c-42", "model": "fraud", "blocked_at": 1764230400.5, "until": 1764234000.5,
     "incident": "3f9a...", "playbook": "extraction-response", "reason": "model_extraction: ..."}

``model`` is ``"*"`` for every model. On the topic, the record key is ``"<model>/<client_id>"``
(UTF-8) so compaction keeps the newest entry per block, and expiry writes a tombstone (the same key,
a null value). Read the model and client from the value, not by splitting the key: either may hold a
``/``. In a ConfigMap, the data key is ``configmap_key(model, client_id)`` (ConfigMap keys allow only
``[-._a-zA-Z0-9]``) and the value is the entry; expiry removes the key. A gateway should also ignore
entries past their ``until``, so a block ends on time even while InferWatch is down.

The topic is not created here: create it compacted (``cleanup.policy=compact``). Blocking a client
already blocked extends ``until`` (never shortens it). Blocks in force are tracked per place (a topic
key, a ConfigMap key) in ``<state dir>/denylist.json``, written atomically: ``expire(services, now)``,
called by the engine's periodic tick, lifts each place past its ``until``, across restarts, so a key
that two playbooks write is lifted when the longer block ends; ``reconcile`` reads the file after a
crash. The intent is recorded before the write, so a crash between the two still leaves expiry
knowing of the block. The file is this process's: a block made by another replica is lifted by it.
"""

# Least RBAC (only with a ``configmap``), in the ConfigMap's namespace, API group "" (core):
#
#   configmaps: patch   write and remove entries (patch may be limited to the ConfigMap by resourceNames)
#   configmaps: create  only when the ConfigMap does not exist yet (create it beforehand to drop this)
#
# Kafka (with a topic): Write on the denylist topic (and IdempotentWrite where the producer is idempotent).

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

import msgspec

from monitor.config import parse_duration
from monitor.ops.state import atomic_file
from monitor.respond.actions import base
from monitor.respond.actions.base import Final, Incident, Services, Transient
from monitor.respond.actions.kubernetes import call_raw, short as _short, status_message
from monitor.respond.delivery import retry_after

log = logging.getLogger("inferwatch.respond")

DENYLIST_FILE = "denylist.json"
STATE_MODE = 0o600
MANAGER = "inferwatch"
MANAGED_BY = "app.kubernetes.io/managed-by"
MERGE_PATCH = "application/merge-patch+json"
REASON_CHARS = 300
INCIDENTS_KEPT = 20  # incidents remembered per block, for reconcile

_FORMAT = 1
_UNSAFE_KEY_CHARS = re.compile(r"[^-_A-Za-z0-9]")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class BlockClient(base.Action):
    """Put a client on the denylist of a model (``"*"``: every model) for ``ttl``.

    Parameters: ``client_id`` (usually ``"{{ client_id }}"``), ``ttl`` (default ``1h``), ``model``
    (default ``"*"``), ``topic`` (the compacted denylist topic; default the daemon's
    ``denylist_topic``; ``""`` for none), ``configmap`` (``{namespace, name}``: also write the entry
    there). At least one of topic and ConfigMap must be in force.

    >>> BlockClient().check(BlockClient.Params(client_id="{{ client_id }}", ttl="2h"))
    >>> BlockClient().check(BlockClient.Params(client_id="{{ client_id }}", ttl="two hours"))
    Traceback (most recent call last):
    ...
    ValueError: ttl: expected a duration such as 30s, 5m or 1h, got 'two hours'
    >>> BlockClient().check(BlockClient.Params(client_id="c", configmap={"namespace": "ml"}))
    Traceback (most recent call last):
    ...
    ValueError: configmap: expected {namespace, name}, missing name
    """

    name = "block_client"
    destructive = True

    class Params(base.Params):
        client_id: str
        ttl: str | float = "1h"
        model: str = "*"
        topic: str | None = None
        configmap: dict[str, str] | None = None

    def check(self, params: Params) -> None:
        if not _templated(params.ttl):
            _ttl(params.ttl)
        if params.topic and not _templated(params.topic) and not _TOPIC.match(params.topic):
            raise ValueError(f"topic: {params.topic!r} is not a Kafka topic name ([a-zA-Z0-9._-], at most 249)")
        if params.configmap is not None:
            _configmap(params.configmap)

    def run(self, params: Params, incident: Incident, services: Services) -> dict[str, Any]:
        target = _Target.of(params, services)
        with _lock(services.state_dir):
            book = _Denylist(services.state_dir)
            now = services.now()
            places = target.places()
            olds = {place_id: book.blocks.get(place_id) for place_id in places}
            # A place already blocked and not expired is extended, never shortened.
            in_force = [old for old in olds.values() if old is not None and old["entry"]["until"] > now]
            until = max([now + target.ttl] + [old["entry"]["until"] for old in in_force])
            detection = incident.detection
            reason = f"{detection.get('kind')}: {detection.get('summary') or ''}".strip()
            entry = {"client_id": target.client_id, "model": target.model,
                     "blocked_at": min([old["entry"]["blocked_at"] for old in in_force], default=now),
                     "until": until, "incident": incident.id, "playbook": incident.playbook,
                     "reason": reason[:REASON_CHARS]}
            for place_id, place in places.items():
                incidents = [i for i in (olds[place_id] or {}).get("incidents", []) if i != incident.id]
                book.blocks[place_id] = {"model": target.model, "client_id": target.client_id, "place": place,
                                         "entry": entry, "incidents": (incidents + [incident.id])[-INCIDENTS_KEPT:],
                                         "written": False, "detail": None}
            # The intent first: should we crash after a write, expiry still knows the block is there.
            book.save()
            detail: dict[str, Any] = {"client_id": target.client_id, "model": target.model,
                                      "blocked_at": entry["blocked_at"], "until": until, "extended": bool(in_force),
                                      "topic": None, "configmap": None}
            value = msgspec.json.encode(entry)
            try:
                for place_id, place in places.items():
                    detail.update(_write(place, target, value, services))
                    book.blocks[place_id]["written"] = True
            except Final:
                # Refused: the places not written are tracked as they were before this step.
                for place_id, old in olds.items():
                    if not book.blocks[place_id]["written"]:
                        if old is None:
                            del book.blocks[place_id]
                        else:
                            book.blocks[place_id] = old
                book.save()
                raise
            except BaseException:
                # Maybe written (a send that timed out may still land): keep the intent, so expiry
                # lifts the place at the latest ``until`` it may carry.
                book.save()
                raise
            for place_id in places:
                book.blocks[place_id]["detail"] = detail
            book.save()
        return detail

    def reconcile(self, params: Params, incident: Incident, services: Services,
                  attempt: dict[str, Any]) -> dict[str, Any] | None:
        target = _Target.of(params, services)
        with _lock(services.state_dir):
            book = _Denylist(services.state_dir)
        records = [book.blocks.get(place_id) for place_id in target.places()]
        if all(r is not None and r["written"] and r["detail"] and incident.id in r["incidents"] for r in records):
            return records[0]["detail"]  # type: ignore[index]
        return None


def _write(place: dict[str, Any], target: "_Target", value: bytes, services: Services) -> dict[str, Any]:
    """Write the entry in one place; its part of the step's detail."""
    if "topic" in place:
        partition, offset = _produce(services, place["topic"], target.record_key, value)
        return {"topic": {"name": place["topic"], "key": target.record_key.decode(),
                          "partition": partition, "offset": offset}}
    ref = place["configmap"]
    change = _ConfigMaps(services).put(ref["namespace"], ref["name"], ref["key"], value.decode())
    return {"configmap": {**ref, "change": change}}


def expire(services: Services, now: float | None = None) -> int:
    """Lift the tracked blocks past their ``until``: a tombstone on the topic, the key removed from the
    ConfigMap. Returns how many places were lifted. A place whose lifting fails stays tracked and
    is tried again on the next call."""
    now = services.now() if now is None else now
    if not (Path(services.state_dir) / DENYLIST_FILE).exists():
        return 0
    lifted = 0
    with _lock(services.state_dir):
        book = _Denylist(services.state_dir)
        for place_id, record in list(book.blocks.items()):
            if record["entry"]["until"] > now:
                continue
            place = record["place"]
            key = f"{record['model']}/{record['client_id']}"
            where = f"topic {place['topic']}" if "topic" in place else \
                f"ConfigMap {place['configmap']['namespace']}/{place['configmap']['name']}"
            try:
                if "topic" in place:
                    _produce(services, place["topic"], key.encode(), None)
                else:
                    ref = place["configmap"]
                    _ConfigMaps(services).remove(ref["namespace"], ref["name"], ref["key"])
            except (Transient, Final) as exc:
                log.error("block of %s in %s expired but could not be lifted (tried again on the next tick): %s",
                          key, where, exc)
                continue
            del book.blocks[place_id]
            book.save()  # after each: a crash lifts at most one place twice, which is harmless
            lifted += 1
            log.info("block of %s in %s lifted (expired at %.0f)", key, where, record["entry"]["until"])
    return lifted


def configmap_key(model: str, client_id: str) -> str:
    """The ConfigMap data key of a block: ``<model>.<client>.<hash>``, where model and client keep
    ``[-_a-zA-Z0-9]`` and turn any other character into ``_`` (for reading), and the hash, the first
    16 hex digits of SHA-256 of the record key ``<model>/<client_id>``, keeps keys apart.

    >>> configmap_key("fraud", "c-42")
    'fraud.c-42.1c334e853d45e38c'
    >>> configmap_key("*", "10.0.0.7")
    '_.10_0_0_7.af2ab24e0ef9135d'
    """
    digest = hashlib.sha256(f"{model}/{client_id}".encode()).hexdigest()[:16]
    readable_model = _UNSAFE_KEY_CHARS.sub("_", model)[:63]
    readable_client = _UNSAFE_KEY_CHARS.sub("_", client_id)[:150]
    return f"{readable_model}.{readable_client}.{digest}"  # at most 231 of the 253 characters allowed


# ----------------------------------------------------------------------------- what a step names

class _Target:
    """A step's rendered parameters, checked, with the daemon's defaults filled in."""

    def __init__(self, model: str, client_id: str, ttl: float, topic: str | None,
                 configmap: tuple[str, str] | None):
        self.model, self.client_id, self.ttl, self.topic, self.configmap = model, client_id, ttl, topic, configmap
        self.record_key = f"{model}/{client_id}".encode()
        self.configmap_key = configmap_key(model, client_id)

    def places(self) -> dict[str, dict[str, Any]]:
        """Where the step writes, by tracked id: one block per model, client and place, so a topic key
        or ConfigMap key that several playbooks write is lifted only when the longest block ends."""
        out: dict[str, dict[str, Any]] = {}
        if self.topic:
            out[json.dumps(["topic", self.topic, self.model, self.client_id])] = {"topic": self.topic}
        if self.configmap:
            namespace, name = self.configmap
            out[json.dumps(["configmap", namespace, name, self.model, self.client_id])] = {
                "configmap": {"namespace": namespace, "name": name, "key": self.configmap_key}}
        return out

    @classmethod
    def of(cls, params: BlockClient.Params, services: Services) -> "_Target":
        client_id, model = params.client_id, params.model  # kept exactly: gateways compare them as they are
        if not client_id.strip():
            raise Final("the detection names no client")
        if not model.strip():
            raise Final("model: empty (a model name, or \"*\" for every model)")
        try:
            ttl = _ttl(params.ttl)
            configmap = _configmap(params.configmap) if params.configmap is not None else None
        except ValueError as exc:
            raise Final(str(exc)) from None
        topic = params.topic if params.topic is not None else services.extras.get("denylist_topic")
        if topic and not _TOPIC.match(topic):
            raise Final(f"topic: {topic!r} is not a Kafka topic name")
        if not topic and configmap is None:
            raise Final("nowhere to write the block: no denylist topic (the step's topic or the daemon's "
                        "denylist_topic) and no configmap")
        return cls(model, client_id, ttl, topic or None, configmap)


def _templated(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def _ttl(value: str | float) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"ttl: {exc}") from None
    if seconds <= 0:
        raise ValueError(f"ttl: expected a positive duration, got {value!r}")
    return seconds


def _configmap(value: dict[str, str]) -> tuple[str, str]:
    missing = [k for k in ("namespace", "name") if not value.get(k)]
    unknown = sorted(set(value) - {"namespace", "name"})
    if missing or unknown:
        said = ", ".join([f"missing {k}" for k in missing] + [f"unknown {k}" for k in unknown])
        raise ValueError(f"configmap: expected {{namespace, name}}, {said}")
    namespace, name = value["namespace"], value["name"]
    if not _templated(namespace) and (len(namespace) > 63 or not _DNS1123_LABEL.match(namespace)):
        raise ValueError(f"configmap.namespace: {namespace!r} is not a namespace name (DNS-1123 label)")
    if not _templated(name) and (len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name)):
        raise ValueError(f"configmap.name: {name!r} is not a ConfigMap name (DNS-1123 subdomain)")
    return namespace, name


# ----------------------------------------------------------------------------- the tracked blocks

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def _lock(state_dir: Path) -> threading.Lock:
    """One lock per state directory, held across a block's writes and an expiry's tombstones, so a
    block extended while expiring is never tombstoned after its new entry."""
    key = str(Path(state_dir).resolve())
    with _LOCKS_LOCK:
        return _LOCKS.setdefault(key, threading.Lock())


class _Denylist:
    """``denylist.json``: ``{"format": 1, "blocks": {id: record}}``, read on creation, written atomically."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / DENYLIST_FILE
        self.blocks: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return
        try:
            saved = json.loads(self.path.read_bytes())
            if saved.get("format") != _FORMAT:
                raise ValueError(f"unknown format {saved.get('format')!r}")
            self.blocks = dict(saved["blocks"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = self.path.with_name(f"{DENYLIST_FILE}.broken-{int(time.time())}")
            try:
                self.path.replace(aside)
            except OSError:
                aside = self.path
            # Its blocks will not be lifted by InferWatch; gateways still drop entries past their until.
            log.error("%s is unreadable (%s); kept as %s, starting with no tracked blocks", self.path, exc, aside)

    def save(self) -> None:
        Path(self.path.parent).mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path, STATE_MODE) as handle:
            handle.write(json.dumps({"format": _FORMAT, "blocks": self.blocks}, indent=1).encode())


# ----------------------------------------------------------------------------- Kafka

def _produce(services: Services, topic: str, key: bytes, value: bytes | None) -> tuple[int, int]:
    """Send one record and wait for the broker's acknowledgement; (partition, offset)."""
    if services.producer is None:
        raise Final(f"no Kafka producer configured to write the denylist topic {topic}")
    from kafka.errors import AuthorizationError, InvalidTopicError, KafkaError, MessageSizeTooLargeError

    try:
        metadata = services.producer().send(topic, key=key, value=value).get(timeout=services.http_timeout)
    except (AuthorizationError, InvalidTopicError, MessageSizeTooLargeError) as exc:
        raise Final(f"denylist topic {topic}: the broker refused the record ({type(exc).__name__}); "
                    f"InferWatch needs Write on the topic") from None
    except KafkaError as exc:
        raise Transient(f"denylist topic {topic}: not acknowledged ({type(exc).__name__}: {_short(exc)}); "
                        f"does the topic exist and is the broker reachable?") from None
    return metadata.partition, metadata.offset


# ----------------------------------------------------------------------------- Kubernetes

class _ConfigMaps:
    """Entries of a ConfigMap, through the ``kubernetes`` client as raw JSON, with the API's errors as
    ``Transient`` (429, 5xx, no answer) and ``Final`` (anything else, RBAC named on 403)."""

    def __init__(self, services: Services):
        if services.kubernetes is None:
            raise Final("no Kubernetes connection configured: block_client's configmap needs the daemon to run "
                        "in a cluster (service account) or a kubeconfig")
        from kubernetes import client  # here, so playbooks without Kubernetes steps never import it

        self._api = client.CoreV1Api(services.kubernetes())
        self._timeout = services.http_timeout
        self._now = services.now

    def put(self, namespace: str, name: str, key: str, value: str) -> str:
        """Set ``key``; "patched", or "created" when the ConfigMap did not exist."""
        patch = {"data": {key: value}}
        if self._patch(namespace, name, patch, none_on=404) is not None:
            return "patched"
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": namespace, "labels": {MANAGED_BY: MANAGER}},
                "data": {key: value}}
        created = self._call("create", namespace, name, self._api.create_namespaced_config_map, namespace, body,
                             field_manager=MANAGER, _headers={"Content-Type": "application/json"}, none_on=409)
        if created is not None:
            return "created"
        self._patch(namespace, name, patch)  # created by someone else meanwhile
        return "patched"

    def remove(self, namespace: str, name: str, key: str) -> bool:
        """Remove ``key`` (a merge patch's null); False when the ConfigMap is gone."""
        return self._patch(namespace, name, {"data": {key: None}}, none_on=404) is not None

    def _patch(self, namespace: str, name: str, patch: dict[str, Any], none_on: int | None = None) -> Any:
        return self._call("patch", namespace, name, self._api.patch_namespaced_config_map, name, namespace, patch,
                          field_manager=MANAGER, _content_type=MERGE_PATCH, none_on=none_on)

    def _call(self, verb: str, namespace: str, name: str, call: Callable[..., Any], *args: Any,
              none_on: int | None = None, **kwargs: Any) -> Any:
        where = f"ConfigMap {namespace}/{name}"
        return call_raw(call, *args, verb=verb, where=where, timeout=self._timeout, none_on=none_on,
                        error=lambda exc: self._error(exc, verb, namespace, where), **kwargs)

    def _error(self, exc: Any, verb: str, namespace: str, where: str) -> Exception:
        status = exc.status or 0
        said = status_message(exc.body)
        if status == 401:
            return Final(f"unauthorized: the Kubernetes API rejected InferWatch's credentials trying to "
                         f"{verb} {where} (is the service account token mounted and current?)")
        if status == 403:
            return Final(f'forbidden: the service account needs RBAC verb "{verb}" on resource "configmaps" '
                         f'in API group "" (core) in namespace {namespace} to {verb} {where} '
                         f'(block_client needs patch, and create unless the ConfigMap exists){said}')
        if status == 404:
            return Final(f"cannot {verb} {where}: not found (does namespace {namespace} exist?){said}")
        if status == 409:
            return Transient(f"conflict writing {where}; it is tried again{said}")
        if status == 429 or status >= 500 or status == 0:
            wait = retry_after((exc.headers or {}).get("Retry-After"), self._now())
            return Transient(f"cannot {verb} {where}: the Kubernetes API answered {status or 'nothing'}{said}",
                             retry_after=wait)
        return Final(f"cannot {verb} {where}: the Kubernetes API answered {status}{said}")

